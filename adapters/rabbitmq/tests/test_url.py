"""URL options of amqp:// and amqps:// URLs: parsed, validated, never leaking the password."""

from __future__ import annotations

import ssl

import pytest

import unibus
from unibus.errors import InvalidURL
from unibus.url import make_url
from unibus_rabbitmq import RabbitMQAdapter
from unibus_rabbitmq._url import BROKER_MAX_MESSAGE_SIZE, OPTIONS, parse_settings

SECRET = "s3cr3t-p@ss"


def adapter(url: str) -> RabbitMQAdapter:
    return RabbitMQAdapter(make_url(url))


def test_defaults_fill_port_user_vhost_and_options() -> None:
    s = parse_settings(make_url("amqp://127.0.0.1"))
    assert (s.hosts[0].host, s.hosts[0].port) == ("127.0.0.1", 5672)
    assert (s.username, s.password, s.vhost, s.tls) == ("guest", "guest", "/", False)
    assert (s.heartbeat, s.queue_type, s.exchange, s.prefetch) == (5, "quorum", "unibus", 64)
    assert s.max_message_size == BROKER_MAX_MESSAGE_SIZE


def test_amqps_defaults_to_port_5671_and_builds_a_verifying_tls_context() -> None:
    s = parse_settings(make_url("amqps://u:p@broker.example"))
    assert s.hosts[0].port == 5671
    context = s.ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_amqps_verify_false_turns_certificate_checks_off() -> None:
    context = parse_settings(make_url("amqps://h?verify=false")).ssl_context()
    assert context is not None
    assert context.verify_mode is ssl.CERT_NONE


def test_plain_amqp_has_no_tls_context() -> None:
    assert parse_settings(make_url("amqp://h")).ssl_context() is None


def test_missing_tls_file_is_invalid_url() -> None:
    with pytest.raises(InvalidURL, match="TLS files"):
        parse_settings(make_url("amqps://h?ca_file=/nonexistent/ca.pem")).ssl_context()


@pytest.mark.parametrize(("path", "vhost"), [("", "/"), ("/", "/"), ("/%2F", "/"),
                                             ("/prod", "prod"), ("/a%2Fb", "a/b")])
def test_vhost_is_the_decoded_path(path: str, vhost: str) -> None:
    assert parse_settings(make_url(f"amqp://h{path}")).vhost == vhost


def test_every_option_parses() -> None:
    s = parse_settings(make_url(
        "amqp://h?heartbeat=2&connect_timeout=1.5&recovery=10&prefetch=7&queue_type=classic"
        "&exchange=ex&publish_window=9&max_message_size=1000"))
    assert (s.heartbeat, s.connect_timeout, s.recovery, s.prefetch) == (2, 1.5, 10.0, 7)
    assert (s.queue_type, s.exchange, s.publish_window, s.max_message_size) == (
        "classic", "ex", 9, 1000)


def test_unknown_option_is_invalid_url_naming_it() -> None:
    with pytest.raises(InvalidURL, match=r"'prefech'.*Did you mean 'prefetch'"):
        adapter("amqp://h?prefech=3")


def test_unknown_option_fails_in_connect_before_any_io() -> None:
    with pytest.raises(InvalidURL, match="bogus"):
        unibus.connect("amqp://127.0.0.1:1/?bogus=1")


@pytest.mark.parametrize("query", ["queue_type=stream", "heartbeat=-1", "prefetch=0",
                                   "exchange=amq.topic", "exchange=", "connect_timeout=x"])
def test_invalid_option_values_are_invalid_url(query: str) -> None:
    with pytest.raises(InvalidURL):
        adapter(f"amqp://h?{query}")


@pytest.mark.parametrize("option", ["ca_file=/x", "cert_file=/x", "key_file=/x", "verify=false"])
def test_tls_options_on_plain_amqp_are_invalid_url(option: str) -> None:
    with pytest.raises(InvalidURL, match="amqps"):
        adapter(f"amqp://h?{option}")


def test_key_file_without_cert_file_is_invalid_url() -> None:
    with pytest.raises(InvalidURL, match="cert_file"):
        adapter("amqps://h?key_file=/x")


def test_url_without_host_is_invalid_url() -> None:
    with pytest.raises(InvalidURL, match="needs a host"):
        adapter("amqp:///vhost")


def test_password_never_in_repr_or_str_of_adapter_settings_or_bus() -> None:
    url = f"amqp://app:{SECRET.replace('@', '%40')}@h:5672/v"
    a = adapter(url)
    bus = unibus.connect(url)
    for text in (repr(a), str(a.url), repr(a.settings), repr(bus), str(bus.url)):
        assert SECRET not in text


def test_options_table_documents_every_option() -> None:
    table = OPTIONS.markdown()
    for name in ("heartbeat", "connect_timeout", "recovery", "prefetch", "queue_type",
                 "exchange", "publish_window", "max_message_size", "ca_file", "cert_file",
                 "key_file", "verify"):
        assert f"`{name}`" in table


def test_capabilities_follow_the_url() -> None:
    caps = adapter("amqp://h?heartbeat=3&max_message_size=5000&recovery=7").capabilities
    assert caps.max_message_size == 5000
    assert caps.timings.redelivery == 2.0 + 2 * 3
    assert caps.timings.recovery >= 7
    assert caps.dedup_window is None
    assert not caps.replay_for_new_groups

"""URL options of both NATS schemes: validation, defaults, and credentials kept secret."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import unibus
from unibus.capabilities import Support
from unibus.errors import InvalidURL
from unibus.url import make_url
from unibus_nats import CoreNatsAdapter, JetStreamAdapter
from unibus_nats._url import JETSTREAM_OPTIONS, parse_settings, token


def test_unknown_option_is_invalid_url_naming_it() -> None:
    with pytest.raises(InvalidURL, match="ack_wiat") as info:
        JetStreamAdapter(make_url("nats://127.0.0.1:4222?ack_wiat=2"))
    assert "ack_wait" in str(info.value)     # the did-you-mean


def test_core_scheme_refuses_jetstream_options() -> None:
    with pytest.raises(InvalidURL, match="storage"):
        CoreNatsAdapter(make_url("nats+core://127.0.0.1:4222?storage=memory"))


@pytest.mark.parametrize("query", ["storage=disk", "replicas=0", "ack_wait=-1",
                                   "delayed=sometimes", "prefix=a.b", "tls_key=k.pem",
                                   "token=t&creds=c.creds"])
def test_invalid_option_values_are_invalid_url(query: str) -> None:
    with pytest.raises(InvalidURL):
        JetStreamAdapter(make_url(f"nats://127.0.0.1:4222?{query}"))


def test_a_url_without_host_is_invalid() -> None:
    with pytest.raises(InvalidURL):
        JetStreamAdapter(make_url("nats://"))


def test_multiple_servers_user_password_and_defaults_are_parsed() -> None:
    settings = parse_settings(make_url("nats://app:s3cret@10.0.0.1,10.0.0.2:4333?storage=memory"),
                              JETSTREAM_OPTIONS)
    assert settings.servers() == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4333"]
    assert settings.connect_kwargs() == {"user": "app", "password": "s3cret"}
    assert settings["storage"] == "memory"
    assert settings["ack_wait"] == 30.0


def test_token_nkeys_and_creds_reach_the_driver_arguments() -> None:
    assert parse_settings(make_url("nats://h?token=tok"), JETSTREAM_OPTIONS
                          ).connect_kwargs() == {"token": "tok"}
    assert parse_settings(make_url("nats://h?nkeys_seed=/s.nk"), JETSTREAM_OPTIONS
                          ).connect_kwargs() == {"nkeys_seed": "/s.nk"}
    assert parse_settings(make_url("nats://h?creds=/u.creds"), JETSTREAM_OPTIONS
                          ).connect_kwargs() == {"user_credentials": "/u.creds"}
    # Not nats://TOKEN@host: a user name shows in reprs and logs, a token must not.
    with pytest.raises(InvalidURL, match=r"\?token="):
        parse_settings(make_url("nats://tok@h"), JETSTREAM_OPTIONS)


def test_tls_switches_the_server_scheme() -> None:
    settings = parse_settings(make_url("nats://h:4443?tls=true"), JETSTREAM_OPTIONS)
    assert settings.servers() == ["tls://h:4443"]
    assert "tls" in settings.connect_kwargs()


def test_missing_tls_file_is_invalid_url_without_secrets() -> None:
    with pytest.raises(InvalidURL) as info:
        parse_settings(make_url("nats://u:pw-123@h?tls_ca=/nonexistent/ca.pem"),
                       JETSTREAM_OPTIONS).tls_context()
    assert "pw-123" not in str(info.value)


def test_password_and_token_never_appear_in_repr_str_or_errors(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = "nats://app:hunter2-pw@127.0.0.1:4222?token=tok-hunter3"
    with pytest.raises(InvalidURL) as info:
        JetStreamAdapter(make_url(url))       # user:password and token together
    adapter = JetStreamAdapter(make_url("nats://app:hunter2-pw@127.0.0.1:4222"))
    bus = unibus.Bus("nats://127.0.0.1:4222?token=tok-hunter3")
    seen = " ".join([str(info.value), repr(adapter), str(adapter.url), repr(bus),
                     repr(parse_settings(make_url(url.split("?")[0]), JETSTREAM_OPTIONS)),
                     caplog.text])
    assert "hunter2" not in seen
    assert "hunter3" not in seen


def test_names_map_one_to_one_onto_nats_tokens() -> None:
    assert token("orders.eu") == "orders~eu"
    assert token("orders_eu") != token("orders.eu")
    adapter = JetStreamAdapter(make_url("nats://h?prefix=app"))
    assert adapter.subject("a.b") == "app.a~b"
    assert adapter.stream("a.b") == "app-a~b"


def test_capabilities_follow_the_url() -> None:
    memory = JetStreamAdapter(make_url("nats://h?storage=memory&dedup_window=0&ack_wait=1.5"))
    assert memory.capabilities.persistent is False
    assert memory.capabilities.dedup_window is None
    assert memory.capabilities.timings.redelivery == pytest.approx(3.5)
    emulated = JetStreamAdapter(make_url("nats://h?delayed=emulated"))
    assert emulated.capabilities.delayed_delivery is Support.EMULATED


def test_core_capabilities_declare_every_absence() -> None:
    caps = CoreNatsAdapter(make_url("nats+core://h")).capabilities
    declared = {"persistent": caps.persistent, "publish_confirms": caps.publish_confirms,
                "group_retention": caps.group_retention, "redelivery": caps.redelivery,
                "replay_for_new_groups": caps.replay_for_new_groups,
                "dead_letter": caps.dead_letter}
    assert not any(declared.values()), declared
    assert caps.nack_delay is Support.ABSENT
    assert caps.delayed_delivery is Support.ABSENT
    assert caps.dedup_window is None


def test_package_imports_without_the_driver() -> None:
    code = ("import sys\nsys.modules['nats'] = None\nimport unibus_nats\n"
            "from unibus.url import make_url\n"
            "unibus_nats.JetStreamAdapter(make_url('nats://h'))\n"
            "unibus_nats.CoreNatsAdapter(make_url('nats+core://h'))\n"
            "try:\n    import nats\nexcept ImportError:\n    print('blocked')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"

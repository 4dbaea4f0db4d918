"""URL options: validation, derived driver configuration, and no password anywhere."""

from __future__ import annotations

import pytest

from unibus.errors import InvalidURL
from unibus.url import make_url
from unibus_kafka import KafkaAdapter
from unibus_kafka._url import parse_settings


def adapter(url: str) -> KafkaAdapter:
    return KafkaAdapter(make_url(url))


def test_unknown_option_is_invalid_url_naming_it_with_a_suggestion() -> None:
    with pytest.raises(InvalidURL, match=r"partitionz.*Did you mean 'partitions'"):
        adapter("kafka://127.0.0.1:9092?partitionz=3")


@pytest.mark.parametrize("query", ["partitions=0", "session_timeout=abc",
                                   "assignment_strategy=sticky", "sasl_mechanism=GSSAPI"])
def test_invalid_option_values_are_refused(query: str) -> None:
    with pytest.raises(InvalidURL):
        adapter(f"kafka://127.0.0.1?{query}")


@pytest.mark.parametrize(("query", "reason"), [
    ("linger=1000", "at most 900"), ("linger=-1", "non-negative"),
    ("publish_timeout=3000000", "at most 2147483"), ("session_timeout=7200", "at most 3600"),
    ("connect_timeout=1e10", "at most"), ("message_max_bytes=2000000000", "at most 1000000000"),
    ("partitions=3000000000", "at most"), ("commit_interval=-0.5", "non-negative"),
    ("replication_factor=0", "at least 1 replica"),
])
def test_values_beyond_the_drivers_limits_are_refused_when_the_adapter_is_made(
        query: str, reason: str) -> None:
    # Not later, when the client is made or the first topic created, with the driver's
    # own (overflowed) numbers in the message.
    with pytest.raises(InvalidURL, match=reason):
        adapter(f"kafka://127.0.0.1?{query}")


def test_values_at_the_drivers_limits_are_accepted() -> None:
    adapter("kafka://127.0.0.1?linger=900&session_timeout=3600&message_max_bytes=1000000000"
            "&replication_factor=-1&commit_interval=0")


def test_a_url_without_hosts_or_with_a_path_is_refused() -> None:
    with pytest.raises(InvalidURL, match="bootstrap host"):
        adapter("kafka://")
    with pytest.raises(InvalidURL, match="no path"):
        adapter("kafka://127.0.0.1/vhost")


def test_multi_host_bootstrap_list_with_default_port() -> None:
    settings = parse_settings(make_url("kafka://b1:9093,b2,[::1]:9094"))
    assert settings.bootstrap == "b1:9093,b2:9092,[::1]:9094"


def test_plaintext_without_user_and_tls_by_scheme() -> None:
    assert parse_settings(make_url("kafka://h")).security == {"security.protocol": "PLAINTEXT"}
    tls = parse_settings(make_url("kafka+ssl://h?ssl_cafile=/ca.pem&ssl_check_hostname=false"))
    assert tls.security == {"security.protocol": "SSL", "ssl.ca.location": "/ca.pem",
                            "ssl.endpoint.identification.algorithm": "none"}


def test_a_user_turns_on_sasl_scram() -> None:
    settings = parse_settings(
        make_url("kafka+ssl://app:s3cret@h?sasl_mechanism=SCRAM-SHA-256"))
    assert settings.security["security.protocol"] == "SASL_SSL"
    assert settings.security["sasl.mechanism"] == "SCRAM-SHA-256"
    assert settings.security["sasl.username"] == "app"
    assert settings.security["sasl.password"] == "s3cret"


def test_sasl_protocol_without_user_and_tls_files_without_tls_are_refused() -> None:
    with pytest.raises(InvalidURL, match="needs a user"):
        adapter("kafka://h?security_protocol=SASL_PLAINTEXT")
    with pytest.raises(InvalidURL, match="needs TLS"):
        adapter("kafka://h?ssl_cafile=/ca.pem")
    with pytest.raises(InvalidURL, match="TLS"):
        adapter("kafka+ssl://h?security_protocol=PLAINTEXT")


def test_client_options_reach_the_driver_configuration() -> None:
    settings = parse_settings(make_url(
        "kafka://h?client_id=billing&partitions=7&session_timeout=1.5&linger=10ms"))
    producer = settings.producer()
    assert producer["client.id"] == "billing"
    assert producer["enable.idempotence"] is True
    assert producer["acks"] == "all"
    assert producer["linger.ms"] == pytest.approx(10)
    consumer = settings.consumer("g", reset="earliest")
    assert consumer["session.timeout.ms"] == 1500
    assert consumer["enable.auto.commit"] is False
    assert consumer["auto.offset.reset"] == "earliest"
    assert "group.protocol" not in consumer   # librdkafka's default: the classic protocol
    # A consumer that keeps up with its prefetch queue never waits librdkafka's 1 s.
    assert consumer["fetch.queue.backoff.ms"] == 20
    assert settings.partitions == 7


def test_kip848_protocol_is_opt_in() -> None:
    consumer = parse_settings(make_url("kafka://h?group_protocol=consumer")).consumer(
        "g", reset="earliest")
    assert consumer["group.protocol"] == "consumer"
    assert "session.timeout.ms" not in consumer
    caps = adapter("kafka://h?group_protocol=consumer&session_timeout=2").capabilities
    assert caps.timings.redelivery == pytest.approx(48.0)   # the broker's 45 s + 3 s


def test_passwords_never_appear_in_repr_str_or_errors() -> None:
    secret = "pa55-VERY-secret"
    url = f"kafka://app:{secret}@h?ssl_key_password={secret}x"
    with pytest.raises(InvalidURL) as refused:
        adapter(url)                  # ssl_key_password needs TLS
    assert secret not in str(refused.value)
    kafka = adapter(f"kafka+ssl://app:{secret}@h?ssl_key_password={secret}x")
    settings = parse_settings(make_url(f"kafka+ssl://app:{secret}@h"))
    for text in (repr(kafka), str(kafka.url), repr(kafka.url), repr(settings)):
        assert secret not in text
    with pytest.raises(InvalidURL) as bad:
        adapter(f"kafka://app:{secret}@h?ssl_key_password={secret}&nope=1")
    assert secret not in str(bad.value)


def test_capabilities_declare_kafka_semantics() -> None:
    caps = adapter("kafka://h?message_max_bytes=2000000&session_timeout=2").capabilities
    assert caps.replay_for_new_groups
    assert caps.group_retention
    assert caps.publish_confirms
    assert caps.max_message_size == 2_000_000 - 32 * 1024
    assert caps.dedup_window is None
    assert caps.timings.redelivery == pytest.approx(5.0)
    assert caps.ordering.value == "per-key"
    assert caps.redelivery_order.value == "may-reorder"
    assert caps.nack_delay.value == caps.delayed_delivery.value == "emulated"

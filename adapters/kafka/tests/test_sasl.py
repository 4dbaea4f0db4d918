"""SASL/SCRAM on a real broker: a Kafka container with a second, SASL_PLAINTEXT listener.

The broker is the contract suite's Kafka image with one more listener and SCRAM
enabled; the user is created through the PLAINTEXT listener with the admin API.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

import unibus
from unibus.errors import AuthenticationFailed

pytestmark = pytest.mark.broker

USER, PASSWORD = "app", f"scram-{uuid.uuid4().hex[:12]}"
_JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def _sasl_spec() -> Any:
    from unibus_contract.provision import KAFKA, ContainerConfig, Layout
    from unibus_contract.provision.specs import LOOPBACK

    def configure(layout: Layout) -> ContainerConfig:
        base = KAFKA.configure(layout)
        env = dict(base.env)
        sasl = layout.ports["sasl"]
        env["KAFKA_LISTENERS"] += f",SASL_PLAINTEXT://{layout.bind}:{sasl}"
        env["KAFKA_ADVERTISED_LISTENERS"] += f",SASL_PLAINTEXT://{LOOPBACK}:{sasl}"
        env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"] += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        env["KAFKA_SASL_ENABLED_MECHANISMS"] = "SCRAM-SHA-512,SCRAM-SHA-256"
        for mechanism in ("512", "256"):
            env[f"KAFKA_LISTENER_NAME_SASL__PLAINTEXT_SCRAM___SHA___{mechanism}"
                "_SASL_JAAS_CONFIG"] = _JAAS
        return replace(base, env=env)

    return replace(KAFKA, name="kafka-sasl", port_names=(*KAFKA.port_names, "sasl"),
                   configure=configure)


def _create_user(bootstrap: str) -> None:
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for mechanism in (ScramMechanism.SCRAM_SHA_512, ScramMechanism.SCRAM_SHA_256):
        upsert = UserScramCredentialUpsertion(USER, ScramCredentialInfo(mechanism, 4096),
                                              PASSWORD.encode())
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(timeout=30)


@pytest.fixture(scope="module")
def sasl_url() -> Iterator[str]:
    """``kafka://app:PASSWORD@127.0.0.1:SASL_PORT`` on a fresh SASL-enabled broker."""
    from unibus_contract.provision import (
        brokers_required,
        docker_unavailable_reason,
        engine_info,
        launch,
        network_mode,
    )

    reason = docker_unavailable_reason()
    if reason is not None:
        if brokers_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    broker = launch(_sasl_spec(), mode=network_mode(has_bridge=engine_info().has_bridge))
    try:
        _create_user(broker.url.removeprefix("kafka://"))
        yield (f"kafka://{USER}:{PASSWORD}@127.0.0.1:{broker.layout.ports['sasl']}"
               "?session_timeout=2&connect_timeout=5")
    finally:
        broker.close()


async def _open_when_the_user_exists(url: str) -> unibus.Bus:
    # A SCRAM user becomes visible to the listener a moment after its creation.
    deadline = time.monotonic() + 20
    while True:
        bus = unibus.connect(url)
        try:
            return await bus.open()
        except AuthenticationFailed:
            await bus.aclose()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
async def test_scram_credentials_publish_and_consume(sasl_url: str, mechanism: str) -> None:
    bus = await _open_when_the_user_exists(f"{sasl_url}&sasl_mechanism={mechanism}")
    try:
        topic, group = f"sasl-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:10]}"
        sent = await bus.publish(topic, b"over SCRAM")
        async with bus.subscribe(topic, group=group) as sub:
            [got] = await sub.fetch(1, timeout=10)
            await got.ack()
        assert got.id == sent.id
        assert PASSWORD not in repr(bus)
    finally:
        await bus.aclose()


async def test_a_wrong_scram_password_fails_at_once_and_never_shows(
        sasl_url: str, caplog: pytest.LogCaptureFixture) -> None:
    await (await _open_when_the_user_exists(sasl_url)).aclose()   # the user exists now
    wrong = f"wrong-{uuid.uuid4().hex}"
    bad_url = sasl_url.replace(PASSWORD, wrong)
    for _ in range(2):
        bus = unibus.connect(bad_url)
        started = time.monotonic()
        with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationFailed) as refused:
            await bus.open()
        await bus.aclose()
        assert time.monotonic() - started < bus.capabilities.timings.connect_timeout
        assert wrong not in str(refused.value)
        assert wrong not in repr(bus)
    assert all(wrong not in r.getMessage() and PASSWORD not in r.getMessage()
               for r in caplog.records)

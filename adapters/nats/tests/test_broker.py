"""The NATS adapters against a real server: recovery, disconnects, emulated delay, core.

Restarts of the session's server make some of these destructive: they are marked
``fault`` like the G scenarios.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import unibus
from unibus.errors import PublishFailed, UnsupportedFeature
from unibus_nats import JetStreamAdapter

pytestmark = pytest.mark.broker


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.mark.fault
async def test_pull_loop_resumes_after_a_server_restart(nats_broker: Any, js_url: str,
                                                        topic: str) -> None:
    async with unibus.connect(js_url) as bus:
        sub = await bus.subscribe(topic, group="g").open()
        first = await bus.publish(topic, b"before")
        [got] = await sub.fetch(1, timeout=bus.capabilities.timings.delivery)
        assert got.id == first.id
        await got.ack()
        await asyncio.to_thread(nats_broker.restart)
        started = time.monotonic()
        second = await bus.publish(topic, b"after")      # waits for the reconnection
        again = await sub.fetch(1, timeout=bus.capabilities.timings.recovery)
        print(f"\nrecovered in {time.monotonic() - started:.2f} s")
        assert [d.id for d in again] == [second.id]


@pytest.mark.fault
async def test_memory_streams_and_consumers_are_recreated_after_a_restart(
        nats_broker: Any, js_url: str, topic: str) -> None:
    # Memory storage loses streams and consumers in a restart: publishing re-creates the
    # stream, the pull loops re-create their consumers (the ephemeral one from where it
    # last heard the server, so nothing published meanwhile is skipped).
    async with unibus.connect(with_query(js_url, "storage=memory")) as bus:
        group = await bus.subscribe(topic, group="g").open()
        ephemeral = await bus.subscribe(topic).open()
        await bus.publish(topic, b"before")
        for sub in (group, ephemeral):
            for delivery in await sub.fetch(1, timeout=bus.capabilities.timings.delivery):
                await delivery.ack()
        await asyncio.to_thread(nats_broker.restart)
        sent = await bus.publish(topic, b"after")
        for sub in (group, ephemeral):
            got = await sub.fetch(1, timeout=bus.capabilities.timings.recovery)
            assert [d.id for d in got] == [sent.id]


@pytest.mark.fault
async def test_publish_during_a_disconnect_waits_for_the_server(nats_broker: Any, js_url: str,
                                                                topic: str) -> None:
    async with unibus.connect(js_url) as bus:
        await bus.declare_group(topic, "g")
        await asyncio.to_thread(nats_broker.stop)
        try:
            publishing = asyncio.create_task(bus.publish(topic, b"while down"))
            await asyncio.sleep(0)
            assert not publishing.done()
        finally:
            await asyncio.to_thread(nats_broker.start)
        sent = await asyncio.wait_for(publishing, bus.capabilities.timings.recovery)
        async with bus.subscribe(topic, group="g") as sub:
            got = await sub.fetch(1, timeout=bus.capabilities.timings.delivery)
        assert [d.id for d in got] == [sent.id]


@pytest.mark.fault
async def test_publish_fails_typed_when_the_server_stays_down(nats_broker: Any, js_url: str,
                                                              topic: str) -> None:
    async with unibus.connect(with_query(js_url, "retry_for=1")) as bus:
        await bus.publish(topic, b"stream exists")
        await asyncio.to_thread(nats_broker.stop)
        try:
            started = time.monotonic()
            with pytest.raises(PublishFailed) as info:
                await bus.publish_many(topic, [b"a", b"b"])
            assert len(info.value.message_ids) == 2
            assert time.monotonic() - started < 10
        finally:
            await asyncio.to_thread(nats_broker.start)


async def test_emulated_delay_is_never_early(js_url: str, topic: str) -> None:
    async with unibus.connect(with_query(js_url, "delayed=emulated")) as bus:
        assert bus.capabilities.delayed_delivery is unibus.Support.EMULATED
        async with bus.subscribe(topic, group="g") as sub:
            # The delay runs from the publish call, so the due time is taken before it:
            # the first publish to a topic also creates its stream, which can take longer
            # than any tolerance here. The 1 ms covers the header's microsecond rounding.
            before = time.time()
            sent = await bus.publish(topic, b"later", delay=1.0)
            due = before + 1.0 - 0.001
            got = await sub.fetch(1, timeout=1.0 + bus.capabilities.timings.delay_slack + 1)
            arrived = time.time()
        assert [d.id for d in got] == [sent.id]
        assert arrived >= due


async def test_a_reject_the_dead_letter_topic_refuses_leaves_the_delivery_to_settle_again(
        js_url: str, topic: str) -> None:
    async with unibus.connect(js_url) as bus:
        async with bus.subscribe(topic, group="g", dead_letter=f"{topic}-dlq") as sub:
            sent = await bus.publish(topic, b"poison")
            [held] = await sub.fetch(1, timeout=5)

            async def refuse(_topic: str, messages: Any) -> None:
                raise PublishFailed("the dead-letter stream refused it (test)",
                                    message_ids=tuple(m.id for m in messages))

            sub._consumer._publish = refuse   # type: ignore[attr-defined]
            with pytest.raises(PublishFailed):
                await held.reject()
            # Unsettled, still this consumer's (not given back): settled again, here.
            assert not held.settled
            await held.ack()
            redelivery = bus.capabilities.timings.redelivery
            assert await sub.fetch(1, timeout=redelivery + 1) == []
        assert held.id == sent.id


async def test_group_server_cap_follows_the_largest_prefetch(js_url: str, topic: str) -> None:
    async with unibus.connect(js_url) as bus:
        async with bus.subscribe(topic, group="g", prefetch=500):
            adapter = bus.adapter
            assert isinstance(adapter, JetStreamAdapter)
            info = await adapter.conn.nc.jetstream().consumer_info(adapter.stream(topic), "g")
        assert info.config.max_ack_pending == 8 * 500
        assert info.config.ack_wait == 2


async def test_core_nack_is_unsupported_and_nothing_is_retained(core_url: str,
                                                                topic: str) -> None:
    async with unibus.connect(core_url) as bus:
        await bus.declare_group(topic, "g")
        await bus.publish(topic, b"nobody listens")          # gone: no retention
        async with bus.subscribe(topic, group="g") as sub:
            sent = await bus.publish(topic, b"live")
            got = await sub.fetch(10, timeout=bus.capabilities.timings.delivery)
            assert [d.id for d in got] == [sent.id]
            with pytest.raises(UnsupportedFeature):
                await got[0].nack()
            await got[0].ack()
        with pytest.raises(UnsupportedFeature):
            await bus.publish(topic, b"x", delay=1)
        with pytest.raises(UnsupportedFeature):
            await bus.subscribe(topic, group="g", dead_letter="dlq").open()


@pytest.fixture(scope="module")
def auth_server() -> Any:
    """A second NATS server that requires user ``unibus`` / password ``s3cret-pw``."""
    import dataclasses

    from unibus_contract.provision import (
        NATS,
        ContainerConfig,
        brokers_required,
        docker_unavailable_reason,
        engine_info,
        launch,
        network_mode,
    )

    reason = docker_unavailable_reason()
    if reason is not None:
        if brokers_required():
            pytest.fail(f"{reason}; UNIBUS_REQUIRE_BROKERS=1 makes this a failure")
        pytest.skip(f"{reason}; set UNIBUS_REQUIRE_BROKERS=1 to fail instead of skipping")
    base = NATS.configure

    def configure(layout: Any) -> Any:
        command = base(layout).command or ()
        return ContainerConfig(command=(*command, "--user", "unibus", "--pass", "s3cret-pw"))

    spec = dataclasses.replace(NATS, name="nats-auth", configure=configure,
                               url_template=NATS.url_template.replace(
                                   "nats://", "nats://unibus:s3cret-pw@"))
    broker = launch(spec, mode=network_mode(has_bridge=engine_info().has_bridge))
    try:
        yield broker
    finally:
        broker.close()


@pytest.mark.parametrize("scheme", ["nats", "nats+core"])
async def test_wrong_password_fails_at_once_with_authentication_failed(
        auth_server: Any, scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    good = str(auth_server.url).replace("nats://", f"{scheme}://", 1)
    async with unibus.connect(good) as bus:
        await bus.publish("auth.check", b"ok")
    bad = good.replace("s3cret-pw", "wrong-pw-123")
    started = time.monotonic()
    with pytest.raises(unibus.AuthenticationFailed) as info:
        await unibus.connect(bad).open()
    assert time.monotonic() - started < 5
    assert "wrong-pw-123" not in str(info.value) + caplog.text
    assert "s3cret-pw" not in caplog.text


async def test_flush_writes_the_buffered_commands_before_its_ping(nats_broker: Any,
                                                                  topic: str) -> None:
    # nats-py's own flush writes its PING straight to the socket, ahead of commands
    # still waiting in its write buffer: its PONG would prove nothing about them.
    import nats

    from unibus_nats import _wire as wire

    nc = await nats.connect(nats_broker.url)
    try:
        written: list[bytes] = []
        transport = nc._transport
        assert transport is not None
        write, writelines = transport.write, transport.writelines

        def record(data: bytes) -> None:
            written.append(bytes(data))
            write(data)

        def record_lines(lines: list[bytes]) -> None:
            written.extend(bytes(line) for line in lines)
            writelines(lines)

        setattr(transport, "write", record)  # noqa: B010 - recording this one instance
        setattr(transport, "writelines", record_lines)  # noqa: B010
        await nc.publish(topic, b"buffered")
        await wire.flush(nc, 2)
        sent = b"".join(written)
        assert sent.index(f"PUB {topic} ".encode()) < sent.index(b"PING\r\n")
    finally:
        await nc.close()


async def test_core_publish_then_attach_never_delivers_the_earlier_message(
        core_url: str) -> None:
    # publish() returns once the server has read the message, so a member attaching
    # afterwards (on another connection) cannot receive it. The publisher's later
    # message would arrive after it if it did (one connection keeps order).
    async with unibus.connect(core_url) as publisher, unibus.connect(core_url) as consumer:
        for attempt in range(40):
            topic = f"t.attach-{attempt}.{time.monotonic_ns()}"
            await publisher.publish(topic, b"before")
            async with consumer.subscribe(topic, group="g") as sub:
                live = await publisher.publish(topic, b"live")
                got = await sub.fetch(1, timeout=consumer.capabilities.timings.delivery)
                assert [d.id for d in got] == [live.id], f"attempt {attempt}"

"""F. Lifecycle and errors: closing, cancelling, unreachable brokers, credentials, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
import uuid
from dataclasses import replace

import pytest

from unibus import (
    App,
    AuthenticationFailed,
    BrokerUnavailable,
    Bus,
    BusClosed,
    Delivery,
    InvalidMessage,
    InvalidName,
    InvalidURL,
    Message,
    UnibusError,
    make_url,
)
from unibus.url import URL
from unibus_contract.context import Contract, keep
from unibus_contract.scenarios._support import SCHEDULING_SLACK, attached, returned_to

pytestmark = pytest.mark.asyncio


# -- F1 -------------------------------------------------------------------------------


@pytest.mark.contract_property("F1")
async def test_closing_the_bus_twice_is_safe_and_ends_a_blocked_iterator(
        contract: Contract) -> None:
    a = await attached(contract)
    first = asyncio.Event()
    received: list[Delivery] = []

    async def consume() -> None:
        async for delivery in a.sub:
            received.append(delivery)
            await delivery.ack()
            first.set()

    consumer = asyncio.create_task(consume())
    await a.bus.publish(a.topic, b"one")
    await asyncio.wait_for(first.wait(), contract.timings.delivery)
    # The iterator is now waiting for a second message that never comes.
    await asyncio.wait_for(a.bus.aclose(), contract.timings.delivery)
    await a.bus.aclose()
    await asyncio.wait_for(consumer, contract.timings.delivery)
    assert len(received) == 1
    assert a.bus.closed
    assert a.sub.closed


@pytest.mark.contract_property("F1")
async def test_closing_a_subscription_returns_a_blocked_fetch_empty(contract: Contract) -> None:
    a = await attached(contract)
    first = asyncio.Event()
    batches: list[int] = []

    async def fetch_until_closed() -> None:
        while batch := await a.sub.fetch(10, timeout=None):
            batches.append(len(batch))
            for delivery in batch:
                await delivery.ack()
            first.set()

    fetcher = asyncio.create_task(fetch_until_closed())
    await a.bus.publish(a.topic, b"one")
    await asyncio.wait_for(first.wait(), contract.timings.delivery)
    await asyncio.wait_for(a.sub.aclose(), contract.timings.delivery)
    await asyncio.wait_for(fetcher, contract.timings.delivery)
    assert batches == [1]


@pytest.mark.contract_property("F1")
async def test_a_closed_subscription_ends_iteration_and_the_bus_stays_usable(
        contract: Contract) -> None:
    a = await attached(contract)
    await a.sub.aclose()
    await a.sub.aclose()
    assert [d async for d in a.sub] == []
    assert await a.sub.fetch(10, timeout=contract.quiet_window) == []
    other = await contract.subscribe(a.bus, a.topic, group=contract.group())
    sent = await a.bus.publish(a.topic, b"still open")
    assert (await contract.collect(other, 1)).ids == [sent.id]


# -- F2 -------------------------------------------------------------------------------


@pytest.mark.contract_property("F2")
async def test_publish_and_subscribe_after_close_raise_bus_closed(contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    pending = bus.subscribe(topic, group=contract.group())
    await bus.aclose()
    with pytest.raises(BusClosed):
        await bus.publish(topic, b"x")
    with pytest.raises(BusClosed):
        await bus.publish_many(topic, [b"x", Message(b"y")])
    with pytest.raises(BusClosed):
        await bus.declare_group(topic, contract.group())
    with pytest.raises(BusClosed):
        bus.subscribe(topic, group=contract.group())
    with pytest.raises(BusClosed):
        await pending.open()
    with pytest.raises(BusClosed):
        await bus.open()


@pytest.mark.contract_property("F2")
async def test_a_bus_closed_before_it_opened_refuses_everything(contract: Contract) -> None:
    bus = contract.new_bus()
    await bus.aclose()
    with pytest.raises(BusClosed):
        await bus.open()
    with pytest.raises(BusClosed):
        await bus.publish(contract.topic(), b"x")
    with pytest.raises(BusClosed):
        bus.subscribe(contract.topic())


# -- F3 -------------------------------------------------------------------------------


@pytest.mark.contract_property("F3")
async def test_a_cancelled_handler_settles_nothing_and_its_message_comes_back(
        contract: Contract) -> None:
    publisher = await contract.bus()
    topic, group = contract.topic(), contract.group()
    sub = await contract.subscribe(await contract.bus(), topic, group=group)
    received: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        async for delivery in sub:
            received.set_result(delivery)
            await asyncio.Event().wait()   # mid-way through the work, forever

    task = asyncio.create_task(handler())
    sent = await publisher.publish(topic, b"interrupted")
    delivery = await asyncio.wait_for(received, contract.timings.delivery)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not delivery.settled
    await sub.aclose()
    successor = await contract.subscribe(await contract.bus(), topic, group=group)
    got = await returned_to(contract, successor, 1,
                            absence="redelivery=False: the message of a cancelled handler is "
                                    "not redelivered (asserted: it was not settled either)")
    if got is None:
        return
    assert got.ids == [sent.id], "the message of a cancelled handler did not come back"


@pytest.mark.contract_property("F3")
async def test_a_cancelled_fetch_loses_no_message(contract: Contract) -> None:
    a = await attached(contract)
    for round_ in range(3):
        # wait_for cancels the fetch while it is blocked on an empty group.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.sub.fetch(10, timeout=None), contract.quiet_window / 10)
        sent = await a.bus.publish(a.topic, f"after cancel {round_}".encode())
        got = await contract.collect(a.sub, 1)
        assert got.ids == [sent.id], "a cancelled fetch swallowed the next message"


@pytest.mark.contract_property("F3")
async def test_an_app_handler_cancelled_at_shutdown_settles_nothing(contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    started = asyncio.Event()
    app = App(bus, shutdown_timeout=0)

    @app.handler(topic, group=group)
    async def never_finishes(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    async with app:
        sent = await bus.publish(topic, b"cut short")
        await asyncio.wait_for(started.wait(), contract.timings.delivery)
    assert app.stats.acked == app.stats.failed == app.stats.rejected == 0
    successor = await contract.subscribe(bus, topic, group=group)
    got = await returned_to(contract, successor, 1,
                            absence="redelivery=False: a cancelled handler's message is not "
                                    "redelivered")
    if got is None:
        return
    assert got.ids == [sent.id]


# -- F4 -------------------------------------------------------------------------------


async def _assert_unavailable_in_time(contract: Contract, url: URL) -> BrokerUnavailable:
    limit = contract.timings.connect_timeout
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(BrokerUnavailable) as caught:
        # The outer bound only turns a hang into a failure instead of a stuck run.
        await asyncio.wait_for(contract.bus(url), limit + 2 * SCHEDULING_SLACK)
    elapsed = loop.time() - start
    assert elapsed <= limit + SCHEDULING_SLACK, (
        f"BrokerUnavailable after {elapsed:.2f}s; the declared connect timeout is {limit}s")
    return caught.value


@pytest.mark.contract_property("F4")
async def test_an_unreachable_broker_raises_broker_unavailable_within_the_connect_timeout(
        contract: Contract) -> None:
    url = contract.unreachable_url()
    await _assert_unavailable_in_time(contract, url)
    # A second attempt fails the same way: nothing was left half-open.
    await _assert_unavailable_in_time(contract, url)


@pytest.mark.contract_property("F4")
async def test_a_peer_that_never_answers_raises_broker_unavailable_within_the_connect_timeout(
        contract: Contract) -> None:
    if not contract.target.network:
        pytest.skip(f"declared absent: {contract.name} has no network, so no peer can "
                    "accept a connection and stay silent")
    async with contract.silent_peer() as port:
        await _assert_unavailable_in_time(contract, contract.target.unreachable(contract.url,
                                                                                port))


# -- F5 -------------------------------------------------------------------------------


@pytest.mark.contract_property("F5")
async def test_bad_credentials_raise_authentication_failed_at_once_and_every_time(
        contract: Contract) -> None:
    secret = f"wrong-{uuid.uuid4().hex}"
    target = contract.target
    if target.wrong_credentials is None:
        await contract.bus(replace(contract.url, username="unibus-contract", password=secret))
        contract.declared_absent(f"no authentication: {target.no_auth_reason} (asserted: any "
                                 "password connects)")
        return
    # Keeps the broker up with its real credentials (memory:// lives while a bus is open).
    await contract.bus()
    bad = target.wrong_credentials(contract.url, secret)
    limit = contract.timings.connect_timeout
    loop = asyncio.get_running_loop()
    for _ in range(2):
        start = loop.time()
        with pytest.raises(AuthenticationFailed):
            await asyncio.wait_for(contract.bus(bad), limit + 2 * SCHEDULING_SLACK)
        elapsed = loop.time() - start
        assert elapsed <= limit + SCHEDULING_SLACK, (
            f"AuthenticationFailed after {elapsed:.2f}s: was it retried?")


# -- F6 -------------------------------------------------------------------------------


@pytest.mark.contract_property("F6")
async def test_misuse_raises_only_unibus_errors(contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    with pytest.raises(InvalidName):
        await bus.publish("not a topic!", b"x")
    with pytest.raises(InvalidMessage):
        await bus.publish(topic, "text, not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage):
        await bus.publish(topic, b"x", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidName):
        bus.subscribe(topic, group="not a group!")
    with pytest.raises(InvalidURL):
        Bus(contract.url.with_query(unibus_contract_no_such_option="1"))
    for exc_type in (InvalidName, InvalidMessage, InvalidURL):
        assert issubclass(exc_type, UnibusError)


@pytest.mark.contract_property("F6")
async def test_closing_under_load_raises_only_unibus_errors(contract: Contract) -> None:
    a = await attached(contract, prefetch=16)
    held: list[Delivery] = []
    received = asyncio.Event()

    async def publish_forever(n: int) -> None:
        i = 0
        while True:
            await a.bus.publish(a.topic, f"p{n}-{i}".encode())
            i += 1
            # An adapter whose publish completes without suspending (memory) would
            # otherwise starve every other task of this loop.
            await asyncio.sleep(0)

    async def consume_forever() -> None:
        while batch := await a.sub.fetch(16, timeout=None):
            received.set()
            for delivery in batch:
                if len(held) < 5:
                    held.append(delivery)
                else:
                    await delivery.ack()

    tasks = [asyncio.create_task(publish_forever(n)) for n in range(5)]
    tasks.append(asyncio.create_task(consume_forever()))
    await asyncio.wait_for(received.wait(), contract.timings.delivery)
    await a.bus.aclose()
    done, pending = await asyncio.wait(tasks, timeout=contract.timings.delivery)
    assert not pending, f"{len(pending)} task(s) still running after the bus closed"
    for task in done:
        exc = task.exception()
        assert exc is None or isinstance(exc, UnibusError), f"{type(exc).__name__}: {exc}"
    for delivery in held:
        # Settling after close may fail, but only with a unibus error.
        with contextlib.suppress(UnibusError):
            await delivery.ack()


# -- F7 -------------------------------------------------------------------------------


def _secret() -> str:
    return f"s3cret-{uuid.uuid4().hex}"


def _with_secret(contract: Contract, secret: str) -> tuple[URL, bool]:
    """A URL carrying ``secret`` as password, and whether it connects."""
    if contract.target.with_password is not None:
        return contract.target.with_password(contract.url, secret), True
    return replace(contract.url, username=contract.url.username or "unibus-contract",
                   password=secret), False


def _unreachable_with(contract: Contract, secret: str) -> URL:
    return replace(contract.unreachable_url(), username="unibus-contract", password=secret)


async def _connect_error(contract: Contract, url: URL) -> UnibusError:
    """The error of a connect that must fail (which error is F4's business, not F7's)."""
    with pytest.raises(UnibusError) as caught:
        await asyncio.wait_for(contract.bus(url),
                               contract.timings.connect_timeout + 2 * SCHEDULING_SLACK)
    return caught.value


def _exposed(secret: str, *texts: object) -> list[str]:
    return [str(t)[:200] for t in texts if secret in str(t)]


def _exception_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc)), *map(str, exc.args)]


@pytest.mark.contract_property("F7")
async def test_passwords_never_appear_in_repr_or_str(contract: Contract) -> None:
    secret = _secret()
    url, connects = _with_secret(contract, secret)
    bus = contract.new_bus(url)
    texts: list[object] = [url, repr(url), url.render(), bus, repr(bus), repr(bus.adapter),
                           bus.capabilities, repr(make_url(url.render(hide_password=False)))]
    if connects:
        await bus.open()
        topic = contract.topic()
        sub = await contract.subscribe(bus, topic, group=contract.group())
        await bus.publish(topic, b"x")
        delivery = (await contract.collect(sub, 1)).deliveries[0]
        texts += [repr(bus), repr(sub), repr(delivery), repr(delivery.message)]
        await bus.aclose()
        texts.append(repr(bus))
    assert _exposed(secret, *texts) == []


@pytest.mark.contract_property("F7")
async def test_passwords_never_appear_in_error_messages(contract: Contract) -> None:
    secret = _secret()
    url, _ = _with_secret(contract, secret)
    errors: list[BaseException] = []
    with pytest.raises(InvalidURL) as bad_option:
        Bus(url.with_query(unibus_contract_no_such_option="1"))
    errors.append(bad_option.value)
    with pytest.raises(InvalidURL) as bad_port:
        make_url(f"{url.scheme}://user:{secret}@127.0.0.1:99999")
    errors.append(bad_port.value)
    errors.append(await _connect_error(contract, _unreachable_with(contract, secret)))
    if contract.target.wrong_credentials is not None:
        await contract.bus()
        with pytest.raises(AuthenticationFailed) as refused:
            await contract.bus(contract.target.wrong_credentials(contract.url, secret))
        errors.append(refused.value)
    leaks = [leak for exc in errors for leak in _exposed(secret, *_exception_texts(exc))]
    assert leaks == []


@pytest.mark.contract_property("F7")
async def test_passwords_never_appear_in_log_records(contract: Contract,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = _secret()
    url, connects = _with_secret(contract, secret)
    if connects:
        bus = await contract.bus(url)
        topic, group = contract.topic(), contract.group()
        app = App(bus, shutdown_timeout=contract.timings.delivery)
        failed = asyncio.Event()

        @app.handler(topic, group=group, retry=None, dead_letter=True)
        async def fails(delivery: Delivery) -> None:
            failed.set()
            raise RuntimeError(f"failure while connected to {bus.url}")

        async with app:
            await bus.publish(topic, b"x")
            await asyncio.wait_for(failed.wait(), contract.timings.delivery)
        await bus.aclose()
    await _connect_error(contract, _unreachable_with(contract, secret))
    if contract.target.wrong_credentials is not None:
        await contract.bus()
        with pytest.raises(AuthenticationFailed):
            await contract.bus(contract.target.wrong_credentials(contract.url, secret))
    leaks: list[str] = []
    for record in caplog.records:
        texts: list[object] = [record.getMessage(), record.args]
        if record.exc_info and record.exc_info[1] is not None:
            texts += _exception_texts(record.exc_info[1])
        leaks += _exposed(secret, *texts)
    assert leaks == []


# -- F8 -------------------------------------------------------------------------------


@pytest.mark.contract_property("F8")
async def test_graceful_shutdown_finishes_in_flight_handlers_and_loses_nothing(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    concurrency = 4
    app = App(bus, shutdown_timeout=10 * contract.timings.delivery)
    in_flight: set[str] = set()
    finished: list[str] = []
    all_busy = asyncio.Event()
    release = asyncio.Event()

    @app.handler(topic, group=group, concurrency=concurrency, prefetch=2 * concurrency)
    async def slow(delivery: Delivery) -> None:
        in_flight.add(delivery.id)
        if len(in_flight) == concurrency:
            # Stopping from a handler: the App begins its shutdown before any
            # handler can finish, so exactly these four are in flight.
            app.stop()
            all_busy.set()
        await release.wait()
        finished.append(delivery.id)

    async with app:
        sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(20)])
        await asyncio.wait_for(all_busy.wait(), contract.timings.delivery)
        release.set()
    assert sorted(finished) == sorted(in_flight), "in-flight handlers did not finish"
    assert app.stats.acked == len(finished), "finished handlers were not all acked"
    rest = [m.id for m in sent if m.id not in set(finished)]
    successor = await contract.subscribe(bus, topic, group=group)
    window = contract.timings.redelivery + contract.timings.delivery
    caps = contract.capabilities
    if not (caps.redelivery and caps.group_retention):
        contract.declared_absent(
            f"redelivery={caps.redelivery}, group_retention={caps.group_retention}: messages "
            "not yet handled at shutdown are not kept (asserted: in-flight handlers finished "
            "and were acked)")
        return
    got = await contract.collect(successor, len(rest), timeout=window, handle=keep)
    assert got.missing(rest) == [], "messages not handled before the shutdown were lost"
    assert not set(got.ids) & set(finished), "handled messages were delivered again"

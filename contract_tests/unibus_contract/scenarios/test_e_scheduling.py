"""E. Scheduling: delayed delivery, retry with backoff and dead letters, dedup."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from unibus import App, Delivery, Message, Retry, UnsupportedFeature
from unibus_contract.context import Contract
from unibus_contract.scenarios._support import SCHEDULING_SLACK, attached, sentinel_then_quiet

pytestmark = pytest.mark.asyncio

#: The delay the scenarios ask for: long enough that "early" is measurable.
DELAY = 1.0


async def _declared_no_delay(contract: Contract) -> bool:
    """Assert the declared failure of a delayed publish; True when delays are absent."""
    if contract.capabilities.delayed_delivery:
        return False
    a = await attached(contract)
    with pytest.raises(UnsupportedFeature):
        await a.bus.publish(a.topic, b"later", delay=DELAY)
    with pytest.raises(UnsupportedFeature):
        await a.bus.publish(a.topic, b"later", not_before=datetime.now(UTC) + timedelta(
            seconds=DELAY))
    assert (await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)).ids == []
    contract.declared_absent("delayed_delivery=absent: publish(delay=...) raises "
                             "UnsupportedFeature and sends nothing")
    return True


@pytest.mark.contract_property("E1")
async def test_a_delayed_message_never_arrives_early_and_arrives_within_the_slack(
        contract: Contract) -> None:
    if await _declared_no_delay(contract):
        return
    a = await attached(contract)
    loop = asyncio.get_running_loop()
    before = loop.time()
    delayed = await a.bus.publish(a.topic, b"delayed", delay=DELAY)
    published = loop.time()
    immediate = await a.bus.publish(a.topic, b"immediate")
    slack = contract.timings.delay_slack
    got = await contract.collect(a.sub, 2, timeout=DELAY + slack + contract.timings.delivery)
    assert got.ids == [immediate.id, delayed.id], "the delayed message was not overtaken"
    arrived = got.arrivals[1].at
    assert arrived - before >= DELAY, f"arrived {arrived - before:.3f}s after a {DELAY}s delay"
    assert arrived - published <= DELAY + slack + SCHEDULING_SLACK, (
        f"arrived {arrived - published:.3f}s after publish; declared slack is {slack}s")


@pytest.mark.contract_property("E1")
async def test_a_message_with_not_before_is_not_delivered_before_that_time(
        contract: Contract) -> None:
    if await _declared_no_delay(contract):
        return
    a = await attached(contract)
    not_before = datetime.now(UTC) + timedelta(seconds=DELAY)
    sent = await a.bus.publish(a.topic, b"at a time", not_before=not_before)
    slack = contract.timings.delay_slack
    got = await contract.collect(a.sub, 1, timeout=DELAY + slack + contract.timings.delivery)
    received_at = datetime.now(UTC)
    assert got.ids == [sent.id]
    assert received_at >= not_before, f"arrived {not_before - received_at} early"
    assert received_at <= not_before + timedelta(seconds=slack + SCHEDULING_SLACK)


@pytest.mark.contract_property("E1")
async def test_a_delayed_batch_arrives_whole_and_not_early(contract: Contract) -> None:
    if await _declared_no_delay(contract):
        return
    a = await attached(contract)
    loop = asyncio.get_running_loop()
    before = loop.time()
    sent = await a.bus.publish_many(a.topic, [Message(f"m{i}".encode(), key="lane")
                                              for i in range(5)], delay=DELAY)
    slack = contract.timings.delay_slack
    got = await contract.collect(a.sub, len(sent),
                                 timeout=DELAY + slack + contract.timings.delivery)
    assert got.missing([m.id for m in sent]) == []
    assert min(a.at for a in got.arrivals) - before >= DELAY


@pytest.mark.contract_property("E2")
async def test_a_delayed_message_survives_a_consumer_restart(contract: Contract) -> None:
    if await _declared_no_delay(contract):
        return
    publisher = await contract.bus()
    topic, group = contract.topic(), contract.group()
    consumer_bus = await contract.bus()
    await contract.subscribe(consumer_bus, topic, group=group)
    loop = asyncio.get_running_loop()
    before = loop.time()
    sent = await publisher.publish(topic, b"after the restart", delay=DELAY)
    await consumer_bus.aclose()
    restarted = await contract.subscribe(await contract.bus(), topic, group=group)
    if not contract.capabilities.group_retention:
        assert (await contract.collect(restarted, 1, timeout=DELAY + contract.quiet_window)
                ).ids == []
        contract.declared_absent("group_retention=False: a delayed message for a detached "
                                 "group is not kept")
        return
    got = await contract.collect(restarted, 1, timeout=DELAY + contract.timings.delay_slack
                                 + contract.timings.delivery)
    assert got.ids == [sent.id], "the delayed message was lost with its consumer"
    assert got.arrivals[0].at - before >= DELAY


def _retry_absences(contract: Contract) -> list[str]:
    caps = contract.capabilities
    if not caps.redelivery:
        return ["redelivery=False: the App cannot retry; it dead-letters after the first "
                "failure"]
    if not caps.nack_delay:
        return ["nack_delay=absent: the App retries at once, without backoff"]
    return []


@pytest.mark.contract_property("E3")
async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    retry = Retry(max_attempts=3, backoff=0.2, max_backoff=1.0, jitter=0.0)
    absences = _retry_absences(contract)
    expected_calls = 1 if not contract.capabilities.redelivery else retry.max_attempts
    loop = asyncio.get_running_loop()
    calls: list[tuple[int, float]] = []
    app = App(bus, shutdown_timeout=contract.timings.delivery)

    @app.handler(topic, group=group, retry=retry, dead_letter=True)
    async def always_fails(delivery: Delivery) -> None:
        calls.append((delivery.attempt, loop.time()))
        raise RuntimeError("handler failed on purpose")

    dead_topic = f"{topic}.{group}.dlq"
    async with app:
        dead = await contract.subscribe(bus, dead_topic, group=group)
        sent = await bus.publish(topic, b"doomed", headers={"origin": "contract"})
        budget = (contract.timings.delivery + retry.max_backoff * retry.max_attempts
                  + contract.timings.redelivery * retry.max_attempts)
        got = await contract.collect(dead, 1, timeout=budget)
        assert got.ids == [sent.id], "the message was not dead-lettered"
        more = await contract.collect_for(dead)
    assert more.ids == []
    assert [attempt for attempt, _ in calls] == list(range(1, expected_calls + 1))
    if not absences:
        for n in range(1, len(calls)):
            waited = calls[n][1] - calls[n - 1][1]
            assert waited >= retry.delay(n), (
                f"retry {n} came after {waited:.3f}s, before its {retry.delay(n)}s backoff")
    letter = got.deliveries[0]
    assert letter.body == b"doomed"
    assert letter.headers["origin"] == "contract"
    assert "handler failed on purpose" in letter.headers["unibus-error"]
    assert letter.headers["unibus-attempts"] == str(expected_calls)
    # Dead-lettered means settled: the original does not come back to its group.
    again = await contract.subscribe(bus, topic, group=group)
    assert (await sentinel_then_quiet(contract, bus, topic, again)).ids == []
    for reason in absences:
        contract.declared_absent(reason)


@pytest.mark.contract_property("E3")
async def test_a_handler_that_recovers_is_not_dead_lettered(contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    if not contract.capabilities.redelivery:
        pytest.skip("declared absent: redelivery=False, so the App cannot retry a handler "
                    "(the dead-letter path is asserted by the scenario above)")
    retry = Retry(max_attempts=3, backoff=0.1, max_backoff=0.1, jitter=0.0)
    attempts: list[int] = []
    recovered = asyncio.Event()
    app = App(bus, shutdown_timeout=contract.timings.delivery)

    @app.handler(topic, group=group, retry=retry, dead_letter=True)
    async def fails_once(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise RuntimeError("transient")
        recovered.set()

    async with app:
        dead = await contract.subscribe(bus, f"{topic}.{group}.dlq", group=group)
        await bus.publish(topic, b"flaky")
        await asyncio.wait_for(recovered.wait(), contract.timings.delivery + retry.max_backoff
                               + contract.timings.redelivery)
    # The App stopped gracefully: the handler that returned has been acked.
    assert app.stats.acked == 1
    assert (await contract.collect_for(dead)).ids == []
    assert attempts == [1, 2]
    assert app.stats.dead_lettered == 0
    for reason in _retry_absences(contract):
        contract.declared_absent(reason)


@pytest.mark.contract_property("E4")
async def test_a_repeated_message_id_inside_the_dedup_window_is_delivered_as_declared(
        contract: Contract) -> None:
    a = await attached(contract)
    first = await a.bus.publish(a.topic, b"once", id=f"dedup-{a.topic}")
    again = await a.bus.publish(a.topic, b"once", id=first.id)
    assert again.id == first.id
    got = await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)
    assert got.ids == [first.id]
    window = contract.capabilities.dedup_window
    if window is not None:
        assert got.count(first.id) == 1, (
            f"dedup_window={window}s, but a repeated id was delivered {got.count(first.id)}x")
        return
    assert got.count(first.id) == 2, "dedup_window=None, yet a repeated id was dropped"
    contract.declared_absent("dedup_window=None: a repeated message id is delivered again")

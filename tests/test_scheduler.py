"""The scheduler (``unibus.App`` and ``unibus.Retry``) on the memory broker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence

import pytest

import unibus
from unibus.scheduler import ERROR_HEADERS

TOPIC = "orders"
GROUP = "billing"


@pytest.fixture
async def bus(memory_url: str) -> AsyncIterator[unibus.Bus]:
    async with unibus.connect(memory_url) as bus:
        await bus.declare_group(TOPIC, GROUP)
        yield bus


def timings(bus: unibus.Bus) -> unibus.Timings:
    return bus.capabilities.timings


async def drain(bus: unibus.Bus, topic: str, group: str, *,
                ack: bool = True) -> list[unibus.Delivery]:
    """Everything ``group`` holds on ``topic``, waiting the declared redelivery bound."""
    out: list[unibus.Delivery] = []
    async with bus.subscribe(topic, group=group, prefetch=1000) as sub:
        while batch := await sub.fetch(1000, timings(bus).redelivery):
            for delivery in batch:
                out.append(delivery)
                if ack:
                    await delivery.ack()
    return out


async def publish(bus: unibus.Bus, count: int, topic: str = TOPIC) -> list[unibus.Message]:
    return await bus.publish_many(topic, [f"m{i}".encode() for i in range(count)])


class Counter:
    """Counts calls and sets ``reached`` when ``target`` is hit."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.reached = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


# ---------------------------------------------------------------------------- Retry


def test_retry_delay_is_capped_exponential_backoff_without_jitter() -> None:
    retry = unibus.Retry(max_attempts=10, backoff=0.5, max_backoff=3.0, jitter=0.0)
    assert [retry.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_retry_jitter_only_shortens_the_delay_by_at_most_its_fraction() -> None:
    retry = unibus.Retry(backoff=1.0, max_backoff=8.0, jitter=0.25)
    samples = [retry.delay(3) for _ in range(500)]
    assert all(3.0 <= s <= 4.0 for s in samples)
    assert len(set(samples)) > 1


def test_retry_delay_stays_capped_for_huge_attempt_numbers() -> None:
    retry = unibus.Retry(backoff=0.5, max_backoff=30.0, jitter=0.0)
    assert retry.delay(100_000) == 30.0


def test_retry_defaults_match_the_documented_policy() -> None:
    assert unibus.Retry() == unibus.Retry(max_attempts=5, backoff=0.5, max_backoff=30.0,
                                          jitter=0.5)


@pytest.mark.parametrize("kwargs", [
    {"max_attempts": 0}, {"max_attempts": 1.5}, {"max_attempts": True}, {"backoff": -1},
    {"backoff": float("nan")}, {"max_backoff": float("inf")}, {"backoff": 5, "max_backoff": 1},
    {"jitter": 1.5}, {"jitter": -0.1},
])
def test_retry_rejects_out_of_range_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        unibus.Retry(**kwargs)  # type: ignore[arg-type]


def test_retry_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        unibus.Retry().delay(0)


# --------------------------------------------------------------------- registration


async def test_handler_registration_validates_its_arguments(bus: unibus.Bus) -> None:
    app = unibus.App(bus)

    async def handle(delivery: unibus.Delivery) -> None: ...

    with pytest.raises(ValueError, match="concurrency"):
        app.handler(TOPIC, group=GROUP, concurrency=0)
    with pytest.raises(ValueError, match="prefetch"):
        app.handler(TOPIC, group=GROUP, prefetch=0)
    with pytest.raises(unibus.InvalidName):
        app.handler("bad topic", group=GROUP)
    with pytest.raises(unibus.InvalidName):
        app.handler(TOPIC, group=GROUP, dead_letter="no spaces allowed")
    with pytest.raises(ValueError, match="itself"):
        app.handler(TOPIC, group=GROUP, dead_letter=TOPIC)
    with pytest.raises(TypeError, match="Retry"):
        app.handler(TOPIC, group=GROUP, retry=3)  # type: ignore[arg-type]

    def not_async(delivery: unibus.Delivery) -> None: ...

    with pytest.raises(TypeError, match="async"):
        app.handler(TOPIC, group=GROUP)(not_async)  # type: ignore[type-var]
    app.handler(TOPIC, group=GROUP)(handle)
    with pytest.raises(ValueError, match="already registered"):
        app.handler(TOPIC, group=GROUP)(handle)


async def test_run_without_handlers_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(RuntimeError, match="no handlers"):
        await unibus.App(bus).run()


async def test_an_app_runs_only_once(bus: unibus.Bus) -> None:
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None: ...

    async with app:
        assert app.started.is_set()
        assert not app.stopped.is_set()
    assert app.stopped.is_set()
    with pytest.raises(RuntimeError, match="runs once"):
        await app.run()


def test_app_rejects_a_negative_shutdown_timeout(memory_url: str) -> None:
    with pytest.raises(ValueError, match="shutdown_timeout"):
        unibus.App(memory_url, shutdown_timeout=-1)


# ---------------------------------------------------------------------- processing


async def test_returning_from_the_handler_acks_every_message(bus: unibus.Bus) -> None:
    sent = await publish(bus, 200)
    seen: list[str] = []
    counter = Counter(len(sent))
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, concurrency=4)
    async def handle(delivery: unibus.Delivery) -> None:
        seen.append(delivery.id)
        counter.hit()

    async with app:
        await asyncio.wait_for(counter.reached.wait(), timings(bus).delivery * 5)
    assert sorted(seen) == sorted(m.id for m in sent)
    assert app.stats.acked == len(sent)
    assert app.stats.handled == len(sent)
    assert await drain(bus, TOPIC, GROUP) == []


async def test_a_handler_that_settles_itself_is_not_acked_again(bus: unibus.Bus) -> None:
    await publish(bus, 1)
    done = asyncio.Event()
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, dead_letter=False)
    async def handle(delivery: unibus.Delivery) -> None:
        await delivery.reject()
        done.set()

    async with app:
        await asyncio.wait_for(done.wait(), timings(bus).delivery)
    assert app.stats.acked == 0
    assert app.stats.settle_errors == 0
    assert await drain(bus, TOPIC, GROUP) == []


async def test_app_on_a_url_opens_and_closes_its_own_bus(memory_url: str) -> None:
    async with unibus.connect(memory_url) as keeper:
        await keeper.declare_group(TOPIC, GROUP)
        await publish(keeper, 3)
        counter = Counter(3)
        app = unibus.App(memory_url)

        @app.handler(TOPIC, group=GROUP)
        async def handle(delivery: unibus.Delivery) -> None:
            counter.hit()

        async with app:
            await asyncio.wait_for(counter.reached.wait(), timings(keeper).delivery)
        assert app.bus.closed
        assert not keeper.closed


async def test_app_leaves_a_bus_it_was_given_open(bus: unibus.Bus) -> None:
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None: ...

    async with app:
        pass
    assert not bus.closed
    await bus.publish(TOPIC, b"still usable")


async def test_closing_the_bus_under_the_app_stops_it(bus: unibus.Bus) -> None:
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None: ...

    run = asyncio.create_task(app.run(handle_signals=False))
    await asyncio.wait_for(app.started.wait(), timings(bus).delivery)
    await bus.aclose()
    await asyncio.wait_for(run, timings(bus).delivery)


# ------------------------------------------------------------------- retry and DLQ


async def test_failing_handler_is_called_max_attempts_times_then_dead_lettered_with_error(
        bus: unibus.Bus) -> None:
    sent = await bus.publish(TOPIC, b"\x00poison\xff", key="cust-7",
                             headers={"kind": "created", "trace": "t-1"})
    calls: list[int] = []
    app = unibus.App(bus)
    dlq = f"{TOPIC}.{GROUP}.dlq"
    dead = asyncio.Event()

    @app.handler(TOPIC, group=GROUP, retry=unibus.Retry(max_attempts=3, backoff=0.01,
                                                        max_backoff=0.02, jitter=0.0))
    async def handle(delivery: unibus.Delivery) -> None:
        calls.append(delivery.attempt)
        if delivery.attempt == 3:
            dead.set()
        raise ValueError("bad order\nsecond line " + "x" * 5000)

    async with app:
        await asyncio.wait_for(dead.wait(), timings(bus).delivery * 3)
    assert calls == [1, 2, 3]
    assert app.stats.retried == 2
    assert app.stats.dead_lettered == 1
    letters = await drain(bus, dlq, GROUP)
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.id, letter.key, letter.body) == (sent.id, sent.key, sent.body)
    headers = letter.headers
    assert set(ERROR_HEADERS) <= set(headers)
    assert headers["kind"] == "created"
    assert headers["trace"] == "t-1"
    assert headers["unibus-error"].startswith("bad order second line xxx")
    assert len(headers["unibus-error"]) <= 1024
    assert headers["unibus-error-type"] == "ValueError"
    assert headers["unibus-attempts"] == "3"
    assert headers["unibus-original-topic"] == TOPIC
    assert headers["unibus-original-group"] == GROUP
    assert await drain(bus, TOPIC, GROUP) == []


async def test_dead_letters_go_to_a_named_topic(bus: unibus.Bus) -> None:
    await publish(bus, 1)
    app = unibus.App(bus)
    failed = asyncio.Event()

    @app.handler(TOPIC, group=GROUP, retry=unibus.Retry(max_attempts=1), dead_letter="graveyard")
    async def handle(delivery: unibus.Delivery) -> None:
        failed.set()
        raise KeyError("missing")

    async with app:
        await asyncio.wait_for(failed.wait(), timings(bus).delivery)
    letters = await drain(bus, "graveyard", GROUP)
    assert [d.headers["unibus-error-type"] for d in letters] == ["KeyError"]


async def test_dead_letter_false_rejects_after_the_last_attempt(bus: unibus.Bus) -> None:
    await publish(bus, 1)
    calls = Counter(2)
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, dead_letter=False,
                 retry=unibus.Retry(max_attempts=2, backoff=0.0, max_backoff=0.0))
    async def handle(delivery: unibus.Delivery) -> None:
        calls.hit()
        raise RuntimeError("nope")

    async with app:
        await asyncio.wait_for(calls.reached.wait(), timings(bus).delivery * 2)
    assert calls.count == 2
    assert app.stats.rejected == 1
    assert await drain(bus, TOPIC, GROUP) == []
    assert await drain(bus, f"{TOPIC}.{GROUP}.dlq", GROUP) == []


async def test_retry_is_not_redelivered_before_its_backoff(bus: unibus.Bus) -> None:
    await publish(bus, 1)
    backoff = 0.2
    times: list[float] = []
    third = asyncio.Event()
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, retry=unibus.Retry(max_attempts=3, backoff=backoff,
                                                        max_backoff=10.0, jitter=0.0))
    async def handle(delivery: unibus.Delivery) -> None:
        times.append(time.time())
        if len(times) == 3:
            third.set()
        raise ValueError("again")

    async with app:
        await asyncio.wait_for(third.wait(), 3 * backoff + timings(bus).delay_slack * 3)
    # The broker's "not before" is measured on the wall clock.
    assert times[1] - times[0] >= backoff
    assert times[2] - times[1] >= 2 * backoff


async def test_jittered_retry_waits_at_least_the_unjittered_floor(bus: unibus.Bus) -> None:
    await publish(bus, 1)
    retry = unibus.Retry(max_attempts=2, backoff=0.2, max_backoff=0.2, jitter=0.5)
    times: list[float] = []
    second = asyncio.Event()
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, retry=retry)
    async def handle(delivery: unibus.Delivery) -> None:
        times.append(time.time())
        if len(times) == 2:
            second.set()
        raise ValueError("again")

    async with app:
        await asyncio.wait_for(second.wait(), 0.2 + timings(bus).delay_slack * 3)
    assert times[1] - times[0] >= 0.2 * (1 - retry.jitter)


async def test_a_failed_dead_letter_publish_returns_the_message_and_loses_nothing(
        bus: unibus.Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = await publish(bus, 1)
    real_publish_many = bus.publish_many
    refused: list[str] = []

    async def flaky_publish_many(topic: str, messages: Sequence[unibus.Message]
                                 ) -> list[unibus.Message]:
        if topic.endswith(".dlq") and not refused:
            refused.append(topic)
            raise unibus.PublishFailed("refused", message_ids=tuple(m.id for m in messages))
        return await real_publish_many(topic, messages)

    monkeypatch.setattr(bus, "publish_many", flaky_publish_many)
    calls: list[int] = []
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, retry=unibus.Retry(max_attempts=1, backoff=0.0,
                                                        max_backoff=0.0))
    async def handle(delivery: unibus.Delivery) -> None:
        calls.append(delivery.attempt)
        raise ValueError("poison")

    dlq = f"{TOPIC}.{GROUP}.dlq"
    async with app, bus.subscribe(dlq, group=GROUP) as sub:
        letters = await sub.fetch(10, timings(bus).redelivery * 2)
        for letter in letters:
            await letter.ack()
    assert refused == [dlq]
    # The message came back and failed again; that time its dead letter was accepted.
    assert calls == [1, 2]
    assert [d.id for d in letters] == [sent[0].id]
    assert letters[0].headers["unibus-attempts"] == "2"
    assert await drain(bus, TOPIC, GROUP) == []


async def test_handler_failures_are_logged_with_the_message_id_never_the_password(
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-pw"
    url = f"memory://app:{secret}@{os.urandom(6).hex()}"
    async with unibus.connect(url) as bus:
        await bus.declare_group(TOPIC, GROUP)
        sent = await bus.publish(TOPIC, b"x")
        failed = asyncio.Event()
        app = unibus.App(bus)

        @app.handler(TOPIC, group=GROUP, retry=unibus.Retry(max_attempts=1))
        async def handle(delivery: unibus.Delivery) -> None:
            failed.set()
            raise ValueError("broken")

        with caplog.at_level(logging.INFO, logger="unibus.app"):
            async with app:
                await asyncio.wait_for(failed.wait(), timings(bus).delivery)
    records = [r for r in caplog.records if r.name == "unibus.app"]
    assert any(sent.id in r.getMessage() and r.levelno == logging.ERROR for r in records)
    assert all(secret not in r.getMessage() for r in records)
    assert secret not in caplog.text


# --------------------------------------------------------------------- concurrency


async def test_concurrency_limit_is_reached_and_never_exceeded(bus: unibus.Bus) -> None:
    limit = 4
    await publish(bus, 40)
    active = 0
    peak = 0
    all_busy = asyncio.Event()
    counter = Counter(40)
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, concurrency=limit, prefetch=20)
    async def handle(delivery: unibus.Delivery) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == limit:
            all_busy.set()
        await all_busy.wait()
        # Yield a few times so that a worker beyond the limit, if any, would get in.
        for _ in range(5):
            await asyncio.sleep(0)
        active -= 1
        counter.hit()

    async with app:
        await asyncio.wait_for(counter.reached.wait(), timings(bus).delivery * 5)
    assert peak == limit


async def test_deliveries_of_one_key_are_handled_in_order_one_at_a_time(
        bus: unibus.Bus) -> None:
    keys = [f"k{i}" for i in range(4)]
    sent = await bus.publish_many(TOPIC, [unibus.Message(f"{n}".encode(), key=keys[n % 4])
                                          for n in range(80)])
    order: dict[str, list[str]] = {k: [] for k in keys}
    active_keys: set[str] = set()
    active = 0
    peak = 0
    overlap: list[str] = []
    counter = Counter(len(sent))
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, concurrency=8)
    async def handle(delivery: unibus.Delivery) -> None:
        nonlocal active, peak
        key = delivery.key
        assert key is not None
        if key in active_keys:
            overlap.append(key)
        active_keys.add(key)
        active += 1
        peak = max(peak, active)
        for _ in range(3):
            await asyncio.sleep(0)
        order[key].append(delivery.id)
        active_keys.discard(key)
        active -= 1
        counter.hit()

    async with app:
        await asyncio.wait_for(counter.reached.wait(), timings(bus).delivery * 5)
    assert overlap == []
    assert peak == len(keys)
    for key in keys:
        assert order[key] == [m.id for m in sent if m.key == key]


async def test_a_broker_failure_while_fetching_stops_the_app_and_is_raised(
        bus: unibus.Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken_fetch(self: unibus.Subscription, max_count: int | None = None,
                           timeout: float | None = None) -> list[unibus.Delivery]:
        raise unibus.BrokerUnavailable("connection lost")

    monkeypatch.setattr(unibus.Subscription, "fetch", broken_fetch)
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None: ...

    with pytest.raises(unibus.BrokerUnavailable, match="connection lost"):
        await asyncio.wait_for(app.run(handle_signals=False), timings(bus).delivery)
    assert app.stopped.is_set()


async def test_a_failing_message_does_not_block_the_others(bus: unibus.Bus) -> None:
    sent = await publish(bus, 20)
    poison = sent[0].id
    good = Counter(19)
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, retry=unibus.Retry(max_attempts=50, backoff=5.0,
                                                        max_backoff=5.0))
    async def handle(delivery: unibus.Delivery) -> None:
        if delivery.id == poison:
            raise ValueError("poison")
        good.hit()

    async with app:
        # All others are done long before the poison message's first backoff ends.
        await asyncio.wait_for(good.reached.wait(), timings(bus).delivery)
    assert app.stats.acked == 19


# ------------------------------------------------------------------------ shutdown


async def test_graceful_shutdown_drains_in_flight_and_returns_unstarted_ones(
        bus: unibus.Bus) -> None:
    sent = await publish(bus, 10)
    in_flight = Counter(2)
    release = asyncio.Event()
    finished: list[str] = []
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP, concurrency=2, prefetch=10)
    async def handle(delivery: unibus.Delivery) -> None:
        in_flight.hit()
        await release.wait()
        finished.append(delivery.id)

    run = asyncio.create_task(app.run(handle_signals=False))
    await asyncio.wait_for(in_flight.reached.wait(), timings(bus).delivery)
    app.stop()
    # Shutdown waits for the two in-flight handlers; let them finish now.
    await asyncio.sleep(0)
    assert not run.done()
    release.set()
    await asyncio.wait_for(run, timings(bus).delivery)
    assert len(finished) == 2
    assert app.stats.acked == 2
    rest = await drain(bus, TOPIC, GROUP)
    assert sorted([d.id for d in rest] + finished) == sorted(m.id for m in sent)


async def test_shutdown_timeout_cancels_stuck_handlers_and_their_message_comes_back(
        bus: unibus.Bus) -> None:
    sent = await publish(bus, 1)
    entered = asyncio.Event()
    cancelled = asyncio.Event()
    app = unibus.App(bus, shutdown_timeout=0.05)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with app:
        await asyncio.wait_for(entered.wait(), timings(bus).delivery)
    assert cancelled.is_set()
    assert app.stats.acked == app.stats.failed == app.stats.retried == 0
    back = await drain(bus, TOPIC, GROUP)
    assert [d.id for d in back] == [sent[0].id]


async def test_sigterm_shuts_the_app_down_gracefully(bus: unibus.Bus) -> None:
    await publish(bus, 1)
    entered = asyncio.Event()
    release = asyncio.Event()
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None:
        entered.set()
        await release.wait()

    before = signal.getsignal(signal.SIGTERM)
    run = asyncio.create_task(app.run())
    await asyncio.wait_for(app.started.wait(), timings(bus).delivery)
    await asyncio.wait_for(entered.wait(), timings(bus).delivery)
    os.kill(os.getpid(), signal.SIGTERM)
    # The graceful shutdown waits for the in-flight handler.
    await asyncio.wait_for(app._stop.wait(), timings(bus).delivery)
    assert not run.done()
    release.set()
    await asyncio.wait_for(run, timings(bus).delivery)
    assert app.stats.acked == 1
    assert signal.getsignal(signal.SIGTERM) == before
    assert await drain(bus, TOPIC, GROUP) == []


async def test_cancelling_run_cancels_handlers_and_settles_nothing(bus: unibus.Bus) -> None:
    sent = await publish(bus, 1)
    entered = asyncio.Event()
    app = unibus.App(bus)

    @app.handler(TOPIC, group=GROUP)
    async def handle(delivery: unibus.Delivery) -> None:
        entered.set()
        await asyncio.Event().wait()

    run = asyncio.create_task(app.run(handle_signals=False))
    await asyncio.wait_for(entered.wait(), timings(bus).delivery)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    back = await drain(bus, TOPIC, GROUP)
    assert [d.id for d in back] == [sent[0].id]

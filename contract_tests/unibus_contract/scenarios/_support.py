"""Small building blocks the scenarios share."""

from __future__ import annotations

from dataclasses import dataclass

from unibus import Bus, Ordering, Subscription
from unibus_contract.context import Collected, Contract, Handler, ack

__all__ = ["SCHEDULING_SLACK", "Attached", "attached", "returned_to", "sentinel_then_quiet"]

#: Allowance for the test's own event loop when comparing an elapsed time with a
#: declared bound (task switches, the collector's polling). Never used to make an
#: early delivery pass: lower bounds are asserted exactly.
SCHEDULING_SLACK = 0.25


@dataclass(frozen=True, slots=True)
class Attached:
    """A bus with a consumer attached in a fresh group on a fresh topic."""

    bus: Bus
    topic: str
    group: str
    sub: Subscription


async def attached(contract: Contract, *, prefetch: int = 64, label: str = "t") -> Attached:
    """Open a bus and attach one consumer in a fresh group to a fresh topic.

    Consumers attach before anything is published, so these scenarios hold on
    brokers without retention too.
    """
    bus = await contract.bus()
    topic, group = contract.topic(label), contract.group(label)
    sub = await contract.subscribe(bus, topic, group=group, prefetch=prefetch)
    return Attached(bus, topic, group, sub)


async def sentinel_then_quiet(contract: Contract, bus: Bus, topic: str,
                              subs: Subscription | list[Subscription], *,
                              handle: Handler = ack) -> Collected:
    """Publish a sentinel and collect until it arrives, then watch a quiet window.

    The sentinel is the barrier: where a single consumer sees total publish order
    (``Ordering.SINGLE_CONSUMER``), what was going to arrive before it has. Under
    per-key order (keyless messages spread over partitions) or no order, the
    sentinel can overtake earlier messages, so a quiet window of the declared
    delivery time follows, and a late straggler is caught as well.

    Returns:
        Everything collected, the sentinel excluded.
    """
    sentinel = await bus.publish(topic, b"sentinel")
    got = await contract.collect(subs, until=lambda c: sentinel.id in c.ids, handle=handle)
    assert sentinel.id in got.ids, (
        f"the sentinel did not arrive within the declared delivery time "
        f"({contract.timings.delivery}s)")
    if contract.capabilities.ordering is not Ordering.SINGLE_CONSUMER:
        got.arrivals.extend((await contract.collect_for(subs, handle=handle)).arrivals)
    got.arrivals[:] = [a for a in got.arrivals if a.delivery.id != sentinel.id]
    return got


async def returned_to(contract: Contract, successor: Subscription, count: int, *,
                      absence: str) -> Collected | None:
    """Collect the ``count`` unsettled messages a consumer gave back, at ``successor``.

    Waits the declared redelivery plus delivery time. Where the adapter declares no
    redelivery, asserts instead that nothing comes back in that window, records
    ``absence`` as the declared absence and returns None.
    """
    window = contract.timings.redelivery + contract.timings.delivery
    if not contract.capabilities.redelivery:
        assert (await contract.collect_for(successor, window)).ids == []
        contract.declared_absent(absence)
        return None
    return await contract.collect(successor, count, timeout=window)

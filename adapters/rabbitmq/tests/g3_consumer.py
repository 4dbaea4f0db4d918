"""The consumer process G3 SIGKILLs (run by test_faults.py, not collected by pytest).

Usage: ``python g3_consumer.py URL TOPIC GROUP ACK_FIRST PREFETCH``. It acks the first
ACK_FIRST deliveries (printing ``ACKED <id>``), then takes one more batch without
settling it (``HELD <id>``), prints ``HOLDING`` and waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

import unibus


async def main(url: str, topic: str, group: str, ack_first: int, prefetch: int) -> None:
    async with unibus.connect(url) as bus, bus.subscribe(topic, group=group,
                                                         prefetch=prefetch) as sub:
        acked = 0
        while acked < ack_first:
            for delivery in await sub.fetch(min(prefetch, ack_first - acked)):
                await delivery.ack()
                acked += 1
                print(f"ACKED {delivery.id}", flush=True)
        for delivery in await sub.fetch(prefetch):
            print(f"HELD {delivery.id}", flush=True)
        print("HOLDING", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    url, topic, group, ack_first, prefetch = sys.argv[1:6]
    asyncio.run(main(url, topic, group, int(ack_first), int(prefetch)))

"""The G3 victim: consume a group, ack some deliveries, hold the rest, wait to be killed.

Usage: ``python g3_consumer.py URL TOPIC GROUP PREFETCH ACKS``. Prints one line
``HOLDING <acked ids, comma-separated> | <held ids, comma-separated>`` once it holds
``PREFETCH`` deliveries of which it acked the first ``ACKS``, then blocks forever.
"""

from __future__ import annotations

import asyncio
import sys

import unibus


async def main(url: str, topic: str, group: str, prefetch: int, acks: int) -> None:
    async with unibus.connect(url) as bus, bus.subscribe(topic, group=group,
                                                         prefetch=prefetch) as sub:
        acked: list[str] = []
        held: list[str] = []
        while len(acked) + len(held) < prefetch + acks:
            for delivery in await sub.fetch(prefetch, timeout=5):
                if len(acked) < acks:
                    await delivery.ack()
                    acked.append(delivery.id)
                else:
                    held.append(delivery.id)
        print(f"HOLDING {','.join(acked)} | {','.join(held)}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))

"""The G3 consumer process: consumes a group and acks out of order until it is killed.

Usage: ``python g3_consumer.py URL TOPIC GROUP LOGFILE``. For every delivery it
writes ``R <id>`` when received and ``A <id>`` once ``ack()`` returned, straight to
the file descriptor (the kernel keeps what was written when the process is
SIGKILLed). Each batch is acked in reverse order with a pause between acks, so a
kill usually finds later offsets settled while earlier ones are not: committing
past an unsettled offset would lose it.
"""

from __future__ import annotations

import asyncio
import os
import sys

import unibus


async def main(url: str, topic: str, group: str, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    async with unibus.connect(url) as bus, bus.subscribe(topic, group=group,
                                                         prefetch=200) as sub:
        while True:
            batch = await sub.fetch(timeout=1.0)
            os.write(fd, "".join(f"R {d.id}\n" for d in batch).encode())
            for delivery in reversed(batch):
                await delivery.ack()
                os.write(fd, f"A {delivery.id}\n".encode())
                await asyncio.sleep(0.0005)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))

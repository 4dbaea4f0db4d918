"""The figures every fault run records (CONTRACT.md section G), printed alike for every broker.

A fault test counts what it published, what the broker confirmed, and what its
consumers received (a ``Counter`` of message ids: unique ids and duplicates apart),
then reports::

    G1 broker restart: published=3000 confirmed=3000 received_unique=3000 duplicates=14
    lost=0 recovery_s=6.69

``lost`` is what was confirmed but never received; it must be 0.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["FaultFigures", "fault_figures", "longest_gap", "recorded"]

#: Every fault run's figures in this process, in order; the pytest plugin prints
#: them at the end of the session, so CI's log shows them without ``-s``.
recorded: list[FaultFigures] = []


@dataclass(frozen=True, slots=True)
class FaultFigures:
    """One fault run's figures; ``line`` is what was printed."""

    name: str
    published: int
    confirmed: int
    received_unique: int
    duplicates: int
    lost: int
    recovery: float | None
    line: str


def fault_figures(name: str, *, published: int, confirmed: int | Collection[str],
                  received: Counter[str], lost: int | None = None,
                  recovery: float | None = None, extra: str = "") -> FaultFigures:
    """Count, print and return the figures of one fault run.

    Args:
        name: The scenario, e.g. ``"G1 broker restart"``.
        published: Messages the test tried to publish.
        confirmed: The ids the broker confirmed (then ``lost`` is computed from
            them), or their count (then give ``lost``).
        received: How often each id was received.
        lost: Confirmed but never received, when the test counts it itself.
        recovery: Seconds the fault stopped the traffic, if measured.
        extra: Scenario-specific figures appended to the line.

    Raises:
        ValueError: ``confirmed`` is a count and ``lost`` is not given.
    """
    if isinstance(confirmed, int):
        if lost is None:
            raise ValueError("give lost= when confirmed is a count, not the ids")
        count = confirmed
    else:
        count = len(confirmed)
        if lost is None:
            lost = len(set(confirmed) - received.keys())
    unique = len(received)
    duplicates = sum(received.values()) - unique
    shown = "n/a" if recovery is None else f"{recovery:.2f}"
    line = (f"{name}: published={published} confirmed={count} received_unique={unique} "
            f"duplicates={duplicates} lost={lost} recovery_s={shown} {extra}").rstrip()
    print(f"\n{line}")
    figures = FaultFigures(name, published, count, unique, duplicates, lost, recovery, line)
    recorded.append(figures)
    return figures


def longest_gap(times: Sequence[float]) -> float:
    """The longest pause between consecutive, ordered moments (0 for fewer than two)."""
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

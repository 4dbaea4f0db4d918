"""The semantics report: for each contract property and target, what the run proved.

Statuses, per property x target, over all scenarios of the property:

- **held** — every scenario passed and asserted the property;
- **declared absent** — every scenario passed by asserting the adapter's declared
  failure or weaker behaviour (the reasons are listed under the table);
- **failed** — at least one scenario failed;
- **not run** — no scenario of the property ran on the target (deselected, or a
  skip that names no declared absence).

The plugin prints the table at the end of a run and writes it as Markdown and
JSON (``--unibus-report PATH``; the JSON sits next to the Markdown). Reports of
several runs (one per broker, in CI) merge into ``docs/semantics.md``::

    python -m unibus_contract.report build/*.json --output docs/semantics.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "DECLARED_ABSENT_KEY",
    "DECLARED_ABSENT_SKIP",
    "PROPERTIES",
    "PROPERTY_KEY",
    "TARGET_KEY",
    "ScenarioResult",
    "SemanticsReport",
    "Status",
    "main",
]

PROPERTY_KEY = "unibus_property"
TARGET_KEY = "unibus_target"
DECLARED_ABSENT_KEY = "unibus_declared_absent"
#: A skip whose reason starts with this counts as a declared absence.
DECLARED_ABSENT_SKIP = "declared absent:"

#: The properties of CONTRACT.md sections A-F, in order.
PROPERTIES: dict[str, str] = {
    "A1": "round trip of N messages published before the consumer attaches",
    "A2": "body byte-exact, all 256 byte values and invalid UTF-8",
    "A3": "empty body arrives as b\"\"",
    "A4": "body at the declared maximum arrives; one byte over fails before sending",
    "A5": "headers preserved exactly (unicode, empty values, 50+)",
    "A6": "id, key and timestamp preserved end to end",
    "A7": "topic isolation; one consumer on many topics",
    "B1": "competing consumers: union = all messages",
    "B2": "no duplicates in steady state",
    "B3": "every group receives every message (fan-out)",
    "B4": "a declared group retains messages until its first consumer",
    "B5": "an ephemeral subscription sees nothing from while it was detached",
    "B6": "a new group replays history (or declares it does not)",
    "B7": "50 concurrent publishers lose nothing",
    "C1": "acked messages are never delivered again, also after restart",
    "C2": "nack ⇒ redelivered, attempt incremented",
    "C3": "nack(delay=d) ⇒ not redelivered before d",
    "C4": "repeated nacks keep redelivering until the retry policy ends",
    "C5": "reject ⇒ never redelivered; dead-lettered when configured",
    "C6": "settling twice raises AlreadySettled",
    "C7": "unsettled deliveries of a closed consumer go to the next consumer",
    "C8": "a failing message does not block the others",
    "C9": "prefetch N: never more than N unsettled at one consumer",
    "D1": "single consumer, no failures: publish order kept",
    "D2": "per-key order across competing consumers",
    "D3": "what a redelivery does to order is declared and holds",
    "E1": "delayed publish never early; within delay + declared slack",
    "E2": "delayed messages survive a consumer restart",
    "E3": "retry with backoff, dead letter after exactly max_attempts calls",
    "E4": "dedup of a repeated message id inside the window (or declared not)",
    "F1": "aclose() idempotent, safe while blocked; iterators end cleanly",
    "F2": "publish/subscribe after close raise BusClosed",
    "F3": "a cancelled handler settles nothing; the message comes back",
    "F4": "unreachable broker ⇒ BrokerUnavailable within the connect timeout",
    "F5": "bad credentials ⇒ AuthenticationFailed, no endless reconnect",
    "F6": "no driver exception escapes the adapter",
    "F7": "passwords never appear in repr, str, logs or errors",
    "F8": "graceful shutdown: in-flight handlers finish and settle, nothing lost",
}


class Status(Enum):
    """What a run proved for one property on one target."""

    HELD = "held"
    DECLARED_ABSENT = "declared absent"
    FAILED = "failed"
    NOT_RUN = "not run"

    @property
    def mark(self) -> str:
        """A one-character mark for the table."""
        return {"held": "✔", "declared absent": "⊘", "failed": "✘", "not run": "○"}[self.value]


@dataclass(slots=True)
class ScenarioResult:
    """One scenario on one target: its outcome over all phases."""

    nodeid: str
    target: str
    properties: list[str]
    outcome: str = "passed"            # passed | failed | skipped
    absences: list[str] = field(default_factory=list)
    detail: str = ""                   # a skip reason or the first failure line

    @property
    def status(self) -> Status:
        """This scenario's contribution to its properties' status."""
        if self.outcome == "failed":
            return Status.FAILED
        if self.outcome == "skipped":
            declared = self.detail.startswith(DECLARED_ABSENT_SKIP)
            return Status.DECLARED_ABSENT if declared else Status.NOT_RUN
        return Status.DECLARED_ABSENT if self.absences else Status.HELD


class SemanticsReport:
    """Collects scenario results; renders the property x target table."""

    def __init__(self) -> None:
        self.scenarios: dict[str, ScenarioResult] = {}
        self.targets: list[str] = []

    # -- collecting --------------------------------------------------------------

    def add_phase(self, nodeid: str, outcome: str, user_properties: Iterable[tuple[str, object]],
                  detail: str = "") -> None:
        """Fold one pytest phase report (setup, call or teardown) into the results."""
        props = [str(v) for k, v in user_properties if k == PROPERTY_KEY]
        if not props:
            return
        target = next((str(v) for k, v in user_properties if k == TARGET_KEY), "?")
        result = self.scenarios.get(nodeid)
        if result is None:
            result = self.scenarios[nodeid] = ScenarioResult(nodeid, target, props)
            if target not in self.targets:
                self.targets.append(target)
        for key, value in user_properties:
            if key == DECLARED_ABSENT_KEY and str(value) not in result.absences:
                result.absences.append(str(value))
        if outcome == "failed" or (outcome == "skipped" and result.outcome == "passed"):
            result.outcome = outcome
            result.detail = result.detail or detail

    # -- querying ----------------------------------------------------------------

    def results(self, prop: str, target: str) -> list[ScenarioResult]:
        """The scenarios of ``prop`` that ran on ``target``."""
        return [r for r in self.scenarios.values()
                if r.target == target and prop in r.properties]

    def status(self, prop: str, target: str) -> Status:
        """The status of ``prop`` on ``target`` (see the module docstring)."""
        statuses = {r.status for r in self.results(prop, target)}
        if Status.FAILED in statuses:
            return Status.FAILED
        if Status.HELD in statuses:
            return Status.HELD
        if Status.DECLARED_ABSENT in statuses:
            return Status.DECLARED_ABSENT
        return Status.NOT_RUN

    def properties(self) -> list[str]:
        """The catalogue's properties, then any others the scenarios named."""
        extra = sorted({p for r in self.scenarios.values() for p in r.properties} - set(PROPERTIES))
        return [*PROPERTIES, *extra]

    def counts(self, target: str) -> dict[Status, int]:
        """How many properties have each status on ``target``."""
        out = dict.fromkeys(Status, 0)
        for prop in self.properties():
            out[self.status(prop, target)] += 1
        return out

    # -- rendering ---------------------------------------------------------------

    def lines(self) -> list[str]:
        """The table as plain text for the terminal."""
        width = max((len(t) for t in self.targets), default=6)
        width = max(width, len(Status.DECLARED_ABSENT.value))
        out = ["prop  " + "  ".join(t.ljust(width) for t in self.targets) + "  property"]
        for prop in self.properties():
            cells = "  ".join(self.status(prop, t).value.ljust(width) for t in self.targets)
            out.append(f"{prop:<4}  {cells}  {PROPERTIES.get(prop, '')}")
        for target in self.targets:
            counts = self.counts(target)
            summary = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
            scenarios = sum(1 for r in self.scenarios.values() if r.target == target)
            out.append(f"{target}: {scenarios} scenarios; properties: {summary}")
        return out

    def markdown(self) -> str:
        """The report as Markdown: the table, then declared absences and failures."""
        head = "| id | property | " + " | ".join(self.targets) + " |"
        rule = "|---|---|" + "---|" * len(self.targets)
        rows = [head, rule]
        for prop in self.properties():
            cells = []
            for target in self.targets:
                status = self.status(prop, target)
                results = self.results(prop, target)
                absent = sum(1 for r in results if r.status is Status.DECLARED_ABSENT)
                partly = f"; {absent} declared absent" if absent and status is Status.HELD else ""
                cells.append(f"{status.mark} {status.value} ({len(results)}{partly})")
            rows.append(f"| {prop} | {PROPERTIES.get(prop, '')} | " + " | ".join(cells) + " |")
        parts = [
            "# Semantics report",
            "",
            "What the contract suite (`unibus_contract`) proved for each property of "
            "CONTRACT.md sections A-F on each target: ✔ held; ⊘ declared absent (the "
            "declared failure or weaker behaviour was asserted); ✘ failed; ○ not run. "
            "In brackets: the number of scenarios.",
            "",
            *rows,
        ]
        absences = self._notes(lambda r: r.status is Status.DECLARED_ABSENT,
                               lambda r: r.absences or [r.detail])
        if absences:
            parts += ["", "## Declared absences (per scenario)", "", *absences]
        failures = self._notes(lambda r: r.status is Status.FAILED, lambda r: [r.detail])
        if failures:
            parts += ["", "## Failures", "", *failures]
        return "\n".join(parts) + "\n"

    def _notes(self, keep: Any, reasons: Any) -> list[str]:
        notes: list[str] = []
        for target in self.targets:
            for prop in self.properties():
                seen: set[str] = set()
                for result in self.results(prop, target):
                    if not keep(result):
                        continue
                    for reason in reasons(result):
                        line = f"- **{prop}** on `{target}`: {reason}"
                        if line not in seen:
                            seen.add(line)
                            notes.append(line)
        return notes

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (statuses and every scenario)."""
        return {
            "targets": self.targets,
            "properties": {p: PROPERTIES.get(p, "") for p in self.properties()},
            "status": {t: {p: self.status(p, t).value for p in self.properties()}
                       for t in self.targets},
            "scenarios": [
                {"nodeid": r.nodeid, "target": r.target, "properties": r.properties,
                 "outcome": r.outcome, "declared_absent": r.absences, "detail": r.detail}
                for r in self.scenarios.values()
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SemanticsReport:
        """Rebuild a report from :meth:`to_json` output."""
        report = cls()
        for item in data["scenarios"]:
            result = ScenarioResult(item["nodeid"], item["target"], list(item["properties"]),
                                    item["outcome"], list(item["declared_absent"]),
                                    item["detail"])
            report.scenarios[f"{result.target}::{result.nodeid}"] = result
        report.targets = list(dict.fromkeys([*data["targets"]]))
        return report

    def merge(self, other: SemanticsReport) -> None:
        """Add ``other``'s scenarios (a later run of the same scenario wins)."""
        for result in other.scenarios.values():
            self.scenarios[f"{result.target}::{result.nodeid}"] = result
        for target in other.targets:
            if target not in self.targets:
                self.targets.append(target)

    def write(self, markdown_path: Path, *, with_json: bool = True) -> Path | None:
        """Write the Markdown to ``markdown_path`` and, unless told not to, the JSON next to it.

        Returns:
            The JSON path, or ``None`` when no JSON was written.
        """
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(self.markdown(), encoding="utf-8")
        if not with_json:
            return None
        json_path = markdown_path.with_suffix(".json")
        json_path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
        return json_path


def main(argv: Sequence[str] | None = None) -> int:
    """Merge JSON reports of several runs into one Markdown report (``docs/semantics.md``)."""
    parser = argparse.ArgumentParser(prog="python -m unibus_contract.report",
                                     description=main.__doc__)
    parser.add_argument("reports", nargs="+", type=Path, help="semantics JSON files")
    parser.add_argument("--output", "-o", type=Path, default=Path("docs/semantics.md"))
    args = parser.parse_args(argv)
    merged = SemanticsReport()
    for path in args.reports:
        merged.merge(SemanticsReport.from_json(json.loads(path.read_text(encoding="utf-8"))))
    merged.write(args.output, with_json=False)
    print(f"wrote {args.output} ({len(merged.targets)} targets, "
          f"{len(merged.scenarios)} scenario results)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``unibus check``: the contract suite, run in this process against one URL.

The run is kept apart from the project in the working directory: no ini file, no
``conftest.py``, no cache, no ``PYTEST_ADDOPTS`` and no auto-loaded pytest plugins,
only the three the scenarios need. Its semantics report is taken from the plugin in
memory, never read back from a file an earlier run may have left.

pytest and ``unibus_contract`` are imported by the caller, and only when the command
runs: ``import unibus`` needs neither.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Outcome", "contract_args", "isolated_environment", "usage_problem", "verdict"]

#: The pytest plugins the scenarios need, loaded by name; nothing else is auto-loaded.
_PLUGINS = ("pytest_asyncio.plugin", "pytest_timeout", "unibus_contract.plugin")

#: The environment through which a project's pytest settings would reach the run:
#: removed (``None``) or set for its duration.
_ISOLATED_ENV: dict[str, str | None] = {
    "PYTEST_ADDOPTS": None,
    "PYTEST_PLUGINS": None,
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
}

#: The plugin object of the contract suite that holds the semantics report.
_REPORT_PLUGIN = "unibus-contract-report"


def usage_problem(name: str | None, report: str | None) -> str | None:
    """What is wrong with ``--name`` or ``--report``, if anything."""
    from unibus_contract.targets import TARGET_NAME

    if name is not None and not TARGET_NAME.fullmatch(name):
        return f"--name {name!r}: use letters, digits, '_', '.' and '-'"
    if report is not None and (report.strip().lower() in ("", "none")
                               or Path(report).suffix.lower() == ".json"):
        return (f"--report {report!r}: name the Markdown file (e.g. build/semantics.md); "
                "the JSON is written next to it")
    return None


def contract_args(url: str, *, name: str | None, properties: list[str],
                  report: str | None) -> list[str]:
    """pytest's arguments for the contract scenarios on ``url``.

    Args:
        url: The broker, passwords included (the arguments never leave the process).
        name: The report's column, else the URL's scheme.
        properties: ``--property`` values; empty: every property.
        report: Where the plugin writes the Markdown report (JSON next to it), or
            ``None`` for no file.
    """
    args = ["-q", "--noconftest", "-p", "no:cacheprovider", "-c", os.devnull,
            "--rootdir", tempfile.gettempdir(),
            "-o", "timeout=120", "-o", "asyncio_default_fixture_loop_scope=function"]
    for plugin in _PLUGINS:
        args += ["-p", plugin]
    args += ["--pyargs", "unibus_contract.scenarios",
             "--unibus-url", url if name is None else f"{name}={url}",
             "--unibus-report", report or "none"]
    for prop in properties:
        args += ["--unibus-property", prop]
    return args


@contextlib.contextmanager
def isolated_environment() -> Iterator[None]:
    """Hide the project's pytest environment variables for the run; restore them after."""
    saved = {key: os.environ.get(key) for key in _ISOLATED_ENV}

    def put(values: dict[str, str | None]) -> None:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    put(_ISOLATED_ENV)
    try:
        yield
    finally:
        put(saved)


class Outcome:
    """A pytest plugin that keeps what the run leaves: the semantics report (JSON-ready)
    and whether Ctrl-C ended it."""

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None
        self.interrupted = False

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    def pytest_unconfigure(self, config: Any) -> None:
        hooks = config.pluginmanager.get_plugin(_REPORT_PLUGIN)
        if hooks is not None and hooks.report.scenarios:
            self.report = hooks.report.to_json()

    def failed_properties(self) -> list[str]:
        """The properties that failed on some target, in report order."""
        if self.report is None:
            return []
        status: dict[str, dict[str, str]] = self.report["status"]
        return [prop for prop in self.report["properties"]
                if any(column.get(prop) == "failed" for column in status.values())]


def verdict(code: int, outcome: Outcome, shown: str) -> tuple[str | None, int]:
    """What a pytest exit code means for ``unibus check``: an error line (``None``: the
    contract held) and the command's exit status.

    Args:
        code: pytest's exit code (``pytest.ExitCode``).
        outcome: What the run left.
        shown: The broker URL as it may be printed (password hidden).
    """
    import pytest

    if code == pytest.ExitCode.OK:
        return None, 0
    if code == pytest.ExitCode.TESTS_FAILED:
        failed = ", ".join(outcome.failed_properties()) or "a scenario"
        return f"the contract does not hold on {shown}: {failed} failed", 1
    if code == pytest.ExitCode.USAGE_ERROR:
        return "the contract suite refused its arguments (the reason is above)", 2
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        return f"no contract scenario ran on {shown}", 1
    if code == pytest.ExitCode.INTERRUPTED and outcome.interrupted:
        return "interrupted", 130
    if code == pytest.ExitCode.INTERRUPTED:
        return "the contract scenarios could not be collected (the error is above)", 1
    return f"pytest stopped with exit code {code} (the error is above)", 1

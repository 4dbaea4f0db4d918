"""The ``unibus_contract`` pytest plugin (entry point ``pytest11``).

It parametrizes every test that uses the ``contract`` fixture over the selected
targets, registers the ``contract_property`` marker, and prints and writes the
semantics report at the end of the run. Run the scenarios against any broker::

    pytest --pyargs unibus_contract.scenarios                          # memory://
    pytest --pyargs unibus_contract.scenarios --unibus-url amqp://guest:guest@127.0.0.1/
    pytest --pyargs unibus_contract.scenarios \\
        --unibus-adapter redis=my_redis_adapter:RedisAdapter --unibus-url redis://127.0.0.1/

Options: ``--unibus-target NAME`` and ``--unibus-url [NAME=]URL`` (repeatable; else
``$UNIBUS_CONTRACT_TARGETS``; else ``memory``), ``--unibus-adapter
SCHEME=MODULE:FACTORY`` (repeatable; :func:`unibus.register`), ``--unibus-report
PATH`` (default ``build/semantics.md`` under the rootdir; ``none`` writes nothing).

The plugin imports :mod:`unibus` only when a scenario runs, so that loading it
(it loads in every pytest run of an environment that has it) costs nothing and
coverage of :mod:`unibus` is measured from the first line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from unibus_contract.context import Contract
from unibus_contract.report import PROPERTIES, PROPERTY_KEY, TARGET_KEY, SemanticsReport
from unibus_contract.targets import Target, selected_targets

_BROKER_FIXTURES = "unibus_contract.broker_fixtures"
# The broker fixtures start containers for the real-broker targets; a build of the
# suite without that module still runs on memory and on given URLs.
pytest_plugins = [_BROKER_FIXTURES] if importlib.util.find_spec(_BROKER_FIXTURES) else []

_MARKER = "contract_property"
_TARGETS = pytest.StashKey[list[Target]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unibus-contract", "unibus contract suite")
    group.addoption("--unibus-target", action="append", default=[], metavar="NAME",
                    help="run the contract scenarios on this named target (repeatable; "
                         "default: $UNIBUS_CONTRACT_TARGETS, else memory)")
    group.addoption("--unibus-url", action="append", default=[], metavar="[NAME=]URL",
                    help="run the contract scenarios on the broker at URL (repeatable)")
    group.addoption("--unibus-adapter", action="append", default=[],
                    metavar="SCHEME=MODULE:FACTORY",
                    help="serve SCHEME:// URLs with your adapter (unibus.register)")
    group.addoption("--unibus-property", action="append", default=[], metavar="ID[,ID...]",
                    help="run only the scenarios of these CONTRACT.md properties, e.g. A1,C2 "
                         "(repeatable; the others are reported 'not run')")
    group.addoption("--unibus-report", default=None, metavar="PATH",
                    help="write the semantics report here as Markdown, and JSON next to it "
                         "(default: build/semantics.md under the rootdir; 'none': do not write)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*ids): the CONTRACT.md properties (e.g. 'A4') a contract scenario checks")
    for spec in config.getoption("--unibus-adapter"):
        _register_adapter(spec)
    config.stash[_TARGETS] = selected_targets(config.getoption("--unibus-target"),
                                              config.getoption("--unibus-url"))
    config.pluginmanager.register(_ReportHooks(config, SemanticsReport()), "unibus-contract-report")


def _register_adapter(spec: str) -> None:
    from unibus.registry import register_spec

    try:
        register_spec(spec)
    except ValueError as exc:
        raise pytest.UsageError(f"--unibus-adapter {exc}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "unibus_target" in metafunc.fixturenames:
        targets = metafunc.config.stash[_TARGETS]
        metafunc.parametrize("unibus_target", targets, indirect=True,
                             ids=[t.name for t in targets])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = _selected_properties(config.getoption("--unibus-property"))
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        ids = [str(i) for marker in item.iter_markers(_MARKER) for i in marker.args]
        if not ids:
            keep.append(item)   # not a contract scenario: --unibus-property leaves it be
            continue
        unknown = [i for i in ids if i not in PROPERTIES]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown contract property {unknown}; "
                                    f"known: {', '.join(PROPERTIES)}")
        if wanted:
            # A scenario of several properties, run for one of them, is evidence for
            # that one only: the others are judged by all of their scenarios, or not run.
            ids = [i for i in ids if i in wanted]
            if not ids:
                dropped.append(item)
                continue
        keep.append(item)
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("unibus_target") if callspec is not None else None
        if not isinstance(target, Target):
            raise pytest.UsageError(f"{item.nodeid}: a {_MARKER} scenario must use the "
                                    "'contract' fixture")
        item.user_properties.extend((PROPERTY_KEY, i) for i in ids)
        item.user_properties.append((TARGET_KEY, target.name))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _selected_properties(options: list[str]) -> set[str]:
    """The property IDs given with ``--unibus-property`` (empty: all of them).

    Raises:
        pytest.UsageError: An ID that is not a CONTRACT.md property.
    """
    wanted = {part.strip().upper() for option in options for part in option.split(",")
              if part.strip()}
    unknown = sorted(wanted.difference(PROPERTIES))
    if unknown:
        raise pytest.UsageError(f"--unibus-property: unknown contract property "
                                f"{', '.join(unknown)}; known: {', '.join(PROPERTIES)}")
    return wanted


@pytest.fixture
def unibus_target(request: pytest.FixtureRequest) -> tuple[Target, str]:
    """The target of this scenario and its URL (a broker fixture starts here, if any).

    Raises:
        pytest.UsageError: The target's broker fixture is not available.
    """
    target: Target = request.param
    return target, target.resolve_url(request)


@pytest_asyncio.fixture
async def contract(unibus_target: tuple[Target, str],
                   request: pytest.FixtureRequest) -> AsyncIterator[Contract]:
    """The scenario's :class:`~unibus_contract.context.Contract`; closes its buses after."""
    target, url = unibus_target
    node = request.node
    assert isinstance(node, pytest.Item)
    ctx = Contract(target, url, node)
    try:
        yield ctx
    finally:
        await ctx.aclose()


class _ReportHooks:
    """Feeds every phase report into the semantics report; prints and writes it at the end."""

    def __init__(self, config: pytest.Config, report: SemanticsReport) -> None:
        self.config = config
        self.report = report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        detail = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            detail = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            detail = _first_error_line(report)
        self.report.add_phase(report.nodeid, report.outcome, report.user_properties, detail)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        # xdist workers report to the controller, which writes the one report.
        if not self.report.scenarios or hasattr(self.config, "workerinput"):
            return
        terminalreporter.write_sep("=", "unibus semantics report")
        for line in self.report.lines():
            terminalreporter.write_line(line)
        path = _report_path(self.config)
        if path is not None:
            json_path = self.report.write(path)
            terminalreporter.write_line(f"semantics report written to {path} and {json_path}")


def _first_error_line(report: pytest.TestReport) -> str:
    errors = [line for line in report.longreprtext.splitlines() if line.startswith("E ")]
    line = errors[0][1:].strip() if errors else f"{report.when} failed"
    return line[:300]


def _report_path(config: pytest.Config) -> Path | None:
    option: str | None = config.getoption("--unibus-report")
    if option is None:
        return config.rootpath / "build" / "semantics.md"
    if option.strip().lower() in ("", "none"):
        return None
    path = Path(option)
    return path if path.is_absolute() else config.invocation_params.dir / path

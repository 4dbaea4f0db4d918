"""The ``unibus`` command line: demo, publish, consume, errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import unibus
from unibus.cli import cli

runner = CliRunner()


@pytest.fixture
def held_broker(memory_url: str) -> Iterator[str]:
    """A memory broker kept alive between CLI invocations (each runs its own loop).

    A ``memory://`` broker lives while one of its buses is open; this bus holds it
    open and declares the group ``g`` on topic ``t``.
    """
    keeper = unibus.connect(memory_url)

    async def open_it() -> None:
        await keeper.open()
        await keeper.declare_group("t", "g")

    asyncio.run(open_it())
    try:
        yield memory_url
    finally:
        asyncio.run(keeper.aclose())


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"unibus {unibus.__version__}"


def test_the_installed_script_runs() -> None:
    script = Path(sys.executable).parent / "unibus"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"unibus {unibus.__version__}"


def test_demo_exits_zero_and_prints_what_flowed() -> None:
    result = runner.invoke(cli, ["demo", "--messages", "300"])
    assert result.exit_code == 0, result.output
    for word in ("published", "processed", "retried", "dead-lettered", "msgs/s", "p50", "p90",
                 "p99", "DemoPoisonError"):
        assert word in result.stdout


def test_demo_json_counts_the_retries_and_the_one_dead_letter() -> None:
    result = runner.invoke(cli, ["demo", "--messages", "300", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # Every message numbered 3 mod 10 fails once; message 150 fails all 3 attempts.
    assert report["finished"] is True
    assert report["published"] == 300
    assert report["processed"] == 299
    assert report["retried"] == 30 + 2
    assert report["handler_calls"] == 300 + 30 + 2
    assert report["dead_lettered"] == 1
    [letter] = report["dead_letters"]
    assert letter["attempts"] == "3"
    assert letter["error_type"] == "unibus.cli.DemoPoisonError"
    assert report["throughput"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p90"] \
        <= report["latency_ms"]["p99"]


def test_publish_then_consume_json_round_trip(held_broker: str) -> None:
    published = runner.invoke(
        cli, ["publish", "t", "--url", held_broker, "--key", "k1", "-H", "kind=created",
              "--header", "empty=", "--json"], input="first\nsecond ünïcode\n")
    assert published.exit_code == 0, published.output
    ids = [record["id"] for record in json_lines(published.stdout)]
    assert len(ids) == 2
    consumed = runner.invoke(cli, ["consume", "t", "--url", held_broker, "--group", "g",
                                   "--count", "2", "--timeout", "5", "--json"])
    assert consumed.exit_code == 0, consumed.output
    records = json_lines(consumed.stdout)
    assert [r["id"] for r in records] == ids
    assert [r["body"] for r in records] == ["first", "second ünïcode"]
    assert all(r["key"] == "k1" for r in records)
    assert all(r["headers"] == {"kind": "created", "empty": ""} for r in records)
    assert all(r["group"] == "g" and r["attempt"] == 1 for r in records)


def test_publish_body_argument_prints_one_id(held_broker: str) -> None:
    result = runner.invoke(cli, ["publish", "t", "hello", "--url", held_broker])
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert len(line) == 36


def test_consume_no_ack_leaves_messages_for_the_next_consumer(held_broker: str) -> None:
    runner.invoke(cli, ["publish", "t", "kept", "--url", held_broker])
    args = ["consume", "t", "--url", held_broker, "--group", "g", "--count", "1",
            "--timeout", "5", "--json"]
    peek = runner.invoke(cli, [*args, "--no-ack"])
    take = runner.invoke(cli, args)
    assert peek.exit_code == take.exit_code == 0, peek.output + take.output
    [first], [second] = json_lines(peek.stdout), json_lines(take.stdout)
    assert first["id"] == second["id"]
    assert second["attempt"] == 2


def test_consume_shows_binary_bodies_as_base64_in_json(held_broker: str) -> None:
    async def put() -> None:
        async with unibus.connect(held_broker) as bus:
            await bus.publish("t", b"\xff\x00")

    asyncio.run(put())
    result = runner.invoke(cli, ["consume", "t", "--url", held_broker, "--group", "g",
                                 "--count", "1", "--timeout", "5", "--json"])
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.stdout)
    assert record["body_base64"] == "/wA="


def test_consume_exits_1_when_fewer_than_count_arrive_in_time(held_broker: str) -> None:
    result = runner.invoke(cli, ["consume", "t", "--url", held_broker, "--group", "g",
                                 "--count", "1", "--timeout", "0.1"])
    assert result.exit_code == 1
    assert "received 0 of 1" in result.stderr


def test_a_bad_url_is_one_red_line_without_traceback_or_password() -> None:
    result = runner.invoke(cli, ["publish", "t", "x", "--url",
                                 "memory://app:hunter2@somewhere?bogus=1"])
    assert result.exit_code == 1
    assert "bogus" in result.stderr
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_unknown_scheme_suggests_the_close_one() -> None:
    result = runner.invoke(cli, ["consume", "t", "--url", "memroy://x", "--count", "1"])
    assert result.exit_code == 1
    assert "memory://" in result.stderr
    assert "Traceback" not in result.output


def test_an_unreachable_broker_is_a_short_error() -> None:
    result = runner.invoke(cli, ["demo", "--url", "memory://nobody-here?create=false"])
    assert result.exit_code == 1
    assert "BrokerUnavailable" in result.stderr
    assert "Traceback" not in result.output


def test_a_header_without_equals_is_a_usage_error() -> None:
    result = runner.invoke(cli, ["publish", "t", "x", "--header", "novalue"])
    assert result.exit_code == 2
    assert "NAME=VALUE" in result.output


# --- unibus check: the contract suite against a live broker, in its own process ---------

#: A user's adapter that breaks one property: it drops every message with an empty
#: body, so A3 (an empty body arrives as b"") fails while A2 (bodies byte-exact) holds.
LOSSY_ADAPTER = '''
from unibus.memory import MemoryAdapter


class EmptyBodiesLost(MemoryAdapter):
    async def publish(self, topic, messages, *, not_before=None):
        kept = [message for message in messages if message.body]
        await super().publish(topic, kept, not_before=not_before)
'''


def unibus_check(*args: str, cwd: Path,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``unibus check`` as a user would: the installed script, in ``cwd``, without
    this test run's own pytest settings in its environment (plus ``env``)."""
    script = Path(sys.executable).parent / "unibus"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([str(script), "check", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False, env={**clean, **(env or {})})


def report_lines(stdout: str) -> dict[str, str]:
    """The semantics report's rows of one target: property → status."""
    row = re.compile(r"^([A-F]\d)\s+(held|declared absent|failed|not run)\s")
    return {m[1]: m[2] for m in map(row.match, stdout.splitlines()) if m}


def test_check_prints_the_report_and_exits_zero_when_the_contract_holds(
        tmp_path: Path) -> None:
    done = unibus_check("memory://", "--property", "A2,b1", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = report_lines(done.stdout)
    assert (rows["A2"], rows["B1"]) == ("held", "held")
    assert rows["A1"] == "not run", "an unselected property is reported 'not run'"
    assert len(rows) == 38
    assert re.search(r"\d+ passed, \d+ deselected", done.stdout)
    assert list(tmp_path.iterdir()) == [], "check writes nothing where it runs by default"


def test_check_json_prints_the_report_and_writes_it_where_asked(tmp_path: Path) -> None:
    done = unibus_check("memory://", "--property", "A3", "--json", "--name", "mine",
                        "--report", "out/semantics.md", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["targets"] == ["mine"]
    assert printed["status"]["mine"]["A3"] == "held"
    assert printed["status"]["mine"]["A1"] == "not run"
    assert "passed" in done.stderr, "the scenarios' progress goes to stderr"
    written = json.loads((tmp_path / "out" / "semantics.json").read_text(encoding="utf-8"))
    assert {**written, "error": None} == printed
    assert "| A3 |" in (tmp_path / "out" / "semantics.md").read_text(encoding="utf-8")


def test_check_fails_with_exit_1_on_an_adapter_that_breaks_a_property(
        tmp_path: Path) -> None:
    (tmp_path / "lossy_adapter.py").write_text(LOSSY_ADAPTER, encoding="utf-8")
    done = unibus_check("lossy://x", "--adapter", "lossy=lossy_adapter:EmptyBodiesLost",
                        "--property", "A2,A3", "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)["status"]["lossy"]
    assert (status["A2"], status["A3"]) == ("held", "failed")
    assert "the contract does not hold on lossy://x: A3 failed" in done.stderr
    assert json.loads(done.stdout)["error"].endswith("A3 failed")


def test_check_ignores_the_pytest_set_up_of_the_project_it_runs_in(tmp_path: Path) -> None:
    # Each of these would stop or change the run if it reached it.
    (tmp_path / "conftest.py").write_text('raise SystemExit("a conftest ran")\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text("import no_such_module\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --collect-only\n")
    done = unibus_check("memory://", "--property", "A2", "--json", cwd=tmp_path,
                        env={"PYTEST_ADDOPTS": "--collect-only -x", "PYTEST_PLUGINS": "nope"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"]["memory"]["A2"] == "held"


def test_check_json_never_shows_an_earlier_runs_report(tmp_path: Path) -> None:
    first = unibus_check("memory://", "--property", "A3", "--report", "out/s.md",
                         cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "out" / "s.json").exists()
    done = unibus_check("memory://", "--property", "Z9", "--report", "out/s.md", "--json",
                        cwd=tmp_path)
    assert done.returncode == 2
    assert json.loads(done.stdout) == {
        "error": "the contract suite refused its arguments (the reason is above)"}
    assert "unknown contract property Z9" in done.stderr


@pytest.mark.parametrize(("args", "said"), [
    (["--property", "Z9"], "unknown contract property Z9"),
    (["--adapter", "nomodule"], "expected SCHEME=MODULE:FACTORY"),
    (["--name", "my column"], "use letters, digits"),
    (["--report", "out.json"], "name the Markdown file"),
    (["--report", "none"], "name the Markdown file"),
])
def test_check_usage_errors_exit_2(tmp_path: Path, args: list[str], said: str) -> None:
    done = unibus_check("memory://", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert said in done.stdout + done.stderr


@pytest.mark.parametrize("json_output", [False, True])
def test_check_on_an_unreachable_broker_is_one_line_without_the_password(
        tmp_path: Path, json_output: bool) -> None:
    done = unibus_check("memory://app:hunter2@nobody-here?create=false",
                        *(["--json"] if json_output else []), cwd=tmp_path)
    assert done.returncode == 1
    assert "BrokerUnavailable" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "passed" not in done.stdout + done.stderr, "no scenario ran against it"
    if json_output:
        assert "BrokerUnavailable" in json.loads(done.stdout)["error"]


def test_check_without_the_contract_suite_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "unibus_contract" else real(name, *a))
    result = runner.invoke(cli, ["check", "memory://"])
    assert result.exit_code == 1
    assert "pip install unibus-contract" in result.stderr


@pytest.mark.parametrize(("code", "interrupted", "said", "status"), [
    (pytest.ExitCode.OK, False, None, 0),
    (pytest.ExitCode.TESTS_FAILED, False, "does not hold on memory://x: A3, F7 failed", 1),
    (pytest.ExitCode.USAGE_ERROR, False, "refused its arguments", 2),
    (pytest.ExitCode.NO_TESTS_COLLECTED, False, "no contract scenario ran", 1),
    (pytest.ExitCode.INTERRUPTED, True, "interrupted", 130),
    (pytest.ExitCode.INTERRUPTED, False, "could not be collected", 1),
    (pytest.ExitCode.INTERNAL_ERROR, False, "exit code 3", 1),
])
def test_check_says_what_each_pytest_exit_code_means(
        code: pytest.ExitCode, interrupted: bool, said: str | None, status: int) -> None:
    from unibus._check import Outcome, verdict

    outcome = Outcome()
    outcome.interrupted = interrupted
    outcome.report = {"properties": {"A3": "", "C1": "", "F7": ""},
                      "status": {"a": {"A3": "failed", "C1": "held", "F7": "held"},
                                 "b": {"A3": "held", "C1": "not run", "F7": "failed"}}}
    error, exit_status = verdict(code, outcome, "memory://x")
    assert exit_status == status
    if said is None:
        assert error is None
    else:
        assert error is not None
        assert said in error

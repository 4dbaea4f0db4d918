"""The ``unibus`` command line: demo, publish, consume, errors."""

from __future__ import annotations

import asyncio
import json
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

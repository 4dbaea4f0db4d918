"""The ``unibus`` command line: ``demo``, ``publish``, ``consume``, ``migrate`` and ``check``.

::

    unibus demo                                  # producer → App → consumer on memory://demo
    unibus demo --url nats://127.0.0.1:4222 --messages 5000 --json
    echo '{"id": 1}' | unibus publish orders --url amqp://guest:guest@127.0.0.1/ --key c-7
    unibus consume orders --url amqp://... --group billing --count 10 --timeout 5 --json
    unibus migrate --from amqp://... --to kafka://... --topic orders --checkpoint o.ckpt --verify
    unibus check nats://127.0.0.1:4222 --property A1,C2 --report build/semantics.md

``--url`` defaults to ``$UNIBUS_URL``, else ``memory://``. A ``memory://`` broker
lives inside one process, so ``publish`` and ``consume`` in two invocations on
``memory://`` share nothing: use a network broker to script across processes.

Errors unibus recognises (a bad URL, an unreachable broker, ...) print one red
line on stderr and exit with status 1; usage errors exit with 2; Ctrl-C exits
with 130. Passwords are never printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import unibus
from unibus import _check
from unibus.bus import DEFAULT_PREFETCH
from unibus.migrate import DEFAULT_BATCH, DEFAULT_GROUP, DEFAULT_WINDOW
from unibus.registry import register_spec

__all__ = ["cli", "main"]

T = TypeVar("T")

cli = typer.Typer(
    name="unibus",
    help="One producer / consumer / scheduler API over RabbitMQ, Kafka, NATS and memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_URL_HELP = ("Broker URL (default: $UNIBUS_URL, else memory://). memory:// brokers live in "
             "one process: two invocations on memory:// share nothing.")
_PUBLISH_BATCH = 500
_DEMO_WINDOW = 500


def _stdout() -> Console:
    return Console(highlight=False)


def _fail(message: str, code: int = 1) -> NoReturn:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


#: The errors a command reports as one line (and, with ``--json``, as a JSON object):
#: unibus's own, a bad value, a file that cannot be used.
_REPORTED = (unibus.UnibusError, ValueError, OSError)


def _describe_error(exc: BaseException) -> str:
    """One line for an error: a unibus error names its type; a bad value or file
    (a checkpoint path that is a directory, or in a missing one) says what it is."""
    if isinstance(exc, unibus.UnibusError):
        return f"{exc} ({type(exc).__name__})"
    return str(exc)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; unibus errors become one red line and a non-zero exit."""
    try:
        return asyncio.run(coro)
    except _REPORTED as exc:
        _fail(_describe_error(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        print(f"unibus {unibus.__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Show unibus and driver log lines.")] = False,
) -> None:
    """One producer / consumer / scheduler API over RabbitMQ, Kafka, NATS and memory."""
    # Drivers log their reconnect attempts as warnings; the CLI reports the outcome
    # itself (one red line), so their lines are shown only on request.
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- demo


@dataclass
class _DemoResult:
    url: str
    topic: str
    published: int = 0
    handler_calls: int = 0
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    finished: bool = False

    @property
    def throughput(self) -> float:
        done = self.processed + self.dead_lettered
        return done / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        if not ordered:
            return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
        # Nearest rank: the smallest latency at or above the given share of messages.
        return {name: ordered[max(0, -(-len(ordered) * share // 100) - 1)] * 1000
                for name, share in (("p50", 50), ("p90", 90), ("p99", 99))}


class DemoTransientError(ConnectionError):
    """The demo's stand-in for a downstream hiccup that a retry cures."""


class DemoPoisonError(ValueError):
    """The demo's stand-in for a message no retry can cure."""


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _demo(url: str, count: int, timeout: float) -> _DemoResult:
    run_id = uuid.uuid4().hex[:8]
    topic, group = f"unibus-demo.{run_id}.orders", "workers"
    poison = count // 2
    async with unibus.connect(url) as bus:
        result = _DemoResult(url=str(bus.url), topic=topic)
        app = unibus.App(bus, shutdown_timeout=5.0)
        sent_at: dict[str, float] = {}
        done = asyncio.Event()
        progress = asyncio.Event()

        def check_done() -> None:
            progress.set()
            if result.processed + len(result.dead_letters) >= count:
                done.set()

        @app.handler(topic, group=group, concurrency=8,
                     retry=unibus.Retry(max_attempts=3, backoff=0.01, max_backoff=0.05))
        async def process(delivery: unibus.Delivery) -> None:
            result.handler_calls += 1
            n = int(delivery.headers["n"])
            if n == poison:
                raise DemoPoisonError(f"order {n} is malformed: no retry will fix it")
            if n % 10 == 3 and delivery.attempt == 1:
                raise DemoTransientError(f"order {n}: the downstream service timed out")
            result.processed += 1
            result.latencies.append(time.perf_counter() - sent_at[delivery.id])
            check_done()

        async def read_dead_letters(sub: unibus.Subscription) -> None:
            async for delivery in sub:
                headers = delivery.headers
                result.dead_letters.append({
                    "id": delivery.id,
                    "attempts": headers.get("unibus-attempts", "?"),
                    "error_type": headers.get("unibus-error-type", "?"),
                    "error": headers.get("unibus-error", "?"),
                })
                await delivery.ack()
                check_done()

        # The dead-letter consumer joins the group the App declares on that topic.
        async with bus.subscribe(f"{topic}.{group}.dlq", group=group) as dlq_sub, app:
            reader = asyncio.create_task(read_dead_letters(dlq_sub))
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    for first in range(0, count, 100):
                        batch = [unibus.Message(f'{{"order": {n}}}'.encode(),
                                                key=f"customer-{n % 7}", headers={"n": str(n)})
                                 for n in range(first, min(first + 100, count))]
                        now = time.perf_counter()
                        for message in batch:
                            sent_at[message.id] = now
                        await bus.publish_many(topic, batch)
                        result.published += len(batch)
                        # At most _DEMO_WINDOW messages in flight, so that the latencies
                        # measure the pipeline, not a backlog the producer piled up.
                        while (result.published - result.processed - len(result.dead_letters)
                               > _DEMO_WINDOW and not app.stopped.is_set()):
                            progress.clear()
                            await _first(progress, app.stopped)
                    await _first(done, app.stopped)
                # A stopped App failed; leaving `async with app` raises its error.
                result.finished = done.is_set()
            except TimeoutError:
                pass
            finally:
                result.seconds = time.perf_counter() - started
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        stats = app.stats
        result.retried = stats.retried
        result.dead_lettered = stats.dead_lettered
    return result


@cli.command()
def demo(
    url: Annotated[str, typer.Option(help="Broker URL to run the demo on.")] = "memory://demo",
    messages: Annotated[int, typer.Option(min=1, help="How many messages to publish.")] = 2000,
    timeout: Annotated[float, typer.Option(min=0.1, help="Give up after this many seconds.")
                       ] = 30.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Run a producer → scheduler → consumer pipeline and show what flowed.

    Every tenth message fails once (and is retried); one poison message fails every
    time and is dead-lettered after 3 attempts.
    """
    logging.getLogger("unibus").addHandler(logging.NullHandler())
    logging.getLogger("unibus").propagate = False
    console = _stdout()
    try:
        shown = str(unibus.make_url(url))
    except unibus.InvalidURL as exc:
        _fail(str(exc))
    if json_output:
        result = _run(_demo(url, messages, timeout))
    else:
        with console.status(f"running the demo on {escape(shown)} ..."):
            result = _run(_demo(url, messages, timeout))
    latency = result.percentiles()
    if json_output:
        print(json.dumps({
            "url": result.url, "topic": result.topic, "finished": result.finished,
            "published": result.published, "handler_calls": result.handler_calls,
            "processed": result.processed, "retried": result.retried,
            "dead_lettered": result.dead_lettered, "seconds": round(result.seconds, 6),
            "throughput": round(result.throughput, 1),
            "latency_ms": {k: round(v, 3) for k, v in latency.items()},
            "dead_letters": result.dead_letters,
        }))
    else:
        table = Table(title=f"unibus demo on {escape(result.url)}", title_justify="left")
        table.add_column("flow")
        table.add_column("messages", justify="right")
        table.add_row("published", f"{result.published:,}")
        table.add_row("handler calls", f"{result.handler_calls:,}")
        table.add_row("processed (acked)", f"{result.processed:,}")
        table.add_row("retried", f"{result.retried:,}")
        table.add_row("dead-lettered", f"{result.dead_lettered:,}")
        console.print(table)
        console.print(f"throughput: [bold]{result.throughput:,.0f}[/] msgs/s over "
                      f"{result.seconds:.3f} s")
        console.print("latency publish → processed: "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in latency.items()))
        for letter in result.dead_letters:
            console.print(f"dead letter {escape(letter['id'])} after {letter['attempts']} "
                          f"attempts: {escape(letter['error_type'])}: "
                          f"{escape(letter['error'])}")
    if not result.finished:
        _fail(f"the demo did not finish within {timeout:g} s "
              f"({result.processed + len(result.dead_letters)} of {messages} messages done)")


# ------------------------------------------------------------------------ publish


def _parse_headers(pairs: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--header")
        headers[name] = value
    return headers


def _stdin_lines() -> Iterator[bytes]:
    for line in sys.stdin.buffer:
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        yield line


async def _publish(url: str | None, topic: str, bodies: Iterable[bytes], key: str | None,
                   headers: dict[str, str], emit: Any) -> int:
    published = 0
    async with unibus.connect(url) as bus:
        batch: list[unibus.Message] = []
        for body in bodies:
            batch.append(unibus.Message(body, key=key, headers=headers))
            if len(batch) >= _PUBLISH_BATCH:
                for message in await bus.publish_many(topic, batch):
                    emit(message)
                published += len(batch)
                batch = []
        if batch:
            for message in await bus.publish_many(topic, batch):
                emit(message)
            published += len(batch)
    return published


@cli.command()
def publish(
    topic: Annotated[str, typer.Argument(help="The topic to publish to.")],
    body: Annotated[str | None, typer.Argument(
        help="The message body; without it, every line of stdin is one message.")] = None,
    url: Annotated[str | None, typer.Option(help=_URL_HELP)] = None,
    key: Annotated[str | None, typer.Option(help="Ordering key of the messages.")] = None,
    header: Annotated[list[str] | None, typer.Option(
        "--header", "-H", help="A header NAME=VALUE; repeat for more.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Publish BODY, or each line of stdin, to TOPIC and print the message ids."""
    headers = _parse_headers(header or [])
    if body is None and sys.stdin.isatty():
        _fail("give a BODY or pipe messages on stdin, one per line", code=2)
    bodies: Iterable[bytes] = [body.encode()] if body is not None else _stdin_lines()

    def emit(message: unibus.Message) -> None:
        if json_output:
            print(json.dumps({"id": message.id, "topic": topic, "key": message.key}))
        else:
            print(message.id)

    _run(_publish(url, topic, bodies, key, headers, emit))


# ------------------------------------------------------------------------ consume


def _delivery_json(delivery: unibus.Delivery) -> str:
    record: dict[str, Any] = {
        "id": delivery.id, "topic": delivery.topic, "group": delivery.group,
        "attempt": delivery.attempt, "key": delivery.key, "headers": dict(delivery.headers),
        "timestamp": delivery.message.timestamp.isoformat(),
    }
    try:
        record["body"] = delivery.body.decode()
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(delivery.body).decode()
    return json.dumps(record, ensure_ascii=False)


async def _consume(url: str | None, topic: str, group: str | None, count: int | None,
                   timeout: float | None, ack: bool, emit: Any) -> int:
    received = 0
    # Unacked deliveries stay held: let the prefetch cover every one that is asked for.
    prefetch = count if count is not None and not ack else DEFAULT_PREFETCH
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    async with unibus.connect(url) as bus, bus.subscribe(topic, group=group,
                                                          prefetch=prefetch) as sub:
        while count is None or received < count:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            wanted = None if count is None else count - received
            batch = await sub.fetch(wanted, remaining)
            if not batch:
                break
            for delivery in batch:
                emit(delivery)
                if ack:
                    await delivery.ack()
            received += len(batch)
    return received


@cli.command()
def consume(
    topic: Annotated[str, typer.Argument(help="The topic to consume.")],
    url: Annotated[str | None, typer.Option(help=_URL_HELP)] = None,
    group: Annotated[str | None, typer.Option(
        help="Consume through this durable group; without it, an ephemeral subscription "
             "sees only what is published while it runs.")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after N messages.")] = None,
    timeout: Annotated[float | None, typer.Option(
        min=0.0, help="Stop after S seconds; with --count, exit 1 if fewer arrived.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    no_ack: Annotated[bool, typer.Option(
        "--no-ack", help="Leave the messages unsettled: they return to the group on exit."
    )] = False,
) -> None:
    """Print the messages of TOPIC as they arrive (until Ctrl-C, --count or --timeout)."""
    console = _stdout()

    def emit(delivery: unibus.Delivery) -> None:
        if json_output:
            print(_delivery_json(delivery), flush=True)
            return
        body = delivery.body.decode(errors="backslashreplace")
        extra = f" key={delivery.key}" if delivery.key is not None else ""
        if delivery.attempt > 1:
            extra += f" attempt={delivery.attempt}"
        console.print(f"[dim]{escape(delivery.id)}{escape(extra)}[/] {escape(body)}")

    received = _run(_consume(url, topic, group, count, timeout, not no_ack, emit))
    if count is not None and received < count:
        within = f" within {timeout:g} s" if timeout is not None else ""
        _fail(f"received {received} of {count} messages{within}")


# ------------------------------------------------------------------------ migrate


async def _migrate(source: str, target: str, topic: str, *, group: str,
                   to_topic: str | None, follow: bool, limit: int | None,
                   rate: float | None, batch: int, window: int, checkpoint: str | None,
                   dry_run: bool,
                   verify: bool, declare_groups: list[str],
                   progress: Callable[[unibus.MigrationReport], None] | None,
                   stopped_by: list[signal.Signals]) -> unibus.MigrationReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        stopped_by.append(signum)
        stop.set()

    # SIGINT / SIGTERM finish the batches in flight, then report: nothing is left half done.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await unibus.migrate(
            source, target, topic, group=group, to_topic=to_topic, follow=follow,
            limit=limit, rate=rate, batch=batch, window=window, checkpoint=checkpoint,
            dry_run=dry_run, verify=verify, declare_groups=declare_groups, stop=stop,
            progress=progress)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _print_migration(console: Console, report: unibus.MigrationReport) -> None:
    # Printed apart from the table, unwrapped: a URL cut at the table's width misreads.
    console.print(f"unibus migrate {escape(report.topic)}: {escape(report.source)} → "
                  f"{escape(report.target)} {escape(report.to_topic)}"
                  + (" (dry run)" if report.dry_run else ""), soft_wrap=True)
    table = Table()
    table.add_column("messages")
    table.add_column("count", justify="right")
    for name, value in (("read", report.read), ("written", report.written),
                        ("acked", report.acked), ("duplicates", report.duplicates),
                        ("republished", report.republished), ("failed", report.failed)):
        table.add_row(name, f"{value:,}")
    console.print(table)
    console.print(f"{report.rate:,.0f} msgs/s over {report.seconds:.3f} s"
                  + (f" in {report.runs} runs" if report.runs > 1 else ""))
    for failure in report.failures:
        console.print(f"[red]failed:[/] {escape(failure)}", soft_wrap=True)
    checked = report.verify
    if checked is not None:
        verdict = "[green]ok[/]" if checked.ok else "[bold red]DIFFERENCES[/]"
        console.print(f"verify {verdict}: {checked.expected:,} ids read, "
                      f"{checked.received:,} copies on the target, {checked.lost_count:,} "
                      f"lost, {checked.mismatched_count:,} body mismatches, "
                      f"{checked.duplicates:,} duplicates, {checked.unexpected:,} unexpected, "
                      f"{checked.pending_count:,} pending (still unacked on the source)")
        for note in checked.notes:
            console.print(f"  note: {escape(note)}")
        for kind, ids in (("lost", checked.lost), ("body mismatch", checked.mismatched),
                          ("pending", checked.pending)):
            for message_id in ids:
                console.print(f"  {kind}: {escape(message_id)}")


@cli.command()
def migrate(
    source: Annotated[str, typer.Option("--from", help="URL of the broker to read from.")],
    target: Annotated[str, typer.Option("--to", help="URL of the broker to write to.")],
    topic: Annotated[str, typer.Option(help="The topic to move.")],
    group: Annotated[str, typer.Option(
        help="The source group to read through; its position is the cursor.")
    ] = DEFAULT_GROUP,
    to_topic: Annotated[str | None, typer.Option(
        help="The topic on the target (default: the same name).")] = None,
    until_empty: Annotated[bool, typer.Option(
        "--until-empty", help="Stop once the source is idle (the default).")] = False,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Keep moving new messages until Ctrl-C or SIGTERM.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after N messages.")] = None,
    rate: Annotated[float | None, typer.Option(
        min=0.001, help="At most R messages per second.")] = None,
    batch: Annotated[int, typer.Option(
        min=1, help="Messages per batch (one publish on the target).")] = DEFAULT_BATCH,
    window: Annotated[int, typer.Option(
        min=1, help="Batches published and not yet confirmed at once; window x batch "
                    "bounds what a crash may write twice. 1: strict order on every "
                    "target.")] = DEFAULT_WINDOW,
    checkpoint: Annotated[str | None, typer.Option(
        help="File recording progress; run again with it to resume.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Read and count, publish nothing, ack nothing.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Read back what was written; print lost ids, body mismatches "
                         "and duplicates (exit 1 on a difference).")] = False,
    declare_group: Annotated[list[str] | None, typer.Option(
        "--declare-group", help="Declare this group on the target topic first, so a "
                                "broker without replay (RabbitMQ) keeps the messages for "
                                "it; repeat for more.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Move TOPIC's messages from one broker to another, acking only what the target
    confirmed (at-least-once, resumable with --checkpoint)."""
    if until_empty and follow:
        _fail("give --until-empty or --follow, not both", code=2)
    if rate is not None and not math.isfinite(rate):
        _fail(f"--rate must be a finite number of messages per second, got {rate}", code=2)
    if checkpoint == "":
        _fail("--checkpoint needs a file name", code=2)
    console = _stdout()
    stopped_by: list[signal.Signals] = []

    async def attempt(progress: Callable[[unibus.MigrationReport], None] | None
                      ) -> tuple[unibus.MigrationReport | None, str | None]:
        try:
            report = await _migrate(
                source, target, topic, group=group, to_topic=to_topic, follow=follow,
                limit=limit, rate=rate, batch=batch, window=window, checkpoint=checkpoint,
                dry_run=dry_run, verify=verify, declare_groups=declare_group or [],
                progress=progress, stopped_by=stopped_by)
        except unibus.MigrationFailed as exc:
            return exc.report, str(exc)
        except _REPORTED as exc:
            if not json_output:
                raise   # one red line, from _run
            # Failed before anything moved: --json still prints a JSON object.
            return None, _describe_error(exc)
        return report, None

    if console.is_terminal and not json_output:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:,} msgs {task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"migrating {escape(topic)}", total=limit, rate="")
            before: list[int] = []   # the count earlier runs of a checkpoint left

            def show(report: unibus.MigrationReport) -> None:
                count = report.read if report.dry_run else report.written
                if not before:
                    before.append(count)   # the first call comes before any batch
                # This run's messages, as --limit counts them, so the ETA holds.
                bar.update(task, completed=count - before[0], rate=f"{report.rate:,.0f}/s")

            report, error = _run(attempt(show))
    else:
        report, error = _run(attempt(None))
    # A signal ends --follow as planned; any other run it cuts short, with the rest of
    # the topic still on the source: that must not look like a finished migration.
    interrupted = stopped_by[0] if stopped_by and not follow else None
    if report is None:
        print(json.dumps({"error": error}, ensure_ascii=False))
    elif json_output:
        print(json.dumps({**report.to_dict(), "error": error,
                          "interrupted": None if interrupted is None else interrupted.name},
                         ensure_ascii=False))
    else:
        _print_migration(console, report)
    if error is not None:
        _fail(error)
    assert report is not None
    if interrupted is not None:
        _fail(f"interrupted by {interrupted.name}: the migration stopped before the source "
              "was empty; run it again (with the same --checkpoint) to go on",
              code=128 + interrupted.value)
    if report.dry_run and report.failed:
        _fail(f"the dry run found {report.failed} message(s) the target would refuse")
    if report.verify is not None and not report.verify.ok:
        _fail(f"verify found {report.verify.lost_count} lost and "
              f"{report.verify.mismatched_count} mismatched messages")


# -------------------------------------------------------------------------- check


async def _reach(url: str) -> None:
    """Open and close a bus on ``url``: a bad URL or an unreachable broker fails here,
    once and fast, not in every scenario."""
    async with unibus.connect(url):
        pass


@cli.command()
def check(
    url: Annotated[str | None, typer.Argument(
        help="The broker to check (default: $UNIBUS_URL, else memory://).")] = None,
    name: Annotated[str | None, typer.Option(
        help="The report's column for this broker (default: the URL's scheme).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", metavar="SCHEME=MODULE:FACTORY",
        help="Serve SCHEME:// with your adapter (a module importable from the working "
             "directory); repeat for more.")] = None,
    prop: Annotated[list[str] | None, typer.Option(
        "--property", metavar="ID[,ID...]",
        help="Check only these CONTRACT properties, e.g. A1,C2 (the others are "
             "reported 'not run'); repeat for more.")] = None,
    report: Annotated[str | None, typer.Option(
        help="Also write the report here as Markdown, and as JSON next to it.")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print the report as JSON; the scenarios' progress goes to stderr.")
    ] = False,
) -> None:
    """Run the contract suite against a live broker and print the semantics report
    (exit 1 when a property fails)."""

    def fail(message: str, code: int = 1) -> NoReturn:
        if json_output:
            print(json.dumps({"error": message}, ensure_ascii=False))
        _fail(message, code)

    if importlib.util.find_spec("unibus_contract") is None:
        fail("unibus check runs the contract suite, which is not installed: "
             "pip install unibus-contract")
    import pytest

    url = url or os.environ.get("UNIBUS_URL") or "memory://"
    problem = _check.usage_problem(name, report)
    if problem is not None:
        fail(problem, code=2)
    if adapter and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m pytest` would find the modules
    for spec in adapter or []:
        try:
            register_spec(spec)
        except ValueError as exc:
            fail(f"--adapter {exc}", code=2)
    try:
        asyncio.run(_reach(url))
    except _REPORTED as exc:
        fail(_describe_error(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    outcome = _check.Outcome()
    args = _check.contract_args(url, name=name, properties=prop or [], report=report)
    progress = contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext()
    with _check.isolated_environment(), progress:
        code = int(pytest.main(args, plugins=[outcome]))
    error, status = _check.verdict(code, outcome, str(unibus.make_url(url)))
    if json_output:
        print(json.dumps({**(outcome.report or {}), "error": error}, ensure_ascii=False))
    if error is not None:
        _fail(error, status)


def main() -> None:
    """Entry point of the ``unibus`` script."""
    cli()

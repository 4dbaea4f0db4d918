"""pytest plugin: real RabbitMQ, Kafka and NATS brokers for the contract suite.

Fixtures (session-scoped, started on first use, removed at session end):

* ``rabbitmq_broker``, ``kafka_broker``, ``nats_broker``: a running
  :class:`~unibus_contract.provision.Broker` with ``.url`` and the controls
  ``restart()``, ``pause()``/``unpause()``, ``stop()``/``start()``, ``kill()``,
  ``ensure_running()``; the address never changes.

Function-scoped:

* ``fresh_topic``: a topic name no other test uses (``t-<uuid hex>``); call
  :func:`new_topic_name` for more in one test.

Without a Docker engine every test using a broker fixture is skipped with one
reason, and so is every test of a broker whose image the engine neither has nor can
pull; with ``UNIBUS_REQUIRE_BROKERS=1`` it fails instead. The marker
``broker`` labels tests that need a real broker (``-m "not broker"`` deselects
them). At the end of the session the terminal summary lists each broker's
image, URL and start-to-ready seconds.

Load it with ``pytest_plugins = ["unibus_contract.broker_fixtures"]`` or ``-p``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from unibus_contract.provision import (
    SPECS,
    Broker,
    brokers_required,
    docker_unavailable_reason,
    engine_info,
    image_unavailable_reason,
    launch,
    network_mode,
)

__all__ = [
    "fresh_topic",
    "kafka_broker",
    "nats_broker",
    "new_topic_name",
    "rabbitmq_broker",
]

MARKER = "broker"

_launched: list[Broker] = []


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``broker`` marker.

    Args:
        config: The pytest configuration.
    """
    config.addinivalue_line(
        "markers",
        f"{MARKER}: needs a real broker in a container (Docker); skipped without Docker "
        "unless UNIBUS_REQUIRE_BROKERS=1",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report each fault run's figures, and each broker started in this session with
    its start-to-ready times.

    Args:
        terminalreporter: pytest's terminal reporter.
    """
    from unibus_contract.faults import recorded

    if recorded:
        terminalreporter.section("unibus fault figures")
        for figures in recorded:
            terminalreporter.write_line(figures.line)
    if not _launched:
        return
    terminalreporter.section("unibus brokers")
    for broker in _launched:
        timings = ", ".join(f"{action} {seconds:.1f}s" for action, seconds in broker.timings)
        terminalreporter.write_line(
            f"{broker.spec.name:<9} {broker.image} ({broker.layout.mode.value} network) "
            f"{broker.shown_url}: ready after {timings}"
        )


def new_topic_name(prefix: str = "t") -> str:
    """A topic name unique to the caller, valid on every broker.

    Letters, digits and ``-`` only: valid as a Kafka topic, a RabbitMQ routing
    key or queue name, a NATS subject token and a JetStream stream name.

    Args:
        prefix: A readable prefix, e.g. the scenario's id.

    Returns:
        ``<prefix>-<32 hex digits>``.
    """
    return f"{prefix}-{uuid.uuid4().hex}"


@pytest.fixture
def fresh_topic() -> str:
    """A topic name no other test uses.

    Returns:
        The name, from :func:`new_topic_name`.
    """
    return new_topic_name()


def _broker(name: str) -> Iterator[Broker]:
    spec = SPECS[name]
    reason = docker_unavailable_reason() or image_unavailable_reason(spec.image)
    if reason is not None:
        if brokers_required():
            pytest.fail(f"{reason}; UNIBUS_REQUIRE_BROKERS=1 makes this a failure", pytrace=False)
        pytest.skip(f"{reason}; set UNIBUS_REQUIRE_BROKERS=1 to fail instead of skipping")
    mode = network_mode(has_bridge=engine_info().has_bridge)
    broker = launch(spec, mode=mode)
    _launched.append(broker)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[Broker]:
    """A RabbitMQ 4 broker for the whole session.

    Yields:
        The running broker; ``.url`` is ``amqp://guest:guest@127.0.0.1:PORT/``.
    """
    yield from _broker("rabbitmq")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """An Apache Kafka 4 (KRaft, single node) broker for the whole session.

    Yields:
        The running broker; ``.url`` is ``kafka://127.0.0.1:PORT``.
    """
    yield from _broker("kafka")


@pytest.fixture(scope="session")
def nats_broker() -> Iterator[Broker]:
    """A NATS 2 server with JetStream for the whole session.

    Yields:
        The running server; ``.url`` is ``nats://127.0.0.1:PORT``.
    """
    yield from _broker("nats")

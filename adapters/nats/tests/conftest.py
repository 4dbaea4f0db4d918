"""Fixtures of the NATS adapter's own tests.

The broker fixture ``nats_broker`` comes from ``unibus_contract.broker_fixtures``
(loaded by the ``unibus_contract`` pytest plugin): without Docker the tests that
need it skip with one reason, and fail under ``UNIBUS_REQUIRE_BROKERS=1``.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``fault`` marker."""
    config.addinivalue_line(
        "markers", "fault: destructive fault scenario (restarts the broker, kills processes); "
                   "run serially")


@pytest.fixture
def js_url(nats_broker: Any) -> str:
    """A JetStream URL on the session's server, with short test timings."""
    return f"{nats_broker.url}?ack_wait=2&heartbeat=0.5&publish_timeout=2"


@pytest.fixture
def core_url(nats_broker: Any) -> str:
    """A core NATS URL on the session's server."""
    return str(nats_broker.url).replace("nats://", "nats+core://", 1)


@pytest.fixture
def topic() -> str:
    """A topic no other test uses."""
    return f"t.{uuid.uuid4().hex}"

"""Fixtures of the RabbitMQ adapter's own tests.

The broker fixture ``rabbitmq_broker`` comes from ``unibus_contract.broker_fixtures``
(loaded by the ``unibus_contract`` pytest plugin): without Docker the tests that
need it skip with one reason, and fail under ``UNIBUS_REQUIRE_BROKERS=1``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import unibus


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``fault`` marker."""
    config.addinivalue_line(
        "markers", "fault: destructive fault scenario (restarts the broker, kills processes); "
                   "run serially")


@pytest.fixture
def amqp_url(rabbitmq_broker: Any) -> str:
    """The URL of the session's RabbitMQ broker."""
    return str(rabbitmq_broker.url)


@pytest_asyncio.fixture
async def bus(amqp_url: str) -> AsyncIterator[unibus.Bus]:
    """An open bus on the session's broker."""
    async with unibus.connect(amqp_url) as opened:
        yield opened


@pytest.fixture
def topic() -> str:
    """A topic no other test uses."""
    return f"t-{uuid.uuid4().hex}"

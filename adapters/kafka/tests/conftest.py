"""Shared fixtures and markers of the Kafka adapter's tests.

The real broker comes from the contract suite's ``kafka_broker`` session fixture
(:mod:`unibus_contract.broker_fixtures`, loaded by the ``unibus_contract`` pytest
plugin): without Docker those tests skip with one reason, and fail instead under
``UNIBUS_REQUIRE_BROKERS=1``.
"""

from __future__ import annotations

from typing import Any

import pytest

#: Short, declared timings for tests: the session timeout sits at the minimum the
#: test broker allows (group.min.session.timeout.ms=1000) plus headroom.
TEST_OPTIONS = "session_timeout=2&connect_timeout=5"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fault: destructive fault scenario (broker restart, consumer SIGKILL); "
                   "needs a real broker under test control")


@pytest.fixture
def kafka_url(kafka_broker: Any) -> str:
    """The test broker's URL with the short test timings."""
    return f"{kafka_broker.url}?{TEST_OPTIONS}"

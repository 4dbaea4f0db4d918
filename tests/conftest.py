"""Shared fixtures of the core unit tests (no broker)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests.helpers import RunPython


@pytest.fixture
def drivers() -> tuple[str, ...]:
    """The import names of every broker driver the adapters use (with the driver-side
    packages they pull in): ``import unibus`` must import none of them."""
    return ("aio_pika", "aiormq", "pamqp", "confluent_kafka", "nats")


@pytest.fixture
def run_python() -> RunPython:
    """Run Python source in a fresh interpreter; return its finished process.

    A fresh interpreter is the only way to see what an import drags in: this
    test process has long imported everything.
    """

    def run(source: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                              timeout=60, check=False)

    return run


@pytest.fixture
def memory_url() -> str:
    """A ``memory://`` URL naming a broker no other test shares."""
    return f"memory://{uuid.uuid4()}"

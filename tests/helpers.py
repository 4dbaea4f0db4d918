"""Test doubles and types several test modules share."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo

__all__ = ["NoOffset", "RunPython"]

#: The ``run_python`` fixture: run source in a fresh interpreter, return the process.
RunPython = Callable[[str], "subprocess.CompletedProcess[str]"]


class NoOffset(tzinfo):
    """A tzinfo that knows no offset: such a datetime is naive, although tzinfo is set."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None

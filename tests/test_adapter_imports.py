"""Every adapter module imports cleanly without its driver (drivers are imported lazily).

kombu's Kafka transport fails with a ``NameError`` when its driver is missing; this is
the test that keeps unibus from doing the same. Each installed adapter of the
registry's built-in table is imported in a fresh interpreter where every driver is
blocked (``sys.modules[name] = None`` makes ``import name`` fail as if it were absent).
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from tests.helpers import RunPython
from unibus.registry import BUILTIN


def _adapter_modules() -> list[object]:
    """One param per adapter module of the built-in table, skipped when not installed."""
    params: list[object] = []
    seen: set[str] = set()
    for scheme, (target, extra) in sorted(BUILTIN.items()):
        module = target.partition(":")[0]
        if module in seen:
            continue
        seen.add(module)
        installed = importlib.util.find_spec(module.partition(".")[0]) is not None
        distribution = f"unibus-{extra}" if extra else "unibus"
        marks = [] if installed else [pytest.mark.skip(
            reason=f"the adapter distribution {distribution} (module {module}, for "
                   f"{scheme}://) is not installed here: pip install \"unibus[{extra}]\"")]
        params.append(pytest.param(module, marks=marks, id=module))
    return params


def _import_with_drivers_blocked(run_python: RunPython, drivers: tuple[str, ...],
                                 module: str) -> subprocess.CompletedProcess[str]:
    return run_python(
        "import sys\n"
        f"for name in {list(drivers)!r}:\n"
        "    sys.modules[name] = None\n"
        f"import {module}\n")


@pytest.mark.parametrize("module", _adapter_modules())
def test_adapter_module_imports_without_its_driver(run_python: RunPython,
                                                   drivers: tuple[str, ...], module: str) -> None:
    result = _import_with_drivers_blocked(run_python, drivers, module)

    assert result.returncode == 0, f"import {module} failed with drivers absent:\n{result.stderr}"


@pytest.mark.parametrize("driver", ["aio_pika", "confluent_kafka", "nats"])
def test_blocked_driver_cannot_be_imported(run_python: RunPython, drivers: tuple[str, ...],
                                           driver: str) -> None:
    # Proves the test above can fail: an adapter that imports its driver at module
    # level hits exactly this error.
    result = _import_with_drivers_blocked(run_python, drivers, driver)

    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr

"""The public surface of ``unibus``: exactly what is promised, and no driver imports."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
from pathlib import Path

import pytest

import unibus
from tests.helpers import RunPython

#: The public API. Changing it is a decision: update this list and docs/decisions.md.
EXPECTED_ALL = [
    "URL",
    "AdapterNotInstalled",
    "AlreadySettled",
    "App",
    "AuthenticationFailed",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "Bus",
    "BusClosed",
    "Capabilities",
    "DecodeError",
    "Delivery",
    "DeliveryLost",
    "InvalidMessage",
    "InvalidName",
    "InvalidURL",
    "Message",
    "MessageTooLarge",
    "MigrationFailed",
    "MigrationReport",
    "Ordering",
    "Outcome",
    "PublishFailed",
    "RedeliveryOrder",
    "Retry",
    "Subscription",
    "Support",
    "Timings",
    "UnibusError",
    "UnknownScheme",
    "UnsupportedFeature",
    "VerifyReport",
    "__version__",
    "available_schemes",
    "connect",
    "make_url",
    "migrate",
    "new_message_id",
    "register",
    "unregister",
]

ADAPTER_PACKAGES = ("unibus_rabbitmq", "unibus_kafka", "unibus_nats")


def test_all_matches_the_expected_public_api() -> None:
    assert sorted(unibus.__all__) == sorted(EXPECTED_ALL)


def test_all_has_no_duplicates() -> None:
    assert len(unibus.__all__) == len(set(unibus.__all__))


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_exists(name: str) -> None:
    assert hasattr(unibus, name)


@pytest.mark.parametrize(
    "name", [n for n in EXPECTED_ALL if not n.startswith("_")])
def test_every_public_class_and_function_is_documented(name: str) -> None:
    value = getattr(unibus, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        # __doc__ itself, not inspect.getdoc(), which inherits a base class's docstring.
        assert (value.__doc__ or "").strip(), name


def test_version_matches_the_distribution_metadata() -> None:
    assert unibus.__version__ == importlib.metadata.version("unibus")


def test_package_is_marked_typed() -> None:
    assert (Path(unibus.__file__).parent / "py.typed").is_file()


def _imported_after(run_python: RunPython, statements: str, names: tuple[str, ...]) -> list[str]:
    """Return which of ``names`` a fresh interpreter has imported after ``statements``."""
    result = run_python(
        f"import json, sys\n{statements}\n"
        f"print(json.dumps(sorted(n for n in {list(names)!r} if n in sys.modules)))")
    assert result.returncode == 0, result.stderr
    imported: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return imported


def test_import_unibus_imports_no_driver(run_python: RunPython,
                                        drivers: tuple[str, ...]) -> None:
    assert _imported_after(run_python, "import unibus", drivers) == []


def test_import_unibus_imports_no_adapter_package(run_python: RunPython) -> None:
    assert _imported_after(run_python, "import unibus", ADAPTER_PACKAGES) == []


def test_a_memory_bus_imports_no_driver(run_python: RunPython,
                                        drivers: tuple[str, ...]) -> None:
    statements = ("import unibus\n"
                  "bus = unibus.connect('memory://x')\n"
                  "unibus.available_schemes()")

    assert _imported_after(run_python, statements, drivers + ADAPTER_PACKAGES) == []


def test_driver_check_sees_a_driver_that_is_imported(run_python: RunPython) -> None:
    # Proves the check above can fail: json stands in for a driver import.
    assert _imported_after(run_python, "import unibus, json", ("json",)) == ["json"]

"""The registry: scheme → adapter, built-in strings, entry points, hints for mistakes."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points, metadata

import pytest

import unibus
from unibus import AdapterNotInstalled, InvalidURL, UnknownScheme, make_url
from unibus.memory import MemoryAdapter
from unibus.options import Options
from unibus.registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    available_schemes,
    register,
    register_spec,
    resolve,
)
from unibus.spi import Adapter
from unibus.url import URL

#: The schemes whose adapters live in their own distributions, and the extra for each.
EXTERNAL = {scheme: extra for scheme, (_, extra) in BUILTIN.items() if extra}

SECRET = "s3cr3t-Pw"


@pytest.fixture(autouse=True)
def _forget_registrations() -> Iterator[None]:
    """Undo every ``register()`` a test makes, so tests stay independent."""
    yield
    for scheme in ("memory", "test", "test+lazy", "test+missing", "test+noattr"):
        unibus.unregister(scheme)


def fake_factory(url: URL) -> Adapter:
    raise AssertionError("never called: the registry only returns factories")


def test_builtin_schemes_are_lazy_module_attribute_strings() -> None:
    for scheme, (target, _) in BUILTIN.items():
        assert re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", target), scheme


def test_every_builtin_extra_is_an_extra_of_the_unibus_distribution() -> None:
    extras = set(metadata("unibus").get_all("Provides-Extra") or ())

    assert set(EXTERNAL.values()) <= extras


def test_builtin_table_covers_every_broker_of_the_design() -> None:
    assert set(BUILTIN) >= {"memory", "amqp", "amqps", "kafka", "nats", "nats+core"}
    assert EXTERNAL["amqp"] == "rabbitmq"
    assert EXTERNAL["kafka"] == "kafka"
    assert EXTERNAL["nats"] == "nats"


def test_memory_is_registered_through_the_entry_point_group() -> None:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}

    assert found["memory"] == "unibus.memory:MemoryAdapter"


def test_memory_scheme_resolves_to_the_memory_adapter() -> None:
    assert resolve(make_url("memory://x")) is MemoryAdapter


def test_registered_factory_serves_its_scheme() -> None:
    unibus.register("test", fake_factory)

    assert resolve(make_url("test://h")) is fake_factory
    assert "test" in available_schemes()


def test_registered_factory_overrides_entry_points_and_builtins() -> None:
    unibus.register("memory", fake_factory)

    assert resolve(make_url("memory://x")) is fake_factory


def test_unregister_restores_the_previous_resolution() -> None:
    unibus.register("memory", fake_factory)
    unibus.unregister("memory")

    assert resolve(make_url("memory://x")) is MemoryAdapter


def test_unregistered_custom_scheme_becomes_unknown() -> None:
    unibus.register("test", fake_factory)
    unibus.unregister("test")

    with pytest.raises(UnknownScheme):
        resolve(make_url("test://h"))


def test_unregister_of_an_unknown_scheme_is_a_no_op() -> None:
    unibus.unregister("never-registered")

    assert resolve(make_url("memory://x")) is MemoryAdapter


def test_registered_string_target_is_imported_lazily_on_resolve() -> None:
    unibus.register("test+lazy", "unibus.memory:MemoryAdapter")

    assert resolve(make_url("test+lazy://x")) is MemoryAdapter


def test_register_spec_takes_the_command_line_form() -> None:
    assert register_spec(" Test+Lazy = unibus.memory:MemoryAdapter ") == "test+lazy"

    assert resolve(make_url("test+lazy://x")) is MemoryAdapter


@pytest.mark.parametrize("spec", ["nomodule", "=unibus.memory:MemoryAdapter",
                                  "test=unibus.memory", "test"])
def test_register_spec_refuses_what_is_not_scheme_module_factory(spec: str) -> None:
    with pytest.raises(ValueError, match="expected SCHEME=MODULE:FACTORY"):
        register_spec(spec)
    assert "test" not in available_schemes()


@pytest.mark.parametrize("scheme", ["", "Kafka", "AMQP"])
def test_register_refuses_empty_or_upper_case_schemes(scheme: str) -> None:
    with pytest.raises(ValueError, match="lower-case"):
        register(scheme, fake_factory)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("amqq", "amqp"), ("kafak", "kafka"), ("nast", "nats"), ("memroy", "memory")],
)
def test_unknown_scheme_suggests_the_closest_known_one(typo: str, meant: str) -> None:
    with pytest.raises(UnknownScheme, match=rf"Did you mean {meant}://\?"):
        resolve(make_url(f"{typo}://h"))


def test_unknown_scheme_without_a_close_match_lists_the_known_schemes() -> None:
    with pytest.raises(UnknownScheme) as caught:
        resolve(make_url("zzzzzz://h"))

    message = str(caught.value)
    assert "no adapter for zzzzzz://" in message
    assert "Did you mean" not in message
    assert "memory://" in message
    assert "kafka://" in message


def test_unknown_scheme_is_an_invalid_url() -> None:
    with pytest.raises(InvalidURL):
        unibus.connect("amqq://h")


@pytest.mark.parametrize(("scheme", "extra"), sorted(EXTERNAL.items()))
def test_missing_adapter_distribution_gives_the_pip_install_hint(
        monkeypatch: pytest.MonkeyPatch, scheme: str, extra: str) -> None:
    module = BUILTIN[scheme][0].partition(":")[0]
    # None in sys.modules makes `import module` fail as if it were not installed,
    # whether or not the adapter distribution is in this environment.
    monkeypatch.setitem(sys.modules, module, None)

    with pytest.raises(AdapterNotInstalled) as caught:
        resolve(make_url(f"{scheme}://h"))

    assert f'pip install "unibus[{extra}]"' in str(caught.value)
    assert module in str(caught.value)


def test_missing_adapter_surfaces_from_connect_as_an_import_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "unibus_kafka", None)

    with pytest.raises(ImportError, match=r'pip install "unibus\[kafka\]"'):
        unibus.connect("kafka://127.0.0.1:9092")


def test_missing_module_of_a_registered_string_target_names_it() -> None:
    unibus.register("test+missing", "unibus_no_such_adapter:Adapter")

    with pytest.raises(AdapterNotInstalled, match="unibus_no_such_adapter"):
        resolve(make_url("test+missing://h"))


def test_adapter_module_without_the_named_attribute_is_reported_as_broken() -> None:
    unibus.register("test+noattr", "unibus.memory:NoSuchAdapter")

    with pytest.raises(AdapterNotInstalled, match="has no NoSuchAdapter"):
        resolve(make_url("test+noattr://h"))


def test_available_schemes_lists_builtins_sorted() -> None:
    schemes = available_schemes()

    assert schemes == sorted(schemes)
    assert set(BUILTIN) <= set(schemes)


def _builtin_schemes() -> list[object]:
    """One param per built-in scheme, skipped when its adapter distribution is missing."""
    params: list[object] = []
    for scheme, (target, extra) in sorted(BUILTIN.items()):
        module = target.partition(":")[0]
        installed = importlib.util.find_spec(module.partition(".")[0]) is not None
        marks = [] if installed else [pytest.mark.skip(
            reason=f"the adapter distribution unibus-{extra} ({module}) is not installed")]
        params.append(pytest.param(scheme, marks=marks, id=scheme))
    return params


def _url_for(scheme: str, query: str) -> URL:
    host = "unit-test" if scheme == "memory" else "127.0.0.1:1"
    return make_url(f"{scheme}://app:{SECRET}@{host}?{query}")


@pytest.mark.parametrize("scheme", _builtin_schemes())
def test_every_adapter_refuses_an_unknown_url_option_naming_it(scheme: str) -> None:
    url = _url_for(scheme, "no_such_option=1")

    with pytest.raises(InvalidURL) as caught:
        resolve(url)(url)

    assert "'no_such_option'" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("scheme", _builtin_schemes())
def test_every_secret_option_of_every_adapter_is_masked_in_the_url(scheme: str) -> None:
    factory = resolve(_url_for(scheme, "a=1"))
    options = getattr(factory, "options", None)
    assert isinstance(options, Options), f"{scheme}: the adapter declares no Options table"

    for option in options:
        if option.secret:
            url = _url_for(scheme, f"{option.name}={SECRET}")
            assert SECRET not in str(url), option.name
            assert SECRET not in repr(url), option.name

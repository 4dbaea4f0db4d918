"""Which adapter serves which URL scheme.

Resolution order for a scheme: adapters added with :func:`register`, then the
``unibus.adapters`` entry-point group, then the built-in table below. The
built-ins are strings, so importing :mod:`unibus` imports no driver; a built-in
whose distribution is missing raises :class:`~unibus.errors.AdapterNotInstalled`
with the ``pip install "unibus[extra]"`` line, and an unknown scheme raises
:class:`~unibus.errors.UnknownScheme` with a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeAlias

from unibus.errors import AdapterNotInstalled, UnknownScheme
from unibus.spi import Adapter
from unibus.url import URL

__all__ = ["AdapterFactory", "available_schemes", "register", "register_spec", "resolve",
           "unregister"]

AdapterFactory: TypeAlias = Callable[[URL], Adapter]

ENTRY_POINT_GROUP = "unibus.adapters"

#: scheme → (``"module:attribute"``, extra that installs it)
BUILTIN: dict[str, tuple[str, str]] = {
    "memory": ("unibus.memory:MemoryAdapter", ""),
    "amqp": ("unibus_rabbitmq:RabbitMQAdapter", "rabbitmq"),
    "amqps": ("unibus_rabbitmq:RabbitMQAdapter", "rabbitmq"),
    "kafka": ("unibus_kafka:KafkaAdapter", "kafka"),
    "kafka+ssl": ("unibus_kafka:KafkaAdapter", "kafka"),
    "nats": ("unibus_nats:JetStreamAdapter", "nats"),
    "nats+core": ("unibus_nats:CoreNatsAdapter", "nats"),
}

_registered: dict[str, AdapterFactory | str] = {}


def register(scheme: str, factory: AdapterFactory | str) -> None:
    """Serve ``scheme://`` URLs with ``factory``.

    Args:
        scheme: The URL scheme, lower case.
        factory: An ``Adapter`` subclass or callable taking a ``URL``, or a lazy
            ``"module:attribute"`` string.

    Raises:
        ValueError: The scheme is empty or not lower case.
    """
    if not scheme or scheme != scheme.lower():
        raise ValueError(f"scheme must be a non-empty lower-case string, got {scheme!r}")
    _registered[scheme] = factory


def register_spec(spec: str) -> str:
    """Serve a scheme with an adapter named as the command lines take it:
    ``SCHEME=MODULE:FACTORY`` (e.g. ``redis=my_adapter:RedisAdapter``).

    Returns:
        The scheme, lower case.

    Raises:
        ValueError: ``spec`` is not of that form.
    """
    scheme, eq, factory = spec.partition("=")
    scheme, factory = scheme.strip().lower(), factory.strip()
    if not eq or not scheme or ":" not in factory:
        raise ValueError(f"{spec!r}: expected SCHEME=MODULE:FACTORY, "
                         "e.g. redis=my_adapter:RedisAdapter")
    register(scheme, factory)
    return scheme


def unregister(scheme: str) -> None:
    """Forget an adapter added with :func:`register` (built-ins stay)."""
    _registered.pop(scheme, None)


def available_schemes() -> list[str]:
    """Every scheme unibus knows: registered, entry points and built-ins."""
    return sorted(set(_registered) | set(_entry_points()) | set(BUILTIN))


def resolve(url: URL) -> AdapterFactory:
    """Return the adapter factory for ``url.scheme``.

    Raises:
        UnknownScheme: No adapter serves the scheme (with a did-you-mean).
        AdapterNotInstalled: A known adapter whose distribution or driver is missing.
    """
    scheme = url.scheme
    target: AdapterFactory | str | None = _registered.get(scheme)
    if target is None:
        target = _entry_points().get(scheme)
    if target is None and scheme in BUILTIN:
        target = BUILTIN[scheme][0]
    if target is None:
        close = difflib.get_close_matches(scheme, available_schemes(), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]}://?" if close else ""
        known = ", ".join(f"{s}://" for s in available_schemes())
        raise UnknownScheme(f"no adapter for {scheme}:// URLs.{hint} Known: {known}.")
    if isinstance(target, str):
        return _load(scheme, target)
    return target


def _entry_points() -> dict[str, str]:
    # module:attr rather than ep.value, which may carry a legacy "[extra]" suffix.
    return {ep.name: f"{ep.module}:{ep.attr}" for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(scheme: str, target: str) -> AdapterFactory:
    module_name, _, attribute = target.partition(":")
    extra = BUILTIN.get(scheme, ("", ""))[1]
    hint = (f'pip install "unibus[{extra}]"' if extra
            else f"install the distribution that provides {module_name}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AdapterNotInstalled(
            f"the {scheme}:// adapter is not installed ({exc.name or module_name} is missing): "
            f"{hint}") from exc
    factory: AdapterFactory | None = getattr(module, attribute, None)
    if factory is None:
        raise AdapterNotInstalled(
            f"the {scheme}:// adapter module {module_name} has no {attribute}: the installed "
            f"distribution is broken or too old; reinstall it ({hint})")
    return factory

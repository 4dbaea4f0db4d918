"""Typed URL query options: how every adapter declares and validates its knobs.

An adapter lists its options once::

    OPTIONS = Options(
        Option("prefetch", int, 64, "default prefetch per subscription", minimum=1),
        Option("queue_type", str, "quorum", "quorum or classic", choices=("quorum", "classic")),
    )
    settings = OPTIONS.parse(url)          # {"prefetch": 64, "queue_type": "quorum"}

An unknown option, or a value that does not parse, is an
:class:`~unibus.errors.InvalidURL` naming the option and what would be valid.
The same table renders the option list in the adapter's docs.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from unibus.errors import InvalidURL
from unibus.url import URL

__all__ = ["Option", "Options", "parse_bool", "parse_int", "parse_seconds"]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    """Parse ``1/0``, ``true/false``, ``yes/no`` or ``on/off``.

    Raises:
        ValueError: Any other text.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_seconds(text: str) -> float:
    """Parse a duration in seconds (``"2.5"``, ``"2.5s"``) or milliseconds (``"250ms"``).

    Raises:
        ValueError: The text is not a finite, non-negative number of seconds.
    """
    stripped = text.strip().lower()
    try:
        if stripped.endswith("ms"):
            value = float(stripped[:-2]) / 1000
        else:
            value = float(stripped.removesuffix("s"))
    except ValueError:
        value = math.nan
    # NaN and infinity are refused: no timer or deadline can be built from them.
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def parse_int(text: str) -> int:
    """Parse a decimal integer.

    Raises:
        ValueError: The text is not an integer.
    """
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


_PARSERS: Mapping[type, Callable[[str], Any]] = {
    bool: parse_bool, int: parse_int, float: parse_seconds}


def _number(value: float) -> str:
    """A bound as written: ``2147483``, not ``2.14748e+06``."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class Option(Generic[T]):
    """One query option of an adapter's URL.

    Attributes:
        name: The query key.
        kind: ``str``, ``int``, ``float`` (seconds) or ``bool``.
        default: The value when the option is absent (``None``: no default).
        doc: One line for the docs.
        choices: The allowed values, if restricted.
        minimum: The smallest allowed number, if any.
        maximum: The largest allowed number, if any (a driver's own limit: refused
            here, without I/O, rather than when the client is made).
        secret: Never echo the value in an error (passwords, tokens).
    """

    name: str
    kind: type[T]
    default: T | None
    doc: str
    choices: tuple[T, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False

    def parse(self, raw: str) -> T:
        """Parse the raw query value.

        Raises:
            InvalidURL: The value does not parse or is out of range.
        """
        shown = "***" if self.secret else repr(raw)
        try:
            value: T = _PARSERS.get(self.kind, self.kind)(raw)
        except ValueError as exc:
            # The parser's message quotes the raw text, so a secret gets only its type.
            reason = f"expected a {self.kind.__name__}" if self.secret else str(exc)
            raise InvalidURL(f"option {self.name}={shown}: {reason}") from None
        if self.choices and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise InvalidURL(f"option {self.name}={shown}: must be one of {allowed}")
        if self.minimum is not None and isinstance(value, int | float) and value < self.minimum:
            raise InvalidURL(f"option {self.name}={shown}: must be at least "
                             f"{_number(self.minimum)}")
        if self.maximum is not None and isinstance(value, int | float) and value > self.maximum:
            raise InvalidURL(f"option {self.name}={shown}: must be at most "
                             f"{_number(self.maximum)}")
        return value


class Options:
    """The table of query options an adapter accepts."""

    def __init__(self, *options: Option[Any]) -> None:
        """Collect the options.

        Raises:
            ValueError: Two options share a name.
        """
        self._options: dict[str, Option[Any]] = {}
        for option in options:
            if option.name in self._options:
                raise ValueError(f"option {option.name!r} is declared twice")
            self._options[option.name] = option

    def __iter__(self) -> Iterator[Option[Any]]:
        return iter(self._options.values())

    def parse(self, url: URL) -> dict[str, Any]:
        """Validate ``url.query`` and return every option's value (defaults filled in).

        Raises:
            InvalidURL: An option is unknown (named, with a did-you-mean) or invalid.
        """
        values: dict[str, Any] = {o.name: o.default for o in self._options.values()}
        for name, raw in url.query.items():
            option = self._options.get(name)
            if option is None:
                raise InvalidURL(self._unknown(name, url.scheme))
            values[name] = option.parse(raw)
        return values

    def _unknown(self, name: str, scheme: str) -> str:
        known = sorted(self._options)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(known) if known else "none"
        return f"unknown option {name!r} for {scheme}:// URLs.{hint} Known options: {listing}."

    def markdown(self) -> str:
        """Render the options as a Markdown table for the adapter's docs."""
        rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
        rows += [f"| `{o.name}` | {o.kind.__name__} | `{o.default}` | {o.doc} |"
                 for o in self._options.values()]
        return "\n".join(rows)

"""Broker URLs: parsing, validation and a password-safe rendering.

A unibus URL names the broker and carries every driver knob in its query::

    scheme://[user[:password]@]host[:port][,host[:port]...][/path][?option=value&...]

- several hosts are separated by commas (``kafka://b1:9092,b2:9092``);
- IPv6 hosts go in brackets (``nats://[::1]:4222``);
- user and password are percent-decoded (``amqp://app:p%40ss@host/``);
- ``str()`` and ``repr()`` mask the password (and query options named like
  credentials) as ``***``; only :meth:`URL.render` with ``hide_password=False``
  reveals them, for drivers. Errors about malformed URLs never echo a password.

The URL itself only checks syntax; each adapter validates its own query options
(an unknown one is an :class:`~unibus.errors.InvalidURL` that names it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import quote, unquote

from unibus.errors import InvalidURL

__all__ = ["URL", "HostPort", "make_url"]

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_MASK = "***"
_HOSTNAME = re.compile(r"[A-Za-z0-9._~-]+")
_PORT = re.compile(r"[0-9]{1,5}")
# Query options whose values are credentials: masked like the password.
_SECRET_OPTION = re.compile(r"password|passwd|secret|token", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class HostPort:
    """One ``host[:port]`` of a URL; ``port`` is ``None`` when omitted."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class URL:
    """An immutable, parsed broker URL.

    Build one with :func:`make_url`. Equal URLs compare and hash equal; the
    password takes part in equality but never in ``str`` or ``repr``.
    """

    scheme: str
    hosts: tuple[HostPort, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = ""
    query: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "query", MappingProxyType(dict(self.query)))

    def __hash__(self) -> int:
        return hash((self.scheme, self.hosts, self.username, self.password, self.path,
                     tuple(sorted(self.query.items()))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, URL):
            return NotImplemented
        return (self.scheme, self.hosts, self.username, self.password, self.path,
                dict(self.query)) == (other.scheme, other.hosts, other.username,
                                      other.password, other.path, dict(other.query))

    @property
    def host(self) -> str | None:
        """The first host, or ``None`` for a URL without hosts."""
        return self.hosts[0].host if self.hosts else None

    @property
    def port(self) -> int | None:
        """The first host's port, or ``None``."""
        return self.hosts[0].port if self.hosts else None

    def render(self, *, hide_password: bool = True) -> str:
        """Return the URL as a string.

        Args:
            hide_password: Replace the password, and the value of every query option
                named like a credential (``password``, ``secret``, ``token``), with
                ``***`` (the default). Pass ``False`` only to hand the URL to a driver,
                never to a log.
        """
        userinfo = ""
        if self.username is not None or self.password is not None:
            userinfo = quote(self.username or "", safe="")
            if self.password is not None:
                secret = _MASK if hide_password else quote(self.password, safe="")
                userinfo += f":{secret}"
            userinfo += "@"
        hosts = ",".join(str(h) for h in self.hosts)
        query = "&".join(
            f"{quote(k, safe='')}="
            f"{_MASK if hide_password and _SECRET_OPTION.search(k) else quote(v, safe='')}"
            for k, v in self.query.items())
        # The path is one decoded segment after the '/' (an AMQP vhost: "/" is "%2F").
        path = self.path[:1] + quote(self.path[1:], safe="") if self.path else ""
        return f"{self.scheme}://{userinfo}{hosts}{path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"URL({self.render()!r})"

    def with_query(self, **options: str) -> URL:
        """Return a copy with these query options set (replacing existing ones)."""
        return replace(self, query={**self.query, **options})

    def without_query(self, *names: str) -> URL:
        """Return a copy without the named query options."""
        return replace(self, query={k: v for k, v in self.query.items() if k not in names})

    def iter_query(self) -> Iterator[tuple[str, str]]:
        """Iterate over the query options in their original order."""
        return iter(self.query.items())


def make_url(value: str | URL) -> URL:
    """Parse a broker URL.

    Reserved characters in the user name and password (``/ ? # @ :`` and ``%``)
    must be percent-encoded, as in any URL.

    Args:
        value: The URL string, or a :class:`URL` (returned unchanged).

    Returns:
        The parsed, immutable URL.

    Raises:
        InvalidURL: The string is not a well-formed URL; the message says which
            part is wrong (the password is never echoed).
    """
    if isinstance(value, URL):
        return value
    if not isinstance(value, str):
        raise InvalidURL(f"a broker URL must be a str or unibus.URL, not {type(value).__name__}")
    shown = repr(_masked(value))
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise InvalidURL(f"{shown} is not a URL: expected 'scheme://host...'")
    scheme = scheme.lower()
    if not _SCHEME.match(scheme):
        raise InvalidURL(f"{shown}: invalid URL scheme")
    if any(ch.isspace() for ch in rest):
        raise InvalidURL(f"{shown}: whitespace is not allowed in a URL")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise InvalidURL(f"{shown}: URL fragments ('#...') are not supported")
    rest, _, query_string = rest.partition("?")
    slash = rest.find("/")
    netloc, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, at, hostlist = netloc.rpartition("@")
    # An '@' after the host means a raw '/' or '?' may have split a password early:
    # the parts after that split may hold pieces of it, so none is echoed.
    ctx = _Context(shown, leaky="@" in query_string)
    if "@" in path:
        raise InvalidURL(f"{shown}: '@' after the host: percent-encode '/', '?', '#' and '@' "
                         "in the user name and password (as %2F, %3F, %23, %40)")
    username = password = None
    if at:
        user_raw, colon, pass_raw = userinfo.partition(":")
        username = _decode(user_raw, shown, "user name")
        password = _decode(pass_raw, shown, "password") if colon else None
    hosts = tuple(_parse_host(part, ctx) for part in hostlist.split(",")) if hostlist else ()
    return URL(scheme=scheme, hosts=hosts, username=username, password=password,
               path=_decode(path, shown, "path"), query=_parse_query(query_string, ctx))


@dataclass(frozen=True, slots=True)
class _Context:
    """How a parse error shows the URL and the offending part."""

    shown: str
    leaky: bool

    def part(self, text: str) -> str:
        return "'***'" if self.leaky else repr(text)


def _decode(text: str, shown: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidURL(f"{shown}: the {what} is not percent-encoded UTF-8") from None


def _parse_host(part: str, ctx: _Context) -> HostPort:
    if not part:
        raise InvalidURL(f"{ctx.shown}: empty host in the host list")
    if part.startswith("["):
        end = part.find("]")
        if end < 0:
            raise InvalidURL(f"{ctx.shown}: unclosed '[' in IPv6 host {ctx.part(part)}")
        host, tail = part[1:end], part[end + 1:]
        if not _is_ipv6(host):
            raise InvalidURL(f"{ctx.shown}: {ctx.part(host)} is not an IPv6 address")
        if tail and not tail.startswith(":"):
            raise InvalidURL(f"{ctx.shown}: unexpected {ctx.part(tail)} after IPv6 host")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text_raw = part.partition(":")
        port_text = port_text_raw if colon else None
        if not host:
            raise InvalidURL(f"{ctx.shown}: missing host before ':'")
        # No percent-escapes in host names: a decoded ',' or ':' would not survive
        # rendering, and no DNS name needs one.
        if not _HOSTNAME.fullmatch(host):
            raise InvalidURL(f"{ctx.shown}: invalid host {ctx.part(host)}")
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise InvalidURL(f"{ctx.shown}: port {ctx.part(port_text)} is not in 1..65535")
        port = int(port_text)
    return HostPort(host, port)


def _is_ipv6(text: str) -> bool:
    # Zone ids ('%25eth0') are refused: broker clients do not take them.
    if "%" in text:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_query(query_string: str, ctx: _Context) -> dict[str, str]:
    options: dict[str, str] = {}
    if not query_string:
        return options
    for pair in query_string.split("&"):
        if not pair:
            continue
        name, eq, raw = pair.partition("=")
        if not eq or not name:
            raise InvalidURL(f"{ctx.shown}: query part {ctx.part(pair)} is not 'option=value'")
        key = _decode(name, ctx.shown, "query")
        if key in options:
            raise InvalidURL(f"{ctx.shown}: option {key!r} is given twice")
        options[key] = _decode(raw.replace("+", " "), ctx.shown, "query")
    return options


def _masked(text: str) -> str:
    """Mask the password of a raw URL string that may not parse.

    Errs towards masking: everything between the first ':' of the user info and
    the last '@' of the string is hidden, wherever the URL would split.
    """
    head, sep, tail = text.partition("://")
    if not sep:
        head, tail = "", text
    at = tail.rfind("@")
    colon = tail.find(":", 0, max(at, 0))
    if at < 0 or colon < 0:
        return text
    return f"{head}{sep}{tail[:colon + 1]}{_MASK}{tail[at:]}"

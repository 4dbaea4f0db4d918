"""URL options of the NATS adapters and the nats-py connect arguments built from them.

Both schemes share the connection options (servers, credentials, TLS, timeouts);
``nats://`` adds the JetStream options (storage, replicas, ack wait, dedup window,
...). An unknown option is an :class:`~unibus.errors.InvalidURL` naming it. The
password, token and seed never reach a log or an error: errors name the option,
not its value, and :meth:`Settings.__repr__` shows only the masked URL.

Names: topics and groups may hold ``.``, which NATS forbids in stream and consumer
names and which splits subject tokens; each is carried as one token with ``.``
replaced by ``~`` (a character unibus names cannot contain, so the mapping is
one-to-one): topic ``orders.eu`` is subject ``<prefix>.orders~eu`` in stream
``<prefix>-orders~eu``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from unibus.errors import InvalidURL
from unibus.options import Option, Options
from unibus.url import URL

__all__ = ["CORE_OPTIONS", "JETSTREAM_OPTIONS", "Settings", "parse_settings", "token"]

DEFAULT_PORT = 4222

_CONNECTION_OPTIONS: tuple[Option[Any], ...] = (
    Option("prefix", str, "unibus", "subject prefix (and stream name prefix): letters, "
           "digits, '_' and '-'"),
    Option("token", str, None, "authentication token", secret=True),
    Option("nkeys_seed", str, None, "path to an nkeys seed file"),
    Option("creds", str, None, "path to a credentials (JWT + seed) file"),
    Option("tls", bool, False, "connect with TLS (implied by tls_ca / tls_cert)"),
    Option("tls_ca", str, None, "CA bundle that verifies the server certificate"),
    Option("tls_cert", str, None, "client certificate (PEM) for mutual TLS"),
    Option("tls_key", str, None, "client private key (PEM) for mutual TLS"),
    Option("tls_hostname", str, None, "server name expected in its certificate"),
    Option("name", str, "unibus", "connection name shown in the server's monitoring"),
    Option("connect_timeout", float, 5.0, "seconds to reach a server before BrokerUnavailable",
           minimum=0.1),
    Option("reconnect_wait", float, 0.5, "seconds between reconnect attempts", minimum=0.0),
    Option("retry_for", float, 30.0, "seconds a publish waits for a lost connection to come "
           "back before it fails", minimum=0.0),
    Option("max_message_size", int, 1_000_000, "largest body in bytes (the server's "
           "max_payload must leave room for headers)", minimum=0),
)

CORE_OPTIONS = Options(
    *_CONNECTION_OPTIONS,
    Option("buffer", int, 65_536, "messages buffered per consumer before the oldest are "
           "dropped (core NATS is at-most-once)", minimum=1),
)

JETSTREAM_OPTIONS = Options(
    *_CONNECTION_OPTIONS,
    Option("storage", str, "file", "stream storage", choices=("file", "memory")),
    Option("replicas", int, 1, "stream replicas (clustered servers)", minimum=1),
    Option("ack_wait", float, 30.0, "seconds before the server redelivers a message whose "
           "consumer went silent", minimum=0.1),
    Option("dedup_window", float, 120.0, "seconds a message id is remembered per stream "
           "(0: no deduplication)", minimum=0.0),
    Option("max_age", float, 0.0, "seconds a stream keeps messages (0: forever)", minimum=0.0),
    Option("heartbeat", float, 1.0, "idle heartbeat of pull requests; a pull loop silent for "
           "3 heartbeats re-subscribes", minimum=0.1),
    Option("publish_window", int, 1024, "outstanding PubAcks per publish_many", minimum=1),
    Option("publish_timeout", float, 5.0, "seconds to wait for a PubAck before publishing "
           "again (same Nats-Msg-Id, so no duplicate)", minimum=0.1),
    Option("max_ack_pending", int, 0, "the group's server-side cap of unacked messages "
           "(0: 8 x the largest prefetch of its consumers)", minimum=0),
    Option("delayed", str, "auto", "delayed delivery: native (server message schedules, "
           "2.12+), emulated, or auto", choices=("auto", "native", "emulated")),
)


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """The parsed URL: options by name plus the connection facts."""

    url: URL
    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __repr__(self) -> str:
        return f"Settings({self.url})"

    def servers(self) -> list[str]:
        """The server URLs for nats-py, without credentials (they travel separately)."""
        scheme = "tls" if self.tls_context() is not None else "nats"
        hosts = self.url.hosts
        return [f"{scheme}://{h.host if ':' not in h.host else f'[{h.host}]'}:"
                f"{h.port or DEFAULT_PORT}" for h in hosts]

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with, or ``None`` for plain TCP.

        Raises:
            InvalidURL: A certificate or key file cannot be loaded.
        """
        values = self.values
        if not (values["tls"] or values["tls_ca"] or values["tls_cert"]):
            return None
        try:
            context = ssl.create_default_context(cafile=values["tls_ca"])
            if values["tls_cert"]:
                context.load_cert_chain(values["tls_cert"], values["tls_key"])
        except (OSError, ssl.SSLError) as exc:
            # The file names are not secret, the reason may quote a path only.
            raise InvalidURL(f"TLS option of {self.url}: {exc.__class__.__name__}: "
                             f"{exc.strerror or exc}") from None
        return context

    def connect_kwargs(self) -> dict[str, Any]:
        """The credential and TLS arguments of ``nats.connect`` (never logged)."""
        values = self.values
        kwargs: dict[str, Any] = {}
        if self.url.username is not None:
            kwargs["user"] = self.url.username
            kwargs["password"] = self.url.password
        if values["token"] is not None:
            kwargs["token"] = values["token"]
        if values["nkeys_seed"] is not None:
            kwargs["nkeys_seed"] = values["nkeys_seed"]
        if values["creds"] is not None:
            kwargs["user_credentials"] = values["creds"]
        context = self.tls_context()
        if context is not None:
            kwargs["tls"] = context
            if values["tls_hostname"]:
                kwargs["tls_hostname"] = values["tls_hostname"]
        return kwargs


def parse_settings(url: URL, options: Options) -> Settings:
    """Validate ``url`` for a NATS scheme.

    Raises:
        InvalidURL: An unknown or invalid option, no host, a path, or a bad prefix.
    """
    values = options.parse(url)
    if not url.hosts:
        raise InvalidURL(f"{url}: name at least one server ({url.scheme}://host:port)")
    if url.path not in ("", "/"):
        raise InvalidURL(f"{url}: NATS URLs take no path; use ?prefix= to name the subjects")
    prefix = values["prefix"]
    if not prefix or not all(c.isascii() and (c.isalnum() or c in "_-") for c in prefix):
        raise InvalidURL(f"option prefix={prefix!r}: use letters, digits, '_' and '-'")
    if values["tls_key"] and not values["tls_cert"]:
        raise InvalidURL("option tls_key needs tls_cert")
    if sum(x is not None for x in (values["token"], values["nkeys_seed"], values["creds"])) > 1:
        raise InvalidURL("give at most one of token, nkeys_seed and creds")
    if url.username is not None and url.password is None:
        # Not the NATS convention nats://TOKEN@host: a user name is shown in logs and
        # reprs, so a token there would leak.
        raise InvalidURL(f"{url}: a user name needs a password (user:password@); "
                         "pass a token as ?token=")
    if url.username is not None and values["token"] is not None:
        raise InvalidURL("give either user:password or ?token=, not both")
    return Settings(url, values)


def token(name: str) -> str:
    """Map a unibus topic or group name to one NATS subject token / stream name part."""
    return name.replace(".", "~")

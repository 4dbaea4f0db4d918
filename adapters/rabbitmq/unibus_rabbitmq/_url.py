"""RabbitMQ URL options: parsing ``amqp://`` / ``amqps://`` URLs into connection settings.

Maps to
    the connection parameters of aio-pika (hosts, credentials, vhost, TLS context,
    heartbeat, timeouts) and the adapter's own knobs (queue type, exchange name,
    publish window, prefetch default, declared timings).

URL
    ``amqp[s]://[user[:password]@]host[:port][,host[:port]...][/vhost][?option=value&...]``

    The vhost is the path after the first ``/``, percent-decoded (``%2F`` is ``/``);
    no path, or ``/`` alone, is the default vhost ``/``. Several hosts are tried in
    order on every (re)connect. The default port is 5672 (``amqp``) or 5671
    (``amqps``); the default user is ``guest``/``guest``. See :data:`OPTIONS` for
    the query options; an unknown one is an :class:`~unibus.errors.InvalidURL`.

Driver
    None here: building the TLS context needs only :mod:`ssl`.

Capabilities
    Not decided here; :mod:`unibus_rabbitmq.adapter` derives them from these settings.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from unibus.errors import InvalidURL
from unibus.options import Option, Options
from unibus.url import URL, HostPort

__all__ = ["OPTIONS", "Settings", "parse_settings"]

#: RabbitMQ 4's default ``max_message_size`` (16 MiB).
BROKER_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

OPTIONS = Options(
    Option("heartbeat", int, 5, "AMQP heartbeat in whole seconds (0: off); a dead peer is "
           "noticed after about two heartbeats", minimum=0),
    Option("connect_timeout", float, 5.0, "seconds to reach the broker before "
           "BrokerUnavailable", minimum=0.1),
    Option("recovery", float, 30.0, "seconds to keep reconnecting after a connection loss "
           "before publishes and consumers fail", minimum=0.0),
    Option("prefetch", int, 64, "prefetch of subscriptions that do not give one", minimum=1),
    Option("queue_type", str, "quorum", "type of group queues: quorum (replicated, "
           "delivery count) or classic", choices=("quorum", "classic")),
    Option("exchange", str, "unibus", "name of the durable topic exchange carrying the "
           "topics; delay queues are named after it"),
    Option("publish_window", int, 1024, "most unconfirmed publishes in flight per "
           "publish_many call", minimum=1),
    Option("max_message_size", int, BROKER_MAX_MESSAGE_SIZE, "largest body in bytes; keep "
           "it at or below the broker's max_message_size", minimum=0),
    Option("ca_file", str, None, "PEM file of the CAs that verify the broker (amqps)"),
    Option("cert_file", str, None, "PEM client certificate for mutual TLS (amqps)"),
    Option("key_file", str, None, "PEM private key of cert_file (amqps)"),
    Option("verify", bool, True, "false: do not verify the broker's certificate and host "
           "name (amqps; testing only)"),
)

_TLS_ONLY = ("ca_file", "cert_file", "key_file", "verify")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the adapter needs from its URL, validated.

    Attributes:
        hosts: The brokers to try, in order (port filled in).
        username: The user name.
        password: The password (never shown in ``repr``).
        vhost: The virtual host.
        tls: Whether to connect with TLS (``amqps``).
        heartbeat: AMQP heartbeat seconds.
        connect_timeout: Seconds to reach one broker.
        recovery: Seconds to keep reconnecting after a loss.
        prefetch: Default prefetch.
        queue_type: ``quorum`` or ``classic``.
        exchange: The topic exchange's name.
        publish_window: Unconfirmed publishes in flight per call.
        max_message_size: Largest body in bytes.
        ca_file: CA bundle for TLS.
        cert_file: Client certificate for TLS.
        key_file: Client key for TLS.
        verify: Verify the broker's certificate.
    """

    hosts: tuple[HostPort, ...]
    username: str
    password: str = field(repr=False)
    vhost: str
    tls: bool
    heartbeat: int
    connect_timeout: float
    recovery: float
    prefetch: int
    queue_type: str
    exchange: str
    publish_window: int
    max_message_size: int
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool

    def ssl_context(self) -> ssl.SSLContext | None:
        """Build the TLS context for ``amqps``, or ``None`` for plain ``amqp``.

        Raises:
            InvalidURL: A CA, certificate or key file cannot be loaded.
        """
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if not self.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidURL(f"amqps:// TLS files could not be loaded: {exc}") from None
        return context


def parse_settings(url: URL) -> Settings:
    """Validate ``url`` and return its settings.

    Raises:
        InvalidURL: Unknown or invalid option, no host, a TLS option on ``amqp://``,
            a key without a certificate, or an exchange name RabbitMQ reserves.
    """
    values = OPTIONS.parse(url)
    tls = url.scheme == "amqps"
    if not url.hosts:
        raise InvalidURL(f"{url.scheme}:// needs a host: {url.scheme}://HOST[:PORT][/VHOST]")
    if not tls:
        given = [name for name in _TLS_ONLY if name in url.query]
        if given:
            raise InvalidURL(f"option {given[0]} needs TLS: use amqps:// instead of amqp://")
    if values["key_file"] is not None and values["cert_file"] is None:
        raise InvalidURL("option key_file needs cert_file")
    exchange: str = values["exchange"]
    if not exchange or exchange.startswith("amq.") or len(exchange.encode()) > 200:
        raise InvalidURL(f"option exchange={exchange!r}: use 1-200 bytes, not starting "
                         "with 'amq.' (reserved by RabbitMQ)")
    default_port = 5671 if tls else 5672
    hosts = tuple(HostPort(h.host, h.port or default_port) for h in url.hosts)
    path = url.path
    vhost = "/" if path in ("", "/") else path[1:]
    return Settings(
        hosts=hosts, username=url.username if url.username is not None else "guest",
        password=url.password if url.password is not None else "guest", vhost=vhost, tls=tls,
        heartbeat=values["heartbeat"], connect_timeout=values["connect_timeout"],
        recovery=values["recovery"], prefetch=values["prefetch"],
        queue_type=values["queue_type"], exchange=exchange,
        publish_window=values["publish_window"], max_message_size=values["max_message_size"],
        ca_file=values["ca_file"], cert_file=values["cert_file"], key_file=values["key_file"],
        verify=values["verify"])

"""The ``kafka://`` URL: its options, and the librdkafka configurations built from it.

URL
    ``kafka://[user:password@]host[:port][,host[:port]...][?option=value&...]``
    ``kafka+ssl://...`` — the same over TLS.

    The host list is the bootstrap list (port 9092 when omitted). A user name turns
    SASL on (``SASL_PLAINTEXT``, or ``SASL_SSL`` for ``kafka+ssl``), with the
    mechanism of ``sasl_mechanism``. The password goes only into the driver
    configuration, never into a ``repr``, a log line or an error.

The option table (:data:`OPTIONS`) is the single source of the docs' option list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unibus.errors import InvalidURL
from unibus.options import Option, Options
from unibus.url import URL

__all__ = ["DEFAULT_PORT", "OPTIONS", "Settings", "parse_settings"]

DEFAULT_PORT = 9092

#: Room kept below ``message_max_bytes`` for the record overhead and unibus's headers
#: (message id, timestamp, attempt, due time) plus a generous set of user headers.
HEADER_ALLOWANCE = 32 * 1024

_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")

# librdkafka's limits: its times are int32 milliseconds; counts int32 on the wire.
_INT32 = 2**31 - 1
_MAX_MS_SECONDS = _INT32 // 1000

OPTIONS = Options(
    Option("partitions", int, 4, "partitions of each topic unibus creates", minimum=1,
           maximum=_INT32),
    Option("replication_factor", int, -1,
           "replicas of each topic unibus creates (-1: the broker's default)", minimum=-1,
           maximum=_INT32),
    Option("client_id", str, "unibus", "client.id reported to the broker"),
    Option("connect_timeout", float, 5.0,
           "seconds to reach the bootstrap list before BrokerUnavailable", minimum=0.1,
           maximum=_MAX_MS_SECONDS),
    Option("session_timeout", float, 6.0,
           "consumer group session timeout in seconds (the broker's "
           "group.min.session.timeout.ms bounds it; 6 s is the default minimum)", minimum=0.1,
           maximum=3600),
    Option("publish_timeout", float, 30.0,
           "seconds librdkafka keeps retrying a message (message.timeout.ms) "
           "before publish raises PublishFailed", minimum=0.1, maximum=_MAX_MS_SECONDS),
    Option("linger", float, 0.005, "producer linger (batching window), seconds",
           maximum=900),
    Option("commit_interval", float, 0.2,
           "seconds between offset commits of settled messages"),
    Option("message_max_bytes", int, 1_000_000,
           "producer message.max.bytes; the largest body is this minus 32 KiB of headroom",
           minimum=HEADER_ALLOWANCE + 1, maximum=1_000_000_000),
    Option("assignment_strategy", str, "cooperative-sticky",
           "partition.assignment.strategy of consumer groups",
           choices=("cooperative-sticky", "range", "roundrobin")),
    Option("group_protocol", str, "classic",
           "consumer group protocol: classic (librdkafka's default) or consumer (KIP-848)",
           choices=("classic", "consumer")),
    Option("security_protocol", str, None,
           "override: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (default: from the "
           "scheme and whether a user is given)", choices=_PROTOCOLS),
    Option("sasl_mechanism", str, "SCRAM-SHA-512", "SASL mechanism when a user is given",
           choices=("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")),
    Option("ssl_cafile", str, None, "CA certificate file (PEM) to verify the brokers"),
    Option("ssl_certfile", str, None, "client certificate file (PEM) for mutual TLS"),
    Option("ssl_keyfile", str, None, "client private key file (PEM) for mutual TLS"),
    Option("ssl_key_password", str, None, "password of the client private key", secret=True),
    Option("ssl_check_hostname", bool, True, "verify the broker's host name in its certificate"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the adapter needs from its URL, validated."""

    bootstrap: str
    partitions: int
    replication_factor: int
    client_id: str
    connect_timeout: float
    session_timeout: float
    publish_timeout: float
    linger: float
    commit_interval: float
    message_max_bytes: int
    assignment_strategy: str
    group_protocol: str
    # The SASL password lives here: never part of a repr.
    security: dict[str, str] = field(repr=False)

    @property
    def max_body(self) -> int:
        """The largest body the adapter accepts (see :data:`HEADER_ALLOWANCE`)."""
        return self.message_max_bytes - HEADER_ALLOWANCE

    def common(self) -> dict[str, Any]:
        """The configuration every librdkafka client of this adapter shares."""
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            # Reconnect fast after a broker restart instead of backing off to 10 s.
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            "socket.connection.setup.timeout.ms": max(1000, int(self.connect_timeout * 1000)),
            "topic.metadata.refresh.interval.ms": 10_000,
            **self.security,
        }

    def producer(self) -> dict[str, Any]:
        """The producer's configuration: idempotent, ``acks=all``."""
        return {
            **self.common(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": self.linger * 1000,
            "message.timeout.ms": int(self.publish_timeout * 1000),
            "message.max.bytes": self.message_max_bytes,
            "queue.buffering.max.messages": 200_000,
        }

    def consumer(self, group: str, *, reset: str) -> dict[str, Any]:
        """A consumer's configuration: manual offset commits, nothing automatic."""
        config: dict[str, Any] = {
            **self.common(),
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": reset,
            "enable.partition.eof": False,
            "fetch.message.max.bytes": self.message_max_bytes,
            # A fetch that holds only empty partitions waits this long on the broker
            # before the next fetch can bring the busy ones. A new member's first fetch
            # is often such a one: the group's (quiet) retry lane is ready before the
            # topic's partitions. librdkafka's default is 500 ms; 100 ms cost a new
            # group ~0.1 s before its first record, 25 ms ~0.01 s, at 40 fetches a
            # second from an idle consumer.
            "fetch.wait.max.ms": 25,
            # Once its prefetch queue is over librdkafka's thresholds (64 MiB or 100,000
            # records a partition), a partition's next fetch waits this long. At the
            # default of 1 s a consumer that drains the queue faster than that stands
            # idle: 0.4-0.7 s in every 200,000 records of 256 bytes, a third of the run.
            "fetch.queue.backoff.ms": 20,
        }
        if self.group_protocol == "consumer":
            # KIP-848: the broker assigns partitions and owns the session timeout.
            config["group.protocol"] = "consumer"
        else:
            session_ms = int(self.session_timeout * 1000)
            config.update({
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(100, session_ms // 4),
                "partition.assignment.strategy": self.assignment_strategy,
            })
        return config


def _security(url: URL, values: dict[str, Any]) -> dict[str, str]:
    tls = url.scheme == "kafka+ssl"
    sasl = url.username is not None
    protocol: str | None = values["security_protocol"]
    if protocol is None:
        protocol = ("SASL_" if sasl else "") + ("SSL" if tls else "PLAINTEXT")
    if protocol.startswith("SASL") and not sasl:
        raise InvalidURL(f"security_protocol={protocol} needs a user name and password in "
                         f"the URL ({url})")
    if tls and "SSL" not in protocol:
        raise InvalidURL(f"kafka+ssl:// URLs use TLS; security_protocol={protocol} has none")
    config = {"security.protocol": protocol}
    if protocol.startswith("SASL"):
        config["sasl.mechanism"] = values["sasl_mechanism"]
        config["sasl.username"] = url.username or ""
        config["sasl.password"] = url.password or ""
    files = {"ssl_cafile": "ssl.ca.location", "ssl_certfile": "ssl.certificate.location",
             "ssl_keyfile": "ssl.key.location", "ssl_key_password": "ssl.key.password"}
    for option, key in files.items():
        if values[option] is not None:
            if "SSL" not in protocol:
                raise InvalidURL(f"option {option} needs TLS (kafka+ssl:// or "
                                 "security_protocol=SSL/SASL_SSL)")
            config[key] = values[option]
    if "SSL" in protocol:
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if values["ssl_check_hostname"] else "none")
    return config


def parse_settings(url: URL) -> Settings:
    """Validate ``url`` and its options.

    Raises:
        InvalidURL: No host, a path, or an unknown or invalid option.
    """
    values = OPTIONS.parse(url)
    if not url.hosts:
        raise InvalidURL(f"{url.scheme}:// needs at least one bootstrap host, as in "
                         f"{url.scheme}://127.0.0.1:9092")
    if url.path not in ("", "/"):
        raise InvalidURL(f"{url.scheme}:// URLs take no path, got {url.path!r}")
    if values["replication_factor"] == 0:
        raise InvalidURL("option replication_factor=0: give -1 (the broker's default) "
                         "or at least 1 replica")
    bootstrap = ",".join(
        f"{h.host if ':' not in h.host else f'[{h.host}]'}:{h.port or DEFAULT_PORT}"
        for h in url.hosts)
    return Settings(
        bootstrap=bootstrap,
        partitions=values["partitions"],
        replication_factor=values["replication_factor"],
        client_id=values["client_id"],
        connect_timeout=values["connect_timeout"],
        session_timeout=values["session_timeout"],
        publish_timeout=values["publish_timeout"],
        linger=values["linger"],
        commit_interval=values["commit_interval"],
        message_max_bytes=values["message_max_bytes"],
        assignment_strategy=values["assignment_strategy"],
        group_protocol=values["group_protocol"],
        security=_security(url, values),
    )

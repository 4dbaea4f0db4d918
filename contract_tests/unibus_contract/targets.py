"""What the contract suite runs against: named targets, each a way to get a broker URL.

A :class:`Target` is a name (the column of the semantics report) plus how to get
its URL, lazily: a fixed URL, or a session fixture (one that starts a broker in a
container) whose value has a ``.url``, optionally transformed. A real broker only
starts when a scenario for its target runs.

Adding a broker is one line in :data:`KNOWN_TARGETS` (or a call to
:func:`register_target` from a third party's ``conftest.py``)::

    register_target(Target("rabbitmq", fixture="rabbitmq_broker"))
    register_target(Target("nats-core", fixture="nats_broker",
                           transform=lambda url: url.replace("nats://", "nats+core://", 1)))

Which targets run (first match wins):

1. ``--unibus-target NAME`` and ``--unibus-url [NAME=]URL`` (both repeatable);
2. the environment variable ``UNIBUS_CONTRACT_TARGETS``: comma-separated names or URLs;
3. ``memory``.

A target also says how the lifecycle scenarios (F4, F5, F7) reach the failure
paths of its broker: how to build an unreachable URL, a URL with wrong
credentials, and a working URL with a password of the suite's choosing. Where a
target cannot (memory has no network; a broker run without authentication
accepts any password) it declares that, with the reason the report prints.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from unibus.url import URL

__all__ = [
    "ENV_TARGETS",
    "KNOWN_TARGETS",
    "TARGET_NAME",
    "Target",
    "memory_target",
    "register_target",
    "selected_targets",
    "target_for_url",
]

ENV_TARGETS = "UNIBUS_CONTRACT_TARGETS"

#: A target's name: a report column, and the NAME of ``--unibus-url NAME=URL``.
TARGET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NAMED_URL = re.compile(rf"^(?P<name>{TARGET_NAME.pattern})=(?P<url>[a-z][a-z0-9+.-]*://.*)$")


def _keep(url: str) -> str:
    return url


def network_unreachable(url: URL, port: int) -> URL:
    """Point ``url`` at ``127.0.0.1:port`` (a port nobody listens on), without credentials."""
    from unibus.url import HostPort

    return replace(url, hosts=(HostPort("127.0.0.1", port),), username=None, password=None)


def wrong_password(url: URL, password: str) -> URL:
    """Keep the user (or name one) and replace the password with ``password``."""
    return replace(url, username=url.username or "unibus-contract", password=password)


def memory_unreachable(url: URL, port: int) -> URL:
    """A ``memory://`` URL naming a broker that does not exist, with ``create=false``.

    ``memory://`` has no network; its adapter declares ``create=false`` as the way
    it is "unreachable" (``BrokerUnavailable``). ``port`` is unused.
    """
    from unibus.url import HostPort

    del port
    name = f"unibus-contract-absent-{uuid.uuid4().hex[:12]}"
    return replace(url, hosts=(HostPort(name),), username=None, password=None,
                   query={**url.query, "create": "false"})


def memory_with_password(url: URL, password: str) -> URL:
    """A fresh ``memory://`` broker whose credentials are ``unibus-contract:password``."""
    from unibus.url import HostPort

    name = f"unibus-contract-secret-{uuid.uuid4().hex[:12]}"
    return replace(url, hosts=(HostPort(name),), username="unibus-contract", password=password)


@dataclass(frozen=True, slots=True)
class Target:
    """One broker the scenarios run against.

    Attributes:
        name: The report column and the pytest parameter id.
        url: A fixed URL; or ``None`` when ``fixture`` provides it.
        fixture: A (session) fixture whose value has a ``url`` attribute.
        transform: Applied to the URL string (e.g. to switch ``nats://`` to
            ``nats+core://`` on the same server).
        network: The adapter talks to a broker over TCP (F4 then also checks a
            peer that accepts but never answers).
        unreachable: Builds a URL that cannot connect from the target's URL and
            a closed local port.
        wrong_credentials: Builds a URL whose password the broker refuses; ``None``
            when the broker under test checks no credentials.
        no_auth_reason: Why ``wrong_credentials`` is ``None`` (printed in the report).
        with_password: Builds a working URL whose password is the given one; ``None``
            when the target cannot, and F7 then checks the failure paths only.
    """

    name: str
    url: str | None = None
    fixture: str | None = None
    transform: Callable[[str], str] = _keep
    network: bool = True
    unreachable: Callable[[URL, int], URL] = network_unreachable
    wrong_credentials: Callable[[URL, str], URL] | None = wrong_password
    no_auth_reason: str = ""
    with_password: Callable[[URL, str], URL] | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if (self.url is None) == (self.fixture is None):
            raise ValueError(f"target {self.name!r}: give exactly one of url= and fixture=")
        if self.wrong_credentials is None and not self.no_auth_reason:
            raise ValueError(f"target {self.name!r}: say why it has no wrong_credentials "
                             "(no_auth_reason=...)")

    def resolve_url(self, request: pytest.FixtureRequest) -> str:
        """Return the target's URL, starting its broker fixture if it has one.

        Raises:
            pytest.UsageError: The fixture is not available (its plugin is not installed).
        """
        if self.url is not None:
            return self.transform(self.url)
        assert self.fixture is not None
        try:
            broker = request.getfixturevalue(self.fixture)
        except pytest.FixtureLookupError:
            raise pytest.UsageError(
                f"contract target {self.name!r} needs the fixture {self.fixture!r} "
                "(unibus_contract.broker_fixtures, or your conftest.py); it is not "
                "available") from None
        url = getattr(broker, "url", broker)
        if not isinstance(url, str):
            from unibus.url import URL

            # str() of a unibus.URL masks the password; the driver needs it.
            url = url.render(hide_password=False) if isinstance(url, URL) else str(url)
        return self.transform(url)


def memory_target(name: str = "memory",
                  url: str = "memory://unibus-contract?dedup_window=30") -> Target:
    """The in-process broker: no network, credentials fixed by its first bus."""
    return Target(name, url=url, network=False, unreachable=memory_unreachable,
                  with_password=memory_with_password,
                  description="unibus's in-process broker")


KNOWN_TARGETS: dict[str, Target] = {
    "memory": memory_target(),
    "rabbitmq": Target("rabbitmq", fixture="rabbitmq_broker",
                       description="RabbitMQ 4 (aio-pika), in a container"),
    "kafka": Target("kafka", fixture="kafka_broker",
                    transform=lambda url: f"{url}?session_timeout=2",
                    description="Apache Kafka 4 (confluent-kafka), PLAINTEXT listener: a URL "
                                "with credentials speaks SASL and is refused"),
    "nats": Target("nats", fixture="nats_broker",
                   transform=lambda url: f"{url}?ack_wait=2&heartbeat=0.5",
                   wrong_credentials=None,
                   no_auth_reason="the test NATS server runs without authentication",
                   description="NATS JetStream 2.x (nats-py), file storage"),
    "nats-core": Target("nats-core", fixture="nats_broker",
                        transform=lambda url: url.replace("nats://", "nats+core://", 1),
                        wrong_credentials=None,
                        no_auth_reason="the test NATS server runs without authentication",
                        description="core NATS (nats-py), at-most-once"),
}


def register_target(target: Target) -> None:
    """Make ``target`` selectable by name (``--unibus-target NAME``)."""
    KNOWN_TARGETS[target.name] = target


def target_for_url(url: str, name: str | None = None) -> Target:
    """A target for a URL given on the command line or in the environment.

    The name defaults to the scheme. A URL with a user or password is assumed to
    name a broker that checks credentials; one without, a broker that does not.

    Raises:
        pytest.UsageError: The URL does not parse.
    """
    from unibus.errors import InvalidURL
    from unibus.url import make_url

    try:
        parsed = make_url(url)
    except InvalidURL as exc:
        raise pytest.UsageError(f"--unibus-url: {exc}") from None
    label = name or parsed.scheme
    if parsed.scheme == "memory":
        return memory_target(label, url)
    if parsed.username is None and parsed.password is None:
        return Target(label, url=url, wrong_credentials=None,
                      no_auth_reason="the URL carries no credentials, so the broker is "
                                     "assumed to run without authentication")
    return Target(label, url=url)


def selected_targets(names: Sequence[str], urls: Sequence[str],
                     environ: str | None = None) -> list[Target]:
    """The targets to run, from the command line, else the environment, else memory.

    Args:
        names: ``--unibus-target`` values.
        urls: ``--unibus-url`` values, each ``URL`` or ``NAME=URL``.
        environ: ``UNIBUS_CONTRACT_TARGETS``; read from the environment when ``None``.

    Raises:
        pytest.UsageError: An unknown target name, a bad URL, or a name given twice.
    """
    entries: list[str] = [*names, *urls]
    if not entries:
        raw = os.environ.get(ENV_TARGETS, "") if environ is None else environ
        entries = [part.strip() for part in raw.split(",") if part.strip()]
    if not entries:
        entries = ["memory"]
    targets: list[Target] = []
    for entry in entries:
        named = _NAMED_URL.match(entry)
        if named:
            targets.append(target_for_url(named["url"], named["name"]))
        elif "://" in entry:
            targets.append(target_for_url(entry))
        elif entry in KNOWN_TARGETS:
            targets.append(KNOWN_TARGETS[entry])
        else:
            known = ", ".join(sorted(KNOWN_TARGETS))
            raise pytest.UsageError(f"unknown contract target {entry!r}; known: {known} "
                                    "(or give a URL with --unibus-url)")
    seen: set[str] = set()
    for target in targets:
        if target.name in seen:
            raise pytest.UsageError(f"contract target {target.name!r} is selected twice; "
                                    "name URLs apart with --unibus-url NAME=URL")
        seen.add(target.name)
    return targets

"""What each real broker container is: image, ports, command, environment, probe, URL.

One :class:`BrokerSpec` per broker. A spec renders a :class:`ContainerConfig` for a
:class:`Layout` (network mode + the ports chosen for this container), and the
same rendering serves the official images (``rabbitmq:4``, ``apache/kafka:4.1.1``,
``nats:2``) and the local stand-ins of :mod:`unibus_contract.images`, which honour
the same variables and arguments.

Ports are chosen on the host first (free ports on 127.0.0.1), and the broker
listens on the *same* port number inside the container. In host-network mode
that is the only way; in port-mapped mode it keeps advertised addresses (Kafka's
``advertised.listeners``) equal to what clients dial.
"""

from __future__ import annotations

import base64
import enum
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from unibus_contract.provision import probes

__all__ = [
    "KAFKA",
    "NATS",
    "RABBITMQ",
    "SPECS",
    "BrokerSpec",
    "ContainerConfig",
    "Layout",
    "NetworkMode",
    "free_port",
]

LOOPBACK = "127.0.0.1"


class NetworkMode(enum.Enum):
    """How a broker container is reached from the tests.

    ``PORTS``: the container has its own network namespace; its client port is
    published on 127.0.0.1 under the same number (users' machines).
    ``HOST``: the container shares the host's network and binds 127.0.0.1 only
    (CI, and engines without a bridge network).
    """

    PORTS = "ports"
    HOST = "host"


@dataclass(frozen=True)
class Layout:
    """Where one container listens.

    Attributes:
        mode: The network mode.
        ports: Port number per port name of the spec, free on the host.
        instance: A short unique id (node names, container names).
    """

    mode: NetworkMode
    ports: Mapping[str, int]
    instance: str

    @property
    def bind(self) -> str:
        """The address the broker binds inside the container."""
        # Published ports reach the container through its own interface, not loopback.
        return LOOPBACK if self.mode is NetworkMode.HOST else "0.0.0.0"


@dataclass(frozen=True)
class ContainerConfig:
    """What the container is started with.

    Attributes:
        env: Environment variables.
        command: Arguments after the image's entrypoint; None keeps the image's CMD.
        files: Files copied into the container before it starts, path -> content.
    """

    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokerSpec:
    """One broker: its image, ports, configuration, readiness probe and URL.

    Attributes:
        name: Short name: ``rabbitmq``, ``kafka`` or ``nats``.
        default_image: The official image a user's machine pulls.
        image_env: Variable overriding the image (local stand-ins in CI).
        port_names: Ports the broker needs; the first is the client port.
        published: Ports published to the host in port-mapped mode.
        url_template: Client URL with ``{port}`` for the client port.
        configure: Renders the container configuration for a layout.
        probe: A real client round trip against a URL; raises until ready.
        ready_timeout: Seconds a start may take to become ready.
        stop_timeout: Seconds a graceful stop may take before SIGKILL.
    """

    name: str
    default_image: str
    image_env: str
    port_names: tuple[str, ...]
    published: tuple[str, ...]
    url_template: str
    configure: Callable[[Layout], ContainerConfig]
    probe: Callable[[str, float], None]
    ready_timeout: float
    stop_timeout: int

    @property
    def image(self) -> str:
        """The image to run: ``$<image_env>`` when set, else the official one."""
        return os.environ.get(self.image_env) or self.default_image

    def url(self, layout: Layout) -> str:
        """The client URL for a container laid out as ``layout``.

        Args:
            layout: The container's layout.

        Returns:
            The URL, always on 127.0.0.1.
        """
        return self.url_template.format(port=layout.ports[self.port_names[0]])


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now.

    Returns:
        The port number (the kernel's choice of an ephemeral port).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _rabbitmq(layout: Layout) -> ContainerConfig:
    ports = layout.ports
    conf = "\n".join(
        [
            "# Written by unibus_contract.provision.",
            "loopback_users = none",
            f"listeners.tcp.default = {layout.bind}:{ports['amqp']}",
            f"prometheus.tcp.ip = {layout.bind}",
            f"prometheus.tcp.port = {ports['prometheus']}",
            "log.console = true",
            "log.console.level = info",
            "log.file = false",
            "",
        ]
    )
    return ContainerConfig(
        env={
            # A unique node name and moved distribution/epmd ports: two brokers
            # sharing the host network must not collide on 25672 / 4369.
            "RABBITMQ_NODENAME": f"rabbit-{layout.instance}@localhost",
            # The official entrypoint switches to long names when the hostname is
            # fully qualified (it is the host's under host networking): keep short.
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_DIST_PORT": str(ports["dist"]),
            "ERL_EPMD_PORT": str(ports["epmd"]),
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        },
        files={"/etc/rabbitmq/conf.d/90-unibus.conf": conf.encode()},
    )


def _cluster_id() -> str:
    """A fresh KRaft cluster id: a UUID in unpadded URL-safe base64.

    Like Kafka's own ``Uuid.randomUuid()``, never one starting with ``-``, which
    command-line parsers (``kafka-storage format --cluster-id ID``) take for an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _kafka(layout: Layout) -> ContainerConfig:
    client, controller = layout.ports["kafka"], layout.ports["controller"]
    return ContainerConfig(
        env={
            "CLUSTER_ID": _cluster_id(),
            "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_LISTENERS": (
                f"PLAINTEXT://{layout.bind}:{client},CONTROLLER://{LOOPBACK}:{controller}"
            ),
            "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{LOOPBACK}:{client}",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": f"1@{LOOPBACK}:{controller}",
            "KAFKA_LOG_DIRS": "/tmp/kraft-combined-logs",  # inside the container
            "KAFKA_NUM_PARTITIONS": "1",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "1",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
            # Fast single-node tests: no wait for more members before the first
            # rebalance, and session timeouts as short as one second allowed.
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
            "KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS": "1000",
            "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m",
        },
    )


def _nats(layout: Layout) -> ContainerConfig:
    return ContainerConfig(
        command=(
            "-js",
            "-a",
            layout.bind,
            "-p",
            str(layout.ports["client"]),
            "-sd",
            "/data",
            "-n",
            f"unibus-{layout.instance}",
        ),
    )


RABBITMQ = BrokerSpec(
    name="rabbitmq",
    default_image="rabbitmq:4",
    image_env="UNIBUS_IMAGE_RABBITMQ",
    port_names=("amqp", "dist", "epmd", "prometheus"),
    published=("amqp",),
    url_template=f"amqp://guest:guest@{LOOPBACK}:{{port}}/",
    configure=_rabbitmq,
    probe=probes.probe_rabbitmq,
    ready_timeout=90.0,
    stop_timeout=20,
)

KAFKA = BrokerSpec(
    name="kafka",
    default_image="apache/kafka:4.1.1",
    image_env="UNIBUS_IMAGE_KAFKA",
    port_names=("kafka", "controller"),
    published=("kafka",),
    url_template=f"kafka://{LOOPBACK}:{{port}}",
    configure=_kafka,
    probe=probes.probe_kafka,
    ready_timeout=120.0,
    stop_timeout=30,
)

NATS = BrokerSpec(
    name="nats",
    default_image="nats:2",
    image_env="UNIBUS_IMAGE_NATS",
    port_names=("client",),
    published=("client",),
    url_template=f"nats://{LOOPBACK}:{{port}}",
    configure=_nats,
    probe=probes.probe_nats,
    ready_timeout=30.0,
    stop_timeout=10,
)

SPECS: Mapping[str, BrokerSpec] = {spec.name: spec for spec in (RABBITMQ, KAFKA, NATS)}

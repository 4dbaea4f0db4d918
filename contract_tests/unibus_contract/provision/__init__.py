"""Real RabbitMQ, Kafka and NATS brokers in containers, for the contract suite.

Usage::

    from unibus_contract.provision import KAFKA, launch, network_mode

    with launch(KAFKA, mode=network_mode()) as broker:
        broker.url          # "kafka://127.0.0.1:41234"
        broker.restart()    # same address afterwards; also pause/unpause, stop/start, kill

Environment:

* ``UNIBUS_IMAGE_RABBITMQ`` / ``UNIBUS_IMAGE_KAFKA`` / ``UNIBUS_IMAGE_NATS``: the image
  to run instead of the official ``rabbitmq:4`` / ``apache/kafka:4.1.1`` / ``nats:2``
  (CI points them at the ``unibus-local/*`` images of :mod:`unibus_contract.images`).
* ``UNIBUS_CONTAINER_NETWORK``: ``ports`` (publish the client port on 127.0.0.1),
  ``host`` (share the host network, bind 127.0.0.1), or ``auto``/unset: ``ports``
  unless the engine has no bridge network.
* ``UNIBUS_REQUIRE_BROKERS=1``: fail, instead of skip, when Docker or a broker's image
  (neither on the engine nor pullable) is missing.

Importing this package needs none of testcontainers, docker or the broker client
libraries: they are imported when a broker is started or probed.
"""

from unibus_contract.provision.broker import Broker, BrokerStartError, launch, network_mode
from unibus_contract.provision.engine import (
    brokers_required,
    docker_unavailable_reason,
    engine_info,
    image_unavailable_reason,
)
from unibus_contract.provision.specs import (
    KAFKA,
    NATS,
    RABBITMQ,
    SPECS,
    BrokerSpec,
    ContainerConfig,
    Layout,
    NetworkMode,
)

__all__ = [
    "KAFKA",
    "NATS",
    "RABBITMQ",
    "SPECS",
    "Broker",
    "BrokerSpec",
    "BrokerStartError",
    "ContainerConfig",
    "Layout",
    "NetworkMode",
    "brokers_required",
    "docker_unavailable_reason",
    "engine_info",
    "image_unavailable_reason",
    "launch",
    "network_mode",
]

"""unibus adapter for Apache Kafka: ``kafka://`` and ``kafka+ssl://`` (confluent-kafka).

See :mod:`unibus_kafka.adapter` for the mapping, the URL format with every option,
the driver bridging and the declared capabilities, and ``docs/adapters/kafka.md``.
Importing this package does not import confluent-kafka: the driver is loaded when
a bus connects.
"""

from unibus_kafka.adapter import KafkaAdapter, delay_topic, retry_topic

__all__ = ["KafkaAdapter", "delay_topic", "retry_topic"]

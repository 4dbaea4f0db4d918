"""unibus adapter for RabbitMQ: ``amqp://`` and ``amqps://`` URLs (aio-pika).

The full description — what the model maps to, the URL format with every option,
the driver and the capabilities — is the docstring of
:mod:`unibus_rabbitmq.adapter`, and ``docs/adapters/rabbitmq.md``.
"""

from unibus_rabbitmq.adapter import RabbitMQAdapter

__all__ = ["RabbitMQAdapter"]

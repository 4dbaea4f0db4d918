"""One error boundary: every driver exception becomes a unibus error, password scrubbed."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiormq.exceptions as amqp
import pytest
from pamqp.commands import Basic

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    PublishFailed,
    UnibusError,
)
from unibus_rabbitmq._errors import map_errors

SECRET = "hunter2-secret"


@pytest.mark.parametrize(("raised", "expected"), [
    (amqp.ProbableAuthenticationError("refused"), AuthenticationFailed),
    (amqp.AuthenticationError("ACCESS_REFUSED"), AuthenticationFailed),
    (amqp.ConnectionNotAllowed("vhost"), AuthenticationFailed),
    (amqp.ConnectionClosed(320, "shutdown"), BrokerUnavailable),
    (amqp.ChannelInvalidStateError("closed"), BrokerUnavailable),
    (ConnectionRefusedError(111, "refused"), BrokerUnavailable),
    (OSError("no route"), BrokerUnavailable),
    (TimeoutError(), BrokerTimeout),
    (amqp.DeliveryError(None, Basic.Nack(delivery_tag=1)), PublishFailed),
    (amqp.ChannelPreconditionFailed("inequivalent arg"), BrokerError),
    (amqp.ChannelNotFoundEntity("no queue"), BrokerError),
    (amqp.AMQPError("anything"), BrokerError),
])
def test_driver_exceptions_map_to_the_unibus_tree(raised: Exception,
                                                  expected: type[UnibusError]) -> None:
    with pytest.raises(expected) as info, map_errors("testing"):
        raise raised
    assert info.value.__cause__ is None or not isinstance(info.value.__cause__, amqp.AMQPError)


def test_password_is_scrubbed_from_mapped_messages() -> None:
    with pytest.raises(BrokerUnavailable) as info, map_errors("connecting", SECRET):
        raise amqp.ConnectionClosed(f"amqp://u:{SECRET}@h/ gone")
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    # The driver's exception is not chained as a cause: tracebacks never print it.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_unibus_errors_and_cancellation_pass_through() -> None:
    with pytest.raises(PublishFailed), map_errors("x"):
        raise PublishFailed("mine")
    with pytest.raises(asyncio.CancelledError), map_errors("x"):
        raise asyncio.CancelledError


def test_foreign_bugs_are_not_disguised() -> None:
    with pytest.raises(KeyError), map_errors("x"):
        raise KeyError("a bug in unibus")


def test_package_imports_without_its_driver() -> None:
    blocked = ["aio_pika", "aiormq", "pamqp"]
    code = ("import sys\n"
            f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
            "import unibus_rabbitmq, unibus\n"
            "a = unibus_rabbitmq.RabbitMQAdapter(unibus.make_url('amqp://h?prefetch=3'))\n"
            "assert a.capabilities.name == 'rabbitmq'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr

"""unibus adapters for NATS: ``nats://`` (JetStream) and ``nats+core://`` (core NATS).

``nats://`` — :class:`JetStreamAdapter` (module :mod:`unibus_nats.adapter`): the full
unibus model. A stream per topic (subject ``<prefix>.<topic>``, limits retention),
a durable pull consumer per group (DeliverPolicy.ALL: new groups replay history),
an ephemeral pull consumer (DeliverPolicy.NEW) per group-less subscription;
publish awaits the PubAck, ``Nats-Msg-Id`` = message id (dedup window);
ack / nak with delay / term + dead-letter publish; ``attempt`` = delivery count;
delayed publish by server message schedules (2.12+) or emulated, never early.

``nats+core://`` — :class:`CoreNatsAdapter` (module :mod:`unibus_nats.core`): core
NATS, honestly at-most-once. Groups are queue groups (competing consumers, fan-out
between groups) that exist only while members are attached; nothing is retained,
nothing is redelivered, publish is not confirmed, ``nack`` raises
``UnsupportedFeature``; its capabilities declare each absence.

URL
    ``nats://[user:password@]host[:port][,host[:port]...][?option=value&...]``
    ``nats+core://[user:password@]host[:port][,...][?option=value&...]``

    Connection options (both): ``prefix``, ``token``, ``nkeys_seed``, ``creds``,
    ``tls``, ``tls_ca``, ``tls_cert``, ``tls_key``, ``tls_hostname``, ``name``,
    ``connect_timeout``, ``reconnect_wait``, ``retry_for``, ``max_message_size``.
    JetStream only: ``storage``, ``replicas``, ``ack_wait``, ``dedup_window``,
    ``max_age``, ``heartbeat``, ``publish_window``, ``publish_timeout``,
    ``max_ack_pending``, ``delayed``. Core only: ``buffer``. Unknown options raise
    ``InvalidURL``. Full table: ``docs/adapters/nats.md``.

Driver
    nats-py, imported lazily: this package imports without it.

Capabilities
    See each adapter's module docstring and ``docs/adapters/nats.md``.
"""

from __future__ import annotations

from unibus_nats.adapter import JetStreamAdapter
from unibus_nats.core import CoreNatsAdapter

__all__ = ["CoreNatsAdapter", "JetStreamAdapter"]

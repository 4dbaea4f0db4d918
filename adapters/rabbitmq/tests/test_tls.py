"""``amqps://`` on a real RabbitMQ with a TLS listener: CA, mutual TLS, verification."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import unibus
from unibus.errors import BrokerUnavailable
from unibus_contract.provision import (
    RABBITMQ,
    ContainerConfig,
    Layout,
    brokers_required,
    docker_unavailable_reason,
    engine_info,
    launch,
    network_mode,
)

pytestmark = pytest.mark.broker

Certs = dict[str, Path]


def make_certs(directory: Path) -> Certs:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=unibus-test-ca")
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ("-extfile", "san.cnf")), ("client", ())):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra)
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key",
                                                  "client.pem", "client.key")}


def tls_config(certs: Certs, layout: Layout) -> ContainerConfig:
    base = RABBITMQ.configure(layout)
    conf = "\n".join([
        f"listeners.ssl.default = {layout.bind}:{layout.ports['amqps']}",
        "ssl_options.cacertfile = /etc/rabbitmq/tls/ca.pem",
        "ssl_options.certfile = /etc/rabbitmq/tls/server.pem",
        "ssl_options.keyfile = /etc/rabbitmq/tls/server.key",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = false",
        "",
    ])
    files = dict(base.files)
    files["/etc/rabbitmq/conf.d/91-tls.conf"] = conf.encode()
    for name in ("ca.pem", "server.pem", "server.key"):
        files[f"/etc/rabbitmq/tls/{name}"] = certs[name].read_bytes()
    return replace(base, files=files)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Certs]]:
    """A RabbitMQ with a TLS listener; yields its TLS port and the certificates."""
    reason = docker_unavailable_reason()
    if reason is not None:
        if brokers_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    if shutil.which("openssl") is None:
        reason = "the openssl command makes the test certificates; it is not installed"
        if brokers_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    certs = make_certs(tmp_path_factory.mktemp("tls"))
    spec = replace(RABBITMQ, port_names=(*RABBITMQ.port_names, "amqps"),
                   published=(*RABBITMQ.published, "amqps"),
                   configure=lambda layout: tls_config(certs, layout))
    with launch(spec, mode=network_mode(has_bridge=engine_info().has_bridge)) as broker:
        port = broker.layout.ports["amqps"]
        # Readiness is probed on the plain port; the TLS listener starts a moment later.
        deadline = time.monotonic() + RABBITMQ.ready_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)   # polling cadence of the readiness check
        yield port, certs


async def round_trip(url: str) -> bytes:
    async with unibus.connect(url) as bus, bus.subscribe("tls", group="g") as sub:
        await bus.publish("tls", b"over tls")
        (delivery,) = await sub.fetch(1, timeout=bus.capabilities.timings.delivery)
        await delivery.ack()
        return delivery.body


async def test_amqps_verifies_the_broker_against_ca_file(tls_broker: tuple[int, Certs]) -> None:
    port, certs = tls_broker
    assert await round_trip(f"amqps://guest:guest@localhost:{port}/?ca_file={certs['ca.pem']}"
                            ) == b"over tls"


async def test_amqps_presents_a_client_certificate(tls_broker: tuple[int, Certs]) -> None:
    port, certs = tls_broker
    url = (f"amqps://guest:guest@127.0.0.1:{port}/?ca_file={certs['ca.pem']}"
           f"&cert_file={certs['client.pem']}&key_file={certs['client.key']}")
    assert await round_trip(url) == b"over tls"


async def test_amqps_refuses_a_broker_it_cannot_verify(tls_broker: tuple[int, Certs]) -> None:
    port, _ = tls_broker
    bus = unibus.connect(f"amqps://guest:guest@127.0.0.1:{port}/?connect_timeout=3")
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await bus.open()
    await bus.aclose()


async def test_amqps_verify_false_skips_the_check(tls_broker: tuple[int, Certs]) -> None:
    port, _ = tls_broker
    assert await round_trip(f"amqps://guest:guest@127.0.0.1:{port}/?verify=false") == b"over tls"

"""A running broker container and its controls, for the contract suite.

:func:`launch` starts a :class:`~unibus_contract.provision.specs.BrokerSpec` with
testcontainers and returns a :class:`Broker` once a real client round trip
succeeded. The broker's address never changes: ``restart``, ``stop``/``start``
and ``pause``/``unpause`` act on the same container, whose ports were fixed on
the host when it was created, so clients can reconnect to the same URL.

The controls block (docker calls and readiness probes); from async tests call
them through ``await asyncio.to_thread(broker.restart)`` so the test's own
clients keep running meanwhile.

Ryuk (testcontainers' reaper) is off unless ``TESTCONTAINERS_RYUK_DISABLED`` says
otherwise, since its image may not be pullable; every container is removed by
:meth:`Broker.close`, and at interpreter exit for any still open.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any

from unibus.url import make_url
from unibus_contract.provision.specs import LOOPBACK, BrokerSpec, Layout, NetworkMode, free_port

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = ["Broker", "BrokerStartError", "launch", "network_mode"]

CONTAINER_LABEL = "org.unibus.contract"

_open: set[Broker] = set()
_open_lock = threading.Lock()


class BrokerStartError(RuntimeError):
    """A broker container did not become ready; the message carries its log tail."""


def network_mode(value: str | None = None, *, has_bridge: bool = True) -> NetworkMode:
    """Resolve the network mode from ``UNIBUS_CONTAINER_NETWORK``.

    Args:
        value: The setting; ``$UNIBUS_CONTAINER_NETWORK`` when None. ``host``,
            ``ports``, or empty/``auto`` for ports unless the engine has no bridge.
        has_bridge: Whether the Docker engine has its default bridge network.

    Returns:
        The mode to start containers in.

    Raises:
        ValueError: The setting is not one of the values above.
    """
    setting = (os.environ.get("UNIBUS_CONTAINER_NETWORK", "") if value is None else value).strip()
    if setting in ("", "auto"):
        return NetworkMode.PORTS if has_bridge else NetworkMode.HOST
    try:
        return NetworkMode(setting.lower())
    except ValueError:
        raise ValueError(
            f"UNIBUS_CONTAINER_NETWORK={setting!r}: expected 'host', 'ports' or 'auto'"
        ) from None


class Broker:
    """A broker running in a container, at a fixed 127.0.0.1 address.

    Attributes:
        spec: What broker this is.
        layout: Its network mode and ports.
        image: The image it runs.
        url: The client URL, e.g. ``nats://127.0.0.1:41234``.
        ready_seconds: Seconds from the first container start to the first
            successful round trip.
        timings: ``(action, seconds to ready)`` for the start and every control
            action that waited for readiness.
    """

    def __init__(self, spec: BrokerSpec, layout: Layout, *, image: str | None = None) -> None:
        """Prepare (not start) a container; use :func:`launch` instead.

        Args:
            spec: The broker.
            layout: Network mode and ports.
            image: Image override; ``spec.image`` when None.
        """
        self.spec = spec
        self.layout = layout
        self.image = image or spec.image
        self.url = spec.url(layout)
        self.ready_seconds: float | None = None
        self.timings: list[tuple[str, float]] = []
        self._closed = False
        config = spec.configure(layout)
        self._container = _container_class()(self.image, env=dict(config.env))
        if config.command is not None:
            self._container.with_command(list(config.command))
        for path, content in config.files.items():
            self._container.with_copy_into_container(content, path)
        kwargs: dict[str, Any] = {
            "labels": {CONTAINER_LABEL: spec.name, f"{CONTAINER_LABEL}.pid": str(os.getpid())},
        }
        if layout.mode is NetworkMode.HOST:
            kwargs["network_mode"] = "host"
        else:
            # Published on loopback only, under the container's own port number.
            # (with_bind_ports cannot take a host address, so set the mapping directly.)
            bindings: dict[str, Any] = self._container.ports
            for name in spec.published:
                port = layout.ports[name]
                bindings[f"{port}/tcp"] = (LOOPBACK, port)
        self._container.with_kwargs(**kwargs)
        self._container.with_name(f"unibus-{spec.name}-{layout.instance}")

    def __repr__(self) -> str:
        return (f"<Broker {self.spec.name} {self.shown_url} image={self.image} "
                f"{self.layout.mode.value}>")

    @property
    def shown_url(self) -> str:
        """The client URL as it may be printed: the password hidden."""
        return str(make_url(self.url))

    @property
    def port(self) -> int:
        """The client port on 127.0.0.1."""
        return self.layout.ports[self.spec.port_names[0]]

    @property
    def container_id(self) -> str:
        """The Docker container id."""
        return str(self._wrapped().id)

    @property
    def status(self) -> str:
        """Docker's view of the container: ``running``, ``paused``, ``exited``..."""
        wrapped = self._wrapped()
        wrapped.reload()
        return str(wrapped.status)

    def _wrapped(self) -> Any:
        return self._container.get_wrapped_container()

    def _boot(self) -> None:
        with _open_lock:
            _open.add(self)
        started = time.monotonic()
        self._container.start()
        self.ready_seconds = self._await_ready("start", started)

    def _await_ready(self, action: str, started: float) -> float:
        deadline = started + self.spec.ready_timeout
        attempts, last_error = 0, "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            try:
                # A refused TCP connect is answer enough; spare the client library's
                # own error logging until something listens.
                socket.create_connection((LOOPBACK, self.port), timeout=min(remaining, 1.0)).close()
                self.spec.probe(self.url, min(remaining, 10.0))
            except Exception as exc:  # the broker is not ready yet: any client error
                last_error = f"{type(exc).__name__}: {exc}"
                if self.status not in ("running", "restarting"):
                    break  # it exited: waiting longer cannot help
                # Polling cadence between probe attempts, not a barrier.
                time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
                continue
            seconds = time.monotonic() - started
            self.timings.append((action, seconds))
            return seconds
        raise BrokerStartError(
            f"{self.spec.name} ({self.image}) not ready {time.monotonic() - started:.1f}s after "
            f"{action}, {attempts} probe(s); container {self.status}; last error: {last_error}\n"
            f"--- container log tail ---\n{self.logs(60)}"
        )

    def wait_ready(self) -> float:
        """Wait until a client round trip succeeds.

        Returns:
            Seconds it took.

        Raises:
            BrokerStartError: Not ready within ``spec.ready_timeout``.
        """
        return self._await_ready("wait", time.monotonic())

    def restart(self, *, wait: bool = True) -> float | None:
        """Restart the broker (graceful stop, then start) at the same address.

        Args:
            wait: Return only once a client round trip succeeds.

        Returns:
            Seconds from the restart call to ready, or None without ``wait``.

        Raises:
            BrokerStartError: Not ready within ``spec.ready_timeout``.
        """
        started = time.monotonic()
        self._wrapped().restart(timeout=self.spec.stop_timeout)
        return self._await_ready("restart", started) if wait else None

    def pause(self) -> None:
        """Freeze every process of the broker (cgroup freezer); connections hang."""
        self._wrapped().pause()

    def unpause(self, *, wait: bool = True) -> float | None:
        """Thaw a paused broker.

        Args:
            wait: Return only once a client round trip succeeds.

        Returns:
            Seconds from the unpause call to ready, or None without ``wait``.

        Raises:
            BrokerStartError: Not ready within ``spec.ready_timeout``.
        """
        started = time.monotonic()
        self._wrapped().unpause()
        return self._await_ready("unpause", started) if wait else None

    def stop(self) -> None:
        """Stop the broker gracefully (SIGTERM, SIGKILL after ``spec.stop_timeout``)."""
        self._wrapped().stop(timeout=self.spec.stop_timeout)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL): a crash, no graceful shutdown."""
        self._wrapped().kill()

    def start(self, *, wait: bool = True) -> float | None:
        """Start a stopped or killed broker again at the same address.

        Args:
            wait: Return only once a client round trip succeeds.

        Returns:
            Seconds from the start call to ready, or None without ``wait``.

        Raises:
            BrokerStartError: Not ready within ``spec.ready_timeout``.
        """
        started = time.monotonic()
        self._wrapped().start()
        return self._await_ready("start", started) if wait else None

    def ensure_running(self) -> float:
        """Bring the broker back from whatever a fault test left it in.

        Unpauses a paused container, starts a stopped or killed one, then waits
        for a client round trip. A test that pauses or stops a shared broker
        calls this in its cleanup.

        Returns:
            Seconds until ready.

        Raises:
            BrokerStartError: Not ready within ``spec.ready_timeout``.
        """
        started = time.monotonic()
        status = self.status
        if status == "paused":
            self._wrapped().unpause()
        elif status not in ("running", "restarting"):
            self._wrapped().start()
        return self._await_ready("ensure_running", started)

    def logs(self, tail: int = 200) -> str:
        """The container's most recent log lines (stdout and stderr).

        Args:
            tail: How many lines.

        Returns:
            The lines, or a note when the logs cannot be read.
        """
        try:
            raw: bytes = self._wrapped().logs(tail=tail)
        except Exception as exc:  # diagnostics only: never mask the real error
            return f"(logs unavailable: {exc})"
        return raw.decode(errors="replace")

    def close(self) -> None:
        """Remove the container (forcibly, with its volumes). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _open_lock:
            _open.discard(self)
        with contextlib.suppress(Exception):  # already gone is fine
            self._container.stop(force=True, delete_volume=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def launch(spec: BrokerSpec, *, mode: NetworkMode, image: str | None = None) -> Broker:
    """Start a broker container and wait until a client round trip succeeds.

    Args:
        spec: The broker to start.
        mode: How the container is networked.
        image: Image override; ``spec.image`` (``$UNIBUS_IMAGE_*`` or official) when None.

    Returns:
        The running broker; call :meth:`Broker.close` when done.

    Raises:
        BrokerStartError: The broker did not become ready; the container is removed.
        Exception: Docker's error when the container cannot be created or started.
    """
    ports = {name: free_port() for name in spec.port_names}
    layout = Layout(mode=mode, ports=ports, instance=uuid.uuid4().hex[:8])
    broker = Broker(spec, layout, image=image)
    try:
        broker._boot()
    except BaseException:
        broker.close()
        raise
    return broker


def _container_class() -> type[DockerContainer]:
    """Import testcontainers on first use, so this module imports without it."""
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.container import DockerContainer

    if "TESTCONTAINERS_RYUK_DISABLED" not in os.environ:
        testcontainers_config.ryuk_disabled = True
    return DockerContainer


@atexit.register
def _close_all() -> None:
    with _open_lock:
        leftovers = list(_open)
    for broker in leftovers:
        broker.close()

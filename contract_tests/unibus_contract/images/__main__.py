"""Build the local stand-in broker images: ``python -m unibus_contract.images``.

Progress and timings go to stderr; with ``--print-env`` stdout carries only the
``export UNIBUS_IMAGE_*=...`` lines, so CI can ``eval "$(... --print-env)"``.
"""

from __future__ import annotations

import argparse
import sys
import time

from unibus_contract.images import RECIPES, BuildError, build, env_exports


def main(argv: list[str] | None = None) -> int:
    """Build the requested images and report what was built or cached.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status: 0 on success, 1 when a build failed.
    """
    parser = argparse.ArgumentParser(
        prog="python -m unibus_contract.images",
        description="Build unibus-local/* broker images from Debian, Maven Central and PyPI.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help=f"images to build (default: all of {', '.join(RECIPES)})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument(
        "--print-env", action="store_true",
        help="print `export UNIBUS_IMAGE_*=...` lines for the built images on stdout",
    )
    parser.add_argument("--no-build", action="store_true", help="only print (with --print-env)")
    args = parser.parse_args(argv)
    names: list[str] = args.names or list(RECIPES)
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")

    if not args.no_build:
        started = time.monotonic()
        for name in names:
            try:
                result = build(RECIPES[name], force=args.force)
            except BuildError as exc:
                print(f"[images] {name}: FAILED: {exc}", file=sys.stderr, flush=True)
                return 1
            state = "cached" if result.cached else "built"
            print(
                f"[images] {result.recipe.tag}: {state} in {result.seconds:.1f}s "
                f"({result.size_mb:.0f} MB)",
                file=sys.stderr,
                flush=True,
            )
        print(f"[images] done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    if args.print_env:
        print("\n".join(env_exports(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

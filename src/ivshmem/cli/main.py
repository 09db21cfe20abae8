"""``ivshmem``: the umbrella command.

Each subcommand lives in its own module under ``ivshmem.cli`` and provides
``register(subparsers) -> None`` (adds its parser and sets ``func``) where ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Modules that provide subcommands, in the order `ivshmem --help` lists them.
SUBCOMMAND_MODULES = (
    "ivshmem.cli.server",
    "ivshmem.cli.client",
    "ivshmem.demo",
    "ivshmem.cli.lab",
    "ivshmem.cli.bench",
    "ivshmem.cli.info",
    "ivshmem.cli.status",
    "ivshmem.cli.device",
    "ivshmem.cli.samples",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem",
        description="Inter-VM shared memory: server, peers, guest driver, messaging, VM lab.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue  # not written yet / not installed in this build
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``ivshmem status SOCKET``: print a running server's status as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import IvshmemError
from ..server import query_status, status_path_for


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="print a running ivshmem-server's status as JSON",
        description="Query the status socket of a running ivshmem-server: peers, vectors, "
        "queue depths, messages sent, clients refused.",
    )
    parser.add_argument("socket", help="the server's socket (-S PATH) or its .status socket")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.socket if args.socket.endswith(".status") else status_path_for(args.socket)
    try:
        print(json.dumps(query_status(path), indent=2))
    except IvshmemError as err:
        print(f"ivshmem status: error: {err}", file=sys.stderr)
        return 1
    return 0

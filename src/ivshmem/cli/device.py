"""``ivshmem-device`` (also ``ivshmem device``): ivshmem PCI devices for QEMU >= 10.1.

::

    ivshmem-device --socket /run/vm1.sock --server /tmp/ivshmem_socket [--vectors N]
                   [--intx] [--event-vector V]
    ivshmem-device --socket /run/vm1.sock --plain --region /dev/shm/x --size 4M
    ivshmem-device --vm socket=/run/vm1.sock,server=/tmp/ivshmem_socket,vectors=2 \\
                   --vm socket=/run/vm2.sock,server=/tmp/ivshmem_socket,event-vector=1

Each VM then gets
``-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/vm1.sock"}}'``.
The process serves every VM from one loop until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .._signals import exit_on_termination
from ..device import DeviceServer, VmSpec
from ..device.model import MAX_MSIX_VECTORS
from ..errors import IvshmemError, UsageError
from ..memory import parse_size

__all__ = ["main", "register"]

_EPILOG = """examples:
  ivshmem-device --socket /run/vm1.sock --server /tmp/ivshmem_socket --vectors 2 --event-vector 1
  ivshmem-device --socket /run/vm2.sock --plain --region /dev/shm/x --size 4M
  ivshmem-device --vm socket=/run/a.sock,server=/tmp/s --vm socket=/run/b.sock,server=/tmp/s

then, for each VM:
  qemu-system-x86_64 ... -device \\
    '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/vm1.sock"}}'
(QEMU >= 10.1; `ivshmem lab fetch --qemu11` gets one). See docs/device.md."""

_VM_KEYS = {"socket", "server", "region", "size", "vectors", "intx", "event-vector", "name"}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="the vfio-user socket QEMU connects to")
    parser.add_argument(
        "--server", metavar="PATH", help="doorbell mode: the ivshmem server's socket"
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain mode: BAR2 from --region/--size, no server"
    )
    parser.add_argument(
        "--region",
        metavar="FILE|/NAME",
        help="plain mode: a file, or /NAME for POSIX shm (default: a memfd of --size)",
    )
    parser.add_argument("--size", metavar="SIZE", help="plain mode: BAR2 size, a power of two")
    parser.add_argument(
        "--vectors", type=int, default=1, help="MSI-X vectors of the device (default 1)"
    )
    parser.add_argument(
        "--intx", action="store_true", help="legacy INTx mode (IntrStatus/IntrMask, pin 1)"
    )
    parser.add_argument(
        "--event-vector",
        type=int,
        metavar="V",
        help="ring vector V when a peer joins or leaves or the server comes and goes",
    )
    parser.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="one more VM (repeatable): socket=, server= or region=/size=, vectors=, intx=1, "
        "event-vector=, name=",
    )
    parser.add_argument("--log-file", metavar="PATH", help="log here instead of stderr")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "device",
        help="serve ivshmem PCI devices to QEMU >= 10.1 over vfio-user",
        description="Serve ivshmem PCI devices to QEMU >= 10.1 (vfio-user-pci), one socket "
        "per VM, doorbell mode (a peer of an ivshmem server) or plain mode.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def _int(key: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"--vm {key}={text!r} is not a number") from None


def _parse_vm(text: str) -> VmSpec:
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _VM_KEYS:
            raise UsageError(
                f"--vm {text!r}: {item!r} is not KEY=VALUE with KEY one of {sorted(_VM_KEYS)}"
            )
        fields[key] = value
    if "socket" not in fields:
        raise UsageError(f"--vm {text!r} has no socket=PATH")
    return _spec(
        socket=fields["socket"],
        server=fields.get("server"),
        plain="server" not in fields,
        region=fields.get("region"),
        size=fields.get("size"),
        vectors=_int("vectors", fields.get("vectors", "1")),
        intx=fields.get("intx", "0") not in ("0", "", "no", "false"),
        event_vector=_int("event-vector", fields["event-vector"])
        if "event-vector" in fields
        else None,
        name=fields.get("name"),
    )


def _spec(
    *,
    socket: str,
    server: str | None,
    plain: bool,
    region: str | None,
    size: str | None,
    vectors: int,
    intx: bool,
    event_vector: int | None,
    name: str | None,
) -> VmSpec:
    if not socket:
        raise UsageError("the vfio-user socket path is empty")
    if plain and server is not None:
        raise UsageError(f"{socket}: choose --server (doorbell mode) or --plain, not both")
    if not plain and server is None:
        raise UsageError(f"{socket}: give --server PATH (doorbell mode) or --plain")
    if server is not None and (region is not None or size is not None):
        raise UsageError(f"{socket}: --region/--size are for --plain; the server gives BAR2")
    if not 1 <= vectors <= MAX_MSIX_VECTORS:
        raise UsageError(f"{socket}: --vectors must be 1..{MAX_MSIX_VECTORS}, not {vectors}")
    if event_vector is not None:
        if plain:
            raise UsageError(f"{socket}: --event-vector needs a server (doorbell mode)")
        limit = 32 if intx else vectors
        if not 0 <= event_vector < limit:
            raise UsageError(
                f"{socket}: --event-vector {event_vector} is not one of the device's vectors "
                f"(0..{limit - 1}; raise --vectors)"
            )
    if intx and plain:
        raise UsageError(f"{socket}: --intx needs a server: plain mode has no interrupts")
    return VmSpec(
        socket=os.path.abspath(socket),
        server=server,
        region=region,
        size=parse_size(size) if size is not None else None,
        vectors=vectors,
        intx=intx,
        event_vector=event_vector,
        name=name,
    )


def _specs(args: argparse.Namespace) -> list[VmSpec]:
    specs = [_parse_vm(text) for text in args.vm]
    if args.socket is not None:
        specs.insert(
            0,
            _spec(
                socket=args.socket,
                server=args.server,
                plain=args.plain,
                region=args.region,
                size=args.size,
                vectors=args.vectors,
                intx=args.intx,
                event_vector=args.event_vector,
                name=None,
            ),
        )
    elif args.server or args.plain or args.region or args.size:
        raise UsageError("--server/--plain/--region/--size describe a VM: add --socket PATH")
    if not specs:
        raise UsageError("no VM to serve: give --socket PATH (or --vm socket=PATH,...)")
    return specs


def _setup_logging(verbose: bool, log_file: str | None) -> None:
    if log_file is not None:
        try:
            handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as err:
            raise UsageError(f"--log-file: cannot open {log_file!r}: {err.strerror}") from err
        fmt = "%(asctime)s ivshmem-device[%(process)d] %(levelname)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s: %(message)s"
        if not os.environ.get("JOURNAL_STREAM"):
            fmt = "%(asctime)s ivshmem-device " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _run(args: argparse.Namespace) -> int:
    try:
        specs = _specs(args)
        _setup_logging(getattr(args, "verbose", False), args.log_file)
        with exit_on_termination(), DeviceServer(specs) as server:
            try:
                server.run()
            except KeyboardInterrupt:
                pass
    except IvshmemError as err:
        print(f"ivshmem-device: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except SystemExit as stop:  # SIGTERM/SIGHUP: the device is closed by now
        return 0 if stop.code in (143, 129) else int(stop.code or 0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ivshmem-device",
        description="Serve ivshmem PCI devices to QEMU >= 10.1 over vfio-user.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

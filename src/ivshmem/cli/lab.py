"""``ivshmem lab``: run Python programs in throw-away guests, prefetch or clean the lab's cache.

::

    ivshmem lab run [-n N] [--socket SOCK | --plain FILE] [--device qemu|vfio-user]
                    [--qemu11] [--iommu] PROGRAM.py [ARGS...]
    ivshmem lab run -c "import ivshmem; print('hi')"
    ivshmem lab fetch [--update] [--qemu11]
    ivshmem lab clean

``run`` exits with the guest's exit status (the first non-zero one with several guests), 124
when a guest timed out and 1 when a guest could not run its program at all.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._signals import exit_on_termination
from ..errors import IvshmemError
from ..lab import GuestError, GuestResult, GuestTimeoutError, Lab, LabError, clean, prepare
from ..lab.guest import DEVICE_KINDS

__all__ = ["register"]

_EXIT_TIMEOUT = 124  # as timeout(1)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="run programs in throw-away VMs (QEMU, software emulation)",
        description=(
            "Boot throw-away Linux guests under QEMU (software emulation) with an ivshmem "
            "device, each running a Python program from this machine with the ivshmem "
            "package importable. The guest kernel and busybox are fetched into a cache once."
        ),
    )
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
    sub = parser.add_subparsers(dest="lab_command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a Python program in N guests",
        description="Run PROGRAM.py (or -c CODE, or -m MODULE) in each of N guests and stream "
        "their output; exits with the guest's status.",
    )
    what = run.add_mutually_exclusive_group()
    what.add_argument("-c", dest="code", metavar="CODE", help="run this Python source instead")
    what.add_argument("-m", dest="module", metavar="MODULE", help="run a module (python -m)")
    run.add_argument(
        "-n", "--guests", type=_at_least_one, default=1, metavar="N", help="guests (1)"
    )
    device = run.add_mutually_exclusive_group()
    device.add_argument(
        "--socket", metavar="SOCK", help="ivshmem-doorbell connected to the server at SOCK"
    )
    device.add_argument("--plain", metavar="FILE", help="ivshmem-plain over the shared FILE")
    run.add_argument("--plain-size", metavar="SIZE", help="size of --plain (default: FILE's)")
    run.add_argument("--vectors", type=int, default=1, help="doorbell vectors per guest (1)")
    run.add_argument(
        "--device",
        choices=DEVICE_KINDS,
        default="qemu",
        help="the ivshmem device of --socket/--plain: QEMU's own (qemu), or this project's "
        "served by an ivshmem-device process the lab starts (vfio-user; runs the guest under "
        "QEMU >= 10.1, prepared in the cache as root)",
    )
    run.add_argument(
        "--qemu11",
        action="store_true",
        help="run the guests under QEMU >= 10.1 even with QEMU's device",
    )
    run.add_argument(
        "--iommu", action="store_true", help="emulated IOMMU and vfio modules (for VFIO in guests)"
    )
    run.add_argument("--memory", default="256M", help="guest RAM (256M)")
    run.add_argument("--cpus", type=int, default=1, help="virtual CPUs per guest (1)")
    run.add_argument("--timeout", type=float, default=600.0, help="kill guests after SEC (600)")
    run.add_argument("--python", metavar="PATH", help="guest interpreter (default: this one)")
    run.add_argument(
        "--load-module",
        action="append",
        default=[],
        metavar="NAME",
        help="extra guest kernel module, e.g. virtio_net (repeatable)",
    )
    run.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra QEMU argument (repeatable; e.g. --qemu-arg=-netdev --qemu-arg=...)",
    )
    run.add_argument("--console", action="store_true", help="print each guest's kernel console")
    run.add_argument("--cache", metavar="DIR", help="lab cache (default ~/.cache/ivshmem/lab)")
    run.add_argument("program", nargs="?", help="the Python program (or first ARG with -c/-m)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    run.set_defaults(func=_run)

    fetch = sub.add_parser("fetch", help="prefetch the guest kernel and busybox into the cache")
    fetch.add_argument(
        "--update", action="store_true", help="fetch Debian's current kernel even if one is cached"
    )
    fetch.add_argument("--cache", metavar="DIR", help="lab cache (default ~/.cache/ivshmem/lab)")
    fetch.add_argument(
        "--qemu11",
        action="store_true",
        help="also get a QEMU >= 10.1 (vfio-user-pci): PATH's, or Debian trixie's into the cache",
    )
    fetch.set_defaults(func=_fetch)

    clean_parser = sub.add_parser("clean", help="remove the lab's cache")
    clean_parser.add_argument("--cache", metavar="DIR", help="lab cache to remove")
    clean_parser.set_defaults(func=_clean)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        # range(0) would run nothing and still exit 0, as if every guest had succeeded.
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    positional = [args.program, *args.args] if args.program is not None else list(args.args)
    program = None
    if args.code is None and args.module is None:
        if not positional:
            print("ivshmem lab run: give PROGRAM.py, -c CODE or -m MODULE", file=sys.stderr)
            return 2
        program, *positional = positional
    # SIGTERM/SIGHUP become SystemExit, so `with Lab()` kills the guests and removes the
    # temporary files on the way out.
    with exit_on_termination():
        return _run_guests(args, program, positional)


def _run_guests(args: argparse.Namespace, program: str | None, positional: list[str]) -> int:
    status = 0
    try:
        with Lab(
            cache_dir=args.cache,
            iommu=args.iommu,
            memory=args.memory,
            cpus=args.cpus,
            python=args.python,
            modules=args.load_module,
            extra_args=args.qemu_arg,
        ) as lab:
            n = args.guests
            guests = [
                lab.start(
                    program,
                    positional,
                    code=args.code,
                    module=args.module,
                    server_socket=args.socket,
                    vectors=args.vectors,
                    plain_path=args.plain,
                    plain_size=args.plain_size,
                    device=args.device,
                    qemu11=True if args.qemu11 else None,
                    timeout=args.timeout,
                    echo=sys.stdout,
                    prefix=f"[g{i}] " if n > 1 else "",
                )
                for i in range(n)
            ]
            for guest in guests:
                try:
                    result = guest.wait()
                except GuestError as err:
                    result = err.result
                    print(f"ivshmem lab: {err}", file=sys.stderr)
                    status = status or (_EXIT_TIMEOUT if isinstance(err, GuestTimeoutError) else 1)
                else:
                    print(f"ivshmem lab: {_summary(result)}", file=sys.stderr)
                    status = status or (result.returncode or 0)
                    # A failure's description has QEMU's log already; a success does not.
                    for line in result.qemu_warnings:
                        print(f"ivshmem lab: {guest.name}: QEMU: {line}", file=sys.stderr)
                if args.console:
                    print(f"--- kernel console of {guest.name} ---", file=sys.stderr)
                    print(result.console.rstrip(), file=sys.stderr)
    except IvshmemError as err:  # the lab's own errors, and bad sizes from the size parser
        print(f"ivshmem lab: {err}", file=sys.stderr)
        return 1
    return status


def _summary(result: GuestResult) -> str:
    boot = f"{result.boot_seconds:.1f}" if result.boot_seconds is not None else "?"
    ran = f"{result.program_seconds:.1f}" if result.program_seconds is not None else "?"
    return f"{result.name} exited with status {result.returncode} (boot {boot} s, program {ran} s)"


def _fetch(args: argparse.Namespace) -> int:
    try:
        # Interrupted, the download's staging directory in the cache is removed on the way out.
        with exit_on_termination():
            assets = prepare(args.cache, update=args.update)
    except LabError as err:
        print(f"ivshmem lab: {err}", file=sys.stderr)
        return 1
    kernel = assets.kernel
    boot = "PVH ELF, no decompression" if kernel.image.name == "vmlinux" else "bzImage"
    print(f"cache      {assets.cache}")
    print(f"kernel     {kernel.version} ({kernel.package}; boots as {boot})")
    print(f"busybox    {assets.busybox}")
    print(f"initramfs  {assets.initramfs}")
    if args.qemu11:
        from ..lab import qemu11

        try:
            with exit_on_termination():
                found = qemu11.prepare(args.cache)
        except LabError as err:
            print(f"ivshmem lab: {err}", file=sys.stderr)
            return 1
        where = found.root if found.root is not None else found.binary
        print(f"qemu11     {found.version_text} ({where})")
    return 0


def _clean(args: argparse.Namespace) -> int:
    try:
        path = clean(args.cache)
    except LabError as err:
        print(f"ivshmem lab: {err}", file=sys.stderr)
        return 1
    print(f"removed {path}")
    return 0

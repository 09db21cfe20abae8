"""What the samples share: the endpoint options, attaching to the formatted region, finding
the other peers, statistics, and printing results.

Every sample is written against :class:`~ivshmem.Endpoint` and :mod:`ivshmem.channel` only;
:func:`open_endpoint` is the one place that knows where the endpoint comes from:

``--endpoint host``   a host process connected to an ivshmem server (``--socket``)
``--endpoint pci``    inside a guest: the ivshmem PCI device, doorbells through VFIO when it is
                      an ``ivshmem-doorbell`` (bound to vfio-pci on the way), polling otherwise
``--endpoint plain``  a plain shared file or POSIX shm object (``--region``), no doorbell

Peers are found in the region's membership table unless ``--peer`` names them: a guest cannot
learn peer ids from its device, but a server started with ``--format`` lists every peer in the
region, and a plain region formatted with ``--format IDS`` carries a static list.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..channel import Membership, NotFormattedError, Region, format_region
from ..channel.channel import DEFAULT_SPIN as CHANNEL_SPIN
from ..endpoint import Endpoint, RegionEndpoint, open_region
from ..errors import IvshmemError, UsageError
from ..memory import parse_size

__all__ = [
    "CheckFailed",
    "SampleError",
    "add_common_arguments",
    "attach",
    "channel_options",
    "describe",
    "discover",
    "emit",
    "given_peers",
    "open_endpoint",
    "percentile",
    "progress",
    "report_errors",
    "run_main",
    "size_arg",
]

ENDPOINTS = ("host", "pci", "plain")
DEFAULT_SOCKET = "/tmp/ivshmem_socket"
DEFAULT_TIMEOUT = 60.0
_POLL = 0.01  # seconds between looks at the membership table / region header while waiting


class SampleError(IvshmemError):
    """A sample cannot run as asked (options, peers not found, region not formatted...)."""


class CheckFailed(SampleError):
    """A message did not carry what it should: data was lost, duplicated, reordered or
    damaged on the way. Always a failure of the run (exit status 1)."""


# -- command line ---------------------------------------------------------------------------


def size_arg(text: str) -> int:
    """argparse type for sizes such as ``64``, ``4K``, ``1M``."""
    try:
        return parse_size(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)  # "inf" is allowed: spin for ever, never sleep
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def _peer_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a peer id") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"peer id {value} is outside 0..65535")
    return value


def _id_list(text: str) -> list[int]:
    ids = [_peer_id(word) for word in text.replace(",", " ").split()]
    if not ids or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r} must list distinct peer ids, e.g. 0,1")
    return ids


def add_common_arguments(
    parser: argparse.ArgumentParser, *, peers: str, many: bool = False
) -> None:
    """The endpoint, peer and channel options every sample takes. ``peers`` is the help of
    ``--peer``, which may be repeated when ``many``."""
    ep = parser.add_argument_group("endpoint (where the shared memory comes from)")
    ep.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="host",
        help="host: a host process connected to an ivshmem server; pci: inside a guest, the "
        "ivshmem PCI device; plain: a shared file with no server (default: host)",
    )
    ep.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"host: the server's Unix socket (default {DEFAULT_SOCKET})",
    )
    ep.add_argument(
        "--vectors",
        type=int,
        metavar="N",
        help="host: vectors per peer, as the server's -n (learned from the server if omitted)",
    )
    ep.add_argument(
        "--device",
        metavar="ADDR",
        help="pci: PCI address or index of the ivshmem device (default: the only one)",
    )
    ep.add_argument(
        "--no-interrupts",
        action="store_true",
        help="pci: do not use VFIO even on an ivshmem-doorbell device; poll the memory",
    )
    ep.add_argument(
        "--region",
        metavar="PATH",
        help="plain: the shared file (e.g. /dev/shm/NAME, the file behind ivshmem-plain) or "
        "shm:NAME",
    )
    ep.add_argument(
        "--region-size",
        type=size_arg,
        metavar="SIZE",
        help="plain: create the file with this size if it does not exist (e.g. 16M)",
    )
    ep.add_argument(
        "--id",
        type=_peer_id,
        metavar="N",
        help="plain, and ivshmem-plain devices: this participant's peer id (no server gives one)",
    )
    ep.add_argument(
        "--format",
        type=_id_list,
        metavar="IDS",
        help="plain, and ivshmem-plain devices: format the region first with a static "
        "membership table of these peer ids (e.g. 0,1). Exactly one participant does this, "
        "and it starts first: the others use the format they find (and wait while there is "
        "none), so one that starts early would attach to an earlier run's format. With a "
        "server, start the server with --format instead.",
    )
    ch = parser.add_argument_group("peers and channels")
    ch.add_argument(
        "--peer", type=_peer_id, metavar="ID", action="append" if many else "store", help=peers
    )
    ch.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up when a peer, the region or a message does not come within this time "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    ch.add_argument(
        "--spin",
        type=_seconds,
        default=CHANNEL_SPIN,
        metavar="SECONDS",
        help="spin this long on the shared index before sleeping on the doorbell (or polling); "
        f"'inf' never sleeps (default {CHANNEL_SPIN:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run_main(
    name: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    doc: str | None,
    argv: Sequence[str] | None,
) -> int:
    """``python -m ivshmem.samples.NAME``: parse, run, turn errors into messages and status.
    The description is the first paragraph of ``doc`` (the sample module's docstring)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m ivshmem.samples.{name}",
        description=(doc or name).strip().split("\n\n")[0],
    )
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return report_errors(name, run)(args)
    except KeyboardInterrupt:
        return 130


def report_errors(name: str, run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Wrap a sample's ``run`` so that this package's errors become one line on stderr and
    exit status 1 (a failed check says so first), instead of a traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CheckFailed as err:
            print(f"{name}: CHECK FAILED: {err}", file=sys.stderr, flush=True)
            return 1
        except IvshmemError as err:
            print(f"{name}: error: {err}", file=sys.stderr, flush=True)
            return 1

    return wrapped


# -- endpoints ------------------------------------------------------------------------------


def open_endpoint(args: argparse.Namespace) -> Endpoint:
    """The endpoint the options ask for (the caller closes it)."""
    if args.endpoint == "host":
        from ..peer import connect

        if args.format is not None:
            raise SampleError(
                "--format is for regions without a server: with a server, start the server "
                "with --format (it then keeps the membership table too)"
            )
        return connect(args.socket, vectors=args.vectors, timeout=max(args.timeout, 1.0))
    if args.endpoint == "pci":
        from ..pci import find_devices, open_pci, select_device

        dev = select_device(find_devices(), args.device)
        if dev.doorbell and args.format is not None:
            raise SampleError(
                f"{dev.describe()} is an ivshmem-doorbell device, whose server owns the "
                "region's layout: start the server with --format instead of --format here"
            )
        if not dev.doorbell and args.id is None:
            raise SampleError(
                f"{dev.describe()} is an ivshmem-plain device: it has no server to hand out "
                "peer ids, so give this participant's id with --id N (and --format on one)"
            )
        interrupts = dev.doorbell and not args.no_interrupts
        return open_pci(
            dev.address,
            interrupts=interrupts,
            bind_vfio=interrupts,
            id=None if dev.doorbell else args.id,
        )
    if args.region is None:
        raise SampleError("--endpoint plain needs --region PATH (a shared file or shm:NAME)")
    if args.id is None:
        raise SampleError(
            "--endpoint plain needs --id N: a plain region has no server to hand out peer "
            "ids, so every participant names its own (and --format lists them all)"
        )
    return open_region(args.region, id=args.id, size=args.region_size)


def _server_keeps(ep: Endpoint) -> bool:
    """Whether a server formats this endpoint's region (a host peer, a doorbell device)."""
    device = getattr(ep, "device", None)
    return getattr(ep, "socket_path", None) is not None or bool(device and device.doorbell)


def describe(ep: Endpoint) -> str:
    """One line saying what the endpoint is and how it waits."""
    waiting = f"doorbells on {ep.vectors} vector(s)" if ep.vectors else "polling, no doorbell"
    socket_path = getattr(ep, "socket_path", None)
    device = getattr(ep, "device", None)
    if socket_path is not None:
        what = f"host peer {ep.id} on {socket_path}"
    elif device is not None:
        what = f"guest device {device.address} ({device.kind}), peer {ep.id}"
    elif isinstance(ep, RegionEndpoint):
        what = f"plain region, peer {ep.id}"
    else:
        what = f"{type(ep).__name__} peer {ep.id}"
    return f"{what}, {ep.size >> 10} KiB, {waiting}"


def attach(ep: Endpoint, args: argparse.Namespace) -> Region:
    """The region's layout, formatting it first with ``--format``.

    Without a server nobody else formats the region, so a participant started before the
    formatting one waits for it (up to ``--timeout``); with a server, a region that is not
    formatted stays so, and the error says how to start the server.
    """
    if args.format is not None:
        if ep.id not in args.format:
            raise SampleError(f"--format {args.format} must include this peer's id {ep.id}")
        format_region(ep, max_peers=len(args.format), peers=args.format)
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            region = Region(ep)
            break
        except NotFormattedError as err:
            if _server_keeps(ep):
                raise SampleError(
                    f"{err}. Samples need the server to format the region and keep its "
                    "membership table: start it with --format (e.g. ivshmem-server -F -S SOCK "
                    "-l 64M -n 2 --memfd --format)"
                ) from err
            if time.monotonic() >= deadline:
                raise SampleError(
                    f"the region was not formatted within {args.timeout:g} s: run the first "
                    "participant with --format IDS (all the peer ids that take part)"
                ) from err
        time.sleep(_POLL)
    snap = Membership(region).snapshot()
    if snap.writer == "static" and ep.id not in snap.peers:
        raise SampleError(
            f"peer id {ep.id} is not in the region's static membership table "
            f"{sorted(snap.peers)}: use one of those ids with --id, or format again"
        )
    return region


def discover(
    ep: Endpoint, region: Region, count: int, given: Sequence[int], timeout: float
) -> list[int]:
    """The ids of the ``count`` other peers: ``given`` (from ``--peer``), or, once the
    membership table lists exactly ``count`` peers besides this one, those (sorted)."""
    me = ep.id
    if given:
        if me in given or len(set(given)) != len(given):
            raise SampleError(f"--peer {list(given)}: give distinct ids other than ours ({me})")
        if len(given) != count:
            raise SampleError(f"this sample needs {count} other peer(s), --peer gave {len(given)}")
        return list(given)
    membership = Membership(region)
    deadline = time.monotonic() + timeout
    while True:
        snap = membership.snapshot()
        others = sorted(snap.peers - {me})
        if len(others) == count:
            return others
        if snap.writer == "none":
            raise SampleError(
                "nobody keeps this region's membership table (formatted without a server or a "
                "static peer list): give the other peer ids with --peer"
            )
        if len(others) > count or snap.writer == "static":
            raise SampleError(
                f"the membership table lists {others or 'no other peers'} besides this peer "
                f"({me}); this sample needs exactly {count}: choose with --peer"
            )
        if time.monotonic() >= deadline:
            raise SampleError(
                f"waited {timeout:g} s for {count} other peer(s) to join; the membership table "
                f"lists {others or 'none'} besides this peer ({me})"
            )
        time.sleep(_POLL)


def given_peers(args: argparse.Namespace) -> list[int]:
    """The ids given with ``--peer`` (one or, where repeatable, several; none: discover)."""
    if args.peer is None:
        return []
    return list(args.peer) if isinstance(args.peer, list) else [args.peer]


def channel_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for Sender/Receiver/Duplex from the common options."""
    # No membership_vector: a ring on it ends a wait with PeerGoneError before the ring is
    # re-checked, so a peer's last message before it leaves could be lost (reported to the
    # channel layer). Liveness is still checked every liveness_interval (0.1 s).
    return {"spin": args.spin, "timeout": args.timeout}


# -- results --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def emit(args: argparse.Namespace, result: dict[str, Any], lines: Sequence[str]) -> None:
    """Print the human-readable lines, or the result as one JSON line with ``--json``."""
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    else:
        for line in lines:
            print(line, flush=True)


def progress(text: str) -> None:
    """A status line for people, on stderr (stdout carries only the result)."""
    print(text, file=sys.stderr, flush=True)

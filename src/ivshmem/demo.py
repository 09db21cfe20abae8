"""The demo behind ``ivshmem demo`` (the README's first command).

It starts a real ``ivshmem-server``, then shows, step by step:

1. host peers: this process and a second host process get ids from the server, write
   greetings into the shared region and ring each other's doorbells;
2. when QEMU is installed and the lab has (or can fetch) its guest kernel: two throw-away
   guests (the VM lab) join the same server, open the ivshmem PCI device with the pure-Python
   VFIO driver, and doorbells go guest->guest, guest->host and host->guest, with the bytes
   each wrote seen by all three, and a measured host<->guest round trip. Otherwise the demo
   says why it skipped this part (and fails instead when ``CI`` is set: CI has QEMU).
   When a QEMU >= 10.1 can be had (:mod:`ivshmem.lab.qemu11`: on PATH, or Debian trixie's,
   prepared once in the lab cache as root), the first guest gets this project's device
   (``ivshmem-device`` over vfio-user) and the second QEMU's ``ivshmem-doorbell``, both under
   that QEMU: the two devices side by side on one server, and the guest on ours reads who is
   there from its registers. Without it both guests get QEMU's device and the demo says why
   (an error with ``CI`` set).

The region is used with a tiny layout of the demo's own: a roster at offset 0 (who takes part)
and one 256-byte slot per peer id from :data:`SLOTS`, in two fields: the peer's greeting
(:data:`GREETING`), written once before it rings anyone and never changed after, and its
progress (:data:`STATUS`: ``ready``, then what it read), which only the host waits on. Keeping
them apart is what makes the guests' exchange deterministic: a guest that has read the other's
greeting moves on and reports, but its own greeting stays what the slower guest is about to
read. A doorbell here always means "look at the memory": wake-ups of one vector may merge, so
the demo never counts them, it re-reads slots.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ._signals import exit_on_termination
from .endpoint import Endpoint
from .errors import IvshmemError
from .launch import start_server, stop_server
from .peer import connect

SLOTS = 4096
SLOT_SIZE = 256
FIELD_SIZE = SLOT_SIZE // 2
GREETING = 0  # field 0 of a slot: written once, before the peer rings anyone
STATUS = 1  # field 1: "ready", then what the peer read (the host polls it)
ROSTER = struct.Struct("<4H")  # host id, guest A id, guest B id, round trips
VECTORS = 2
ROUND_TRIPS = 200
# Seconds the host part's processes wait for each other (only a failure takes that long).
HOST_WAIT = 60.0


def _slot(ep: Endpoint, peer: int, field: int) -> memoryview:
    start = SLOTS + peer * SLOT_SIZE + field * FIELD_SIZE
    return ep.memory[start : start + FIELD_SIZE]


def write_slot(ep: Endpoint, peer: int, text: str, field: int = GREETING) -> None:
    data = text.encode()[: FIELD_SIZE - 1]
    slot = _slot(ep, peer, field)
    slot[: len(data)] = data
    slot[len(data)] = 0


def read_slot(ep: Endpoint, peer: int, field: int = GREETING) -> str:
    raw = bytes(_slot(ep, peer, field))
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def say(text: str) -> None:
    print(text, flush=True)


# -- the server ------------------------------------------------------------------------------


@contextmanager
def running_server(directory: str, size: str = "4M", vectors: int = VECTORS) -> Iterator[str]:
    """Run ``ivshmem-server`` in the foreground as a child; yield its socket path. Its log is
    shown if anything fails."""
    sock = os.path.join(directory, "ivshmem.sock")
    log_path = os.path.join(directory, "server.log")
    proc = start_server(sock, ["-l", size, "-n", str(vectors), "--memfd"], log_path)
    failed = True
    try:
        yield sock
        failed = False
    finally:
        if stop_server(proc) != 0 or failed:
            with open(log_path) as f:
                print(f"--- ivshmem-server's log ---\n{f.read()}---", file=sys.stderr)


# -- part 1: host peers ----------------------------------------------------------------------


def _host_worker(sock: str, host_id: int) -> None:
    """The second host process: greet, ring the first peer, wait for its answer."""
    with connect(sock, vectors=VECTORS) as peer:
        write_slot(peer, peer.id, f"hello from host process {os.getpid()} (peer {peer.id})")
        peer.notify(host_id, 0)
        if peer.wait(1, timeout=HOST_WAIT) is None:
            raise SystemExit("host worker: no answer on vector 1")
        say(f"  peer {peer.id} read: {read_slot(peer, host_id)!r}")


def host_part(sock: str) -> None:
    say("\n== host peers ==")
    with connect(sock, vectors=VECTORS) as me:
        say(f"  this process is peer {me.id}; region {me.size >> 20} MiB, {me.vectors} vectors")
        write_slot(me, me.id, f"hello from the first host process (peer {me.id})")
        ctx = multiprocessing.get_context("spawn")
        # Daemonic, so that multiprocessing's exit hook ends it should this process be
        # interrupted between starting it and the try block below.
        worker = ctx.Process(target=_host_worker, args=(sock, me.id), daemon=True)
        worker.start()
        try:
            # It starts a fresh interpreter that imports this package before it connects:
            # seconds on a loaded machine. Wait as long as it lives, up to HOST_WAIT.
            deadline = time.monotonic() + HOST_WAIT
            while me.wait(0, timeout=0.2) is None:
                if worker.exitcode is not None or time.monotonic() > deadline:
                    raise IvshmemError(
                        f"the second host process never rang (exit status {worker.exitcode})"
                    )
            (other,) = me.peers
            say(f"  peer {other} joined and rang vector 0; its slot says: {read_slot(me, other)!r}")
            me.notify(other, 1)
            worker.join(HOST_WAIT)
            if worker.exitcode != 0:
                raise IvshmemError(f"the second host process failed ({worker.exitcode})")
            # The server tells of the leave once it sees the worker's socket close: on a
            # loaded machine that can come after the join returns.
            gone_by = time.monotonic() + HOST_WAIT
            while other in me.peers and time.monotonic() < gone_by:
                me.wait(timeout=0.05)  # serves the server's messages
            say(f"  peer {other} left; peers now: {sorted(me.peers)}")
        finally:
            if worker.is_alive():
                worker.kill()
                worker.join()


# -- part 2: guests --------------------------------------------------------------------------


def guest_main(timeout: float = 300.0) -> int:
    """Runs inside each lab guest: the guest side of part 2. ``timeout`` bounds each wait
    (the host passes the demo's ``--timeout``: the other guest may boot much later)."""
    from .pci import open_pci

    with open_pci(interrupts=True, bind_vfio=True) as dev:
        ours = dev.extension is not None
        which = "this project's ivshmem-device (vfio-user)" if ours else "QEMU's ivshmem-doorbell"
        print(f"guest: I am peer {dev.id} (IVPosition) on {which}, BAR2 {dev.size >> 20} MiB")
        sys.stdout.flush()
        # Only now, with MSI-X enabled through VFIO, can rings reach us: QEMU drops a ring
        # to a vector that is not enabled. So say "ready" in memory, and the host waits for it.
        return guest_exchange(dev, timeout, registers=ours)


def guest_exchange(
    dev: Endpoint,
    timeout: float,
    *,
    registers: bool = False,
    before_reading: Callable[[], None] | None = None,
) -> int:
    """A guest's part once its device is open: say ready, wait for the host's go, greet the
    other guest and read its greeting, report to the host, then answer its round trips.
    ``registers``: print who the device's registers list (this project's device only).
    ``before_reading`` runs between the other guest's ring and reading its greeting (a test
    holds one guest there to make it the slower one)."""
    me = dev.id
    write_slot(dev, me, "ready", STATUS)
    if dev.wait(0, timeout=timeout) is None:  # host says go: the roster is written
        print("guest: the host never said go", flush=True)
        return 1
    host, a, b, trips = ROSTER.unpack_from(dev.memory, 0)
    other = b if me == a else a
    if registers:  # QEMU's device cannot tell a guest who is there
        # The device learns of joins from the server on its own: it may not have heard of
        # the other guest yet (the host has), so wait until its registers list both.
        deadline = time.monotonic() + timeout
        while not {host, other} <= dev.peers and time.monotonic() < deadline:
            time.sleep(0.01)
        print(f"guest {me}: my device's registers list peers {sorted(dev.peers)}")
    # The greeting goes in before the ring and is never overwritten: however far ahead this
    # guest runs, the other one reads exactly this when our ring reaches it.
    write_slot(dev, me, f"hello from guest peer {me}")
    dev.notify(other, 1)  # guest -> guest
    if dev.wait(1, timeout=timeout) is None:
        print("guest: the other guest never rang", flush=True)
        return 1
    if before_reading is not None:
        before_reading()
    seen = read_slot(dev, other)
    print(f"guest {me}: guest {other} rang me; its slot says {seen!r}")
    print(f"guest {me}: the host's slot says {read_slot(dev, host)!r}", flush=True)
    write_slot(dev, me, f"I read guest {other}'s slot: {seen!r}", STATUS)
    dev.notify(host, 0)  # guest -> host
    for _ in range(trips):  # round trips: host rings 0, we answer on its vector 1
        if dev.wait(0, timeout=timeout) is None:
            print("guest: round trip stalled", flush=True)
            return 1
        dev.notify(host, 1)
    return 0


def guest_part(sock: str, lab_timeout: float, ours: bool) -> None:
    from .lab import Lab

    say("\n== two guests and a host peer ==")
    if ours:
        say(
            "  vm-a gets this project's device (ivshmem-device over vfio-user), vm-b QEMU's "
            "ivshmem-doorbell, both under QEMU >= 10.1"
        )
    say("  booting two throw-away VMs (QEMU, software emulation; ~10-20 s)...")
    with connect(sock, vectors=VECTORS) as host:
        with Lab(iommu=True) as lab:
            before = set(host.peers)
            write_slot(host, host.id, f"hello from host peer {host.id}")
            guests = [
                lab.start(
                    module="ivshmem.demo",
                    args=["guest", "--timeout", str(lab_timeout)],
                    name=name,
                    server_socket=sock,
                    vectors=VECTORS,
                    device="vfio-user" if ours and name == "vm-a" else "qemu",
                    qemu11=True if ours else None,
                    timeout=lab_timeout,
                    echo=sys.stdout,
                    prefix=f"  [{name}] ",
                )
                for name in ("vm-a", "vm-b")
            ]
            deadline = time.monotonic() + lab_timeout
            while len(host.peers - before) < 2:
                if time.monotonic() > deadline:
                    raise IvshmemError("the guests did not join the server in time")
                host.wait(timeout=0.2)
            a, b = sorted(host.peers - before)
            say(f"  guests joined as peers {a} and {b}; host is peer {host.id}")
            # QEMU joins the server when it starts, long before the guest's driver has enabled
            # MSI-X, and a ring before that is dropped: wait until each guest says "ready".
            while any(read_slot(host, g, STATUS) != "ready" for g in (a, b)):
                if time.monotonic() > deadline:
                    raise IvshmemError("the guests did not open their ivshmem devices in time")
                time.sleep(0.05)
            say("  both guests opened the device with VFIO (MSI-X on)")
            ROSTER.pack_into(host.memory, 0, host.id, a, b, ROUND_TRIPS)
            host.notify(a, 0)  # host -> guest
            host.notify(b, 0)
            done: set[int] = set()
            while done != {a, b}:
                if time.monotonic() > deadline:
                    raise IvshmemError("the guests did not report to the host in time")
                # In slices, as Guest.wait: a Ctrl-C taken by one of the lab's threads is
                # acted on only when this thread runs Python code again.
                host.wait(0, timeout=1.0)
                done = {g for g in (a, b) if "I read guest" in read_slot(host, g, STATUS)}
            for g in (a, b):
                say(
                    f"  host read guest {g}'s slot: {read_slot(host, g)!r}, and its report: "
                    f"{read_slot(host, g, STATUS)!r}"
                )
            for g in (a, b):
                times = []
                for _ in range(ROUND_TRIPS):
                    start = time.perf_counter()
                    host.notify(g, 0)
                    if host.wait(1, timeout=30) is None:
                        raise IvshmemError(f"round trip with guest {g} stalled")
                    times.append(time.perf_counter() - start)
                say(
                    f"  host <-> guest {g} doorbell round trip: median "
                    f"{statistics.median(times) * 1e6:.0f} us over {ROUND_TRIPS} "
                    "(guests run under software emulation)"
                )
            results = [guest.wait() for guest in guests]
            for guest, result in zip(guests, results, strict=True):
                if result.returncode != 0:
                    raise IvshmemError(f"guest {guest.name} exited with {result.returncode}")
        # Leaving the lab also stops the device process that served vm-a (a peer of the
        # server like a QEMU), so only now are all the guests' peers gone.
        # The loop ends as soon as they are gone; the bound is for a server that never says.
        gone_by = time.monotonic() + 60
        host.service()
        while host.peers - before and time.monotonic() < gone_by:
            time.sleep(0.05)  # the server tells of a leave when it sees the socket close
            host.service()
        say(f"  guests powered off; host sees peers {sorted(host.peers)} left")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run(args)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def why_no_vms(no_vms: bool) -> str | None:
    """Why the guest part cannot run here, or None when it can. Fetches the lab's guest
    kernel into its cache if needed (once per machine), which is where an offline machine
    or one without Debian's package tools finds out."""
    if no_vms:
        return "--no-vms"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    from .lab import LabSetupError, prepare

    try:
        prepare()
    except LabSetupError as err:
        return f"the VM lab cannot prepare its guest kernel: {err}"
    return None


def why_not_our_device() -> str | None:
    """Why the guests cannot show this project's device (no QEMU >= 10.1 to be had), or
    None. Prepares Debian trixie's QEMU in the lab cache if needed (once per machine, as
    root, about a minute)."""
    from .lab import LabSetupError, qemu11
    from .lab.vmm import qemu11_command

    try:
        qemu11_command(qemu11.prepare())
    except LabSetupError as err:
        return f"no QEMU >= 10.1 for this project's device: {err}"
    return None


def run(args: argparse.Namespace) -> int:
    if getattr(args, "role", None) == "guest":
        return guest_main(args.timeout)
    # SIGTERM/SIGHUP unwind like Ctrl-C: the server is stopped, guests are killed and the
    # temporary directory goes, instead of all three outliving the demo.
    with exit_on_termination():
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    directory = tempfile.mkdtemp(prefix="ivshmem-demo-")
    try:
        with running_server(directory) as sock:
            say(f"ivshmem-server is running: socket {sock}, 4 MiB memfd region, 2 vectors")
            host_part(sock)
            reason = why_no_vms(args.no_vms)
            if reason is None:
                device_reason = why_not_our_device()
                if device_reason is not None:
                    if _in_ci():
                        raise IvshmemError(
                            f"this project's device cannot be shown ({device_reason}), and CI "
                            "is set"
                        )
                    say(f"\n(both guests get QEMU's device: {device_reason})")
                guest_part(sock, args.timeout, ours=device_reason is None)
            elif not args.no_vms and _in_ci():
                # CI promises the whole demo; a silent skip there would hide a broken lab.
                raise IvshmemError(f"the guest part cannot run ({reason}), and CI is set")
            else:
                say(f"\n(skipping the guest part: {reason})")
        say("\nserver stopped; demo finished cleanly")
        return 0
    except IvshmemError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ivshmem.demo")
    _arguments(parser)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", nargs="?", choices=["guest"], help=argparse.SUPPRESS)
    parser.add_argument("--no-vms", action="store_true", help="only the host part")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds the guest part may take"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run a server, host peers and two guests ringing each other",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _arguments(parser)
    parser.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())

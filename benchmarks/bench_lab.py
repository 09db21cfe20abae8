"""Lab benchmark: doorbell round trip and shared-memory copy bandwidth, guests next to host
peers, in one run.

The same measuring code (``peer`` role of this file) runs twice on a fresh ``ivshmem-server``:

* **host peers**: two host processes, endpoints from ``ivshmem.connect``;
* **guests**: two lab VMs (QEMU under TCG *software emulation*, no KVM; emulated IOMMU),
  endpoints from ``ivshmem.open_pci`` with VFIO MSI-X interrupts, each running this very file.

Seat 0 measures, seat 1 echoes. Both announce themselves in the region (a guest cannot learn
peer ids from the device, and a ring sent before its MSI-X vector is enabled is dropped), then:

1. **doorbell round trip**: seat 0 rings seat 1 and waits for the ring back, for ``--seconds``
   (after a warm-up); median and p99 of the individual round trips. Only one ring is ever in
   flight, so merged rings cannot hide anything;
2. **copy bandwidth** (seat 1 has left by then, so it takes no CPU): copying 1, 4 and 16 MiB
   between a private ``bytearray`` and the shared region (BAR2 in a guest) with memoryview
   slice assignment, and with ``numpy.copyto`` when numpy is installed, plus private -> private
   as the baseline of what memcpy costs at all where the code runs. Median of several copies.

Prints one table with the ratio guest/host for each figure (above 1 for times and below 1 for
bandwidths mean the guests are slower). Takes 30-60 s here (two guests boot in parallel).

    .venv/bin/python benchmarks/bench_lab.py
    .venv/bin/python benchmarks/bench_lab.py --seconds 5 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ivshmem
from ivshmem._signals import exit_on_termination
from ivshmem.launch import start_server, stop_server

THIS = Path(__file__).resolve()
MIB = 1 << 20
SIZES_MIB = (1, 4, 16)
REGION = "32M"
# The roster: per seat a run tag and state, then its peer id; after it a stop byte that seat 0
# sets before its last ring.
TAG_STATE = struct.Struct("<II")
PEER_ID = struct.Struct("<I")
ENTRY_SIZE = 16
STOP_OFFSET = 256
DATA_OFFSET = 1 * MIB  # copies use [DATA_OFFSET, DATA_OFFSET + 16 MiB)
READY = 1
WARMUP_ROUNDS = 50
MAX_ROUNDS = 200_000
RESULT_TAG = "BENCH-RESULT"


# -- the measuring peer (host process or guest) ----------------------------------------------


def open_endpoint(args: argparse.Namespace) -> ivshmem.Endpoint:
    if args.endpoint == "host":
        return ivshmem.connect(args.socket, vectors=1, timeout=30)
    return ivshmem.open_pci(interrupts=True, bind_vfio=True)


def wait_for_memory(done: Callable[[], bool], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not done():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def round_trips(ep: ivshmem.Endpoint, other: int, seconds: float) -> list[float]:
    """Seat 0: ring, wait for the ring back; seconds per round trip."""
    times: list[float] = []
    clock = time.perf_counter
    end = None
    for i in range(MAX_ROUNDS + WARMUP_ROUNDS):
        start = clock()
        ep.notify(other, 0)
        if ep.wait(0, timeout=30) is None:
            raise SystemExit(f"round trip {i} stalled: peer {other} did not ring back in 30 s")
        stop = clock()
        if i == WARMUP_ROUNDS:
            end = stop + seconds
        if i >= WARMUP_ROUNDS:
            times.append(stop - start)
            assert end is not None
            if stop >= end:
                break
    return times


def echo(ep: ivshmem.Endpoint, other: int, memory: memoryview) -> int:
    """Seat 1: ring back every ring until seat 0 sets the stop word (then it rings once more)."""
    rounds = 0
    while True:
        if ep.wait(0, timeout=120) is None:
            raise SystemExit("seat 0 went quiet for 120 s")
        # A ring means "look at the memory": the stop word is written before the last ring.
        if memory[STOP_OFFSET]:
            return rounds
        ep.notify(other, 0)
        rounds += 1


def copy_rates(
    ep: ivshmem.Endpoint, sizes_mib: Sequence[int], budget: float
) -> dict[str, dict[str, float]]:
    """MiB/s by operation and size: the median of at least 3 copies, or as many as fit in
    ``budget`` seconds (after one warm-up copy that faults every page in)."""
    largest = max(sizes_mib) * MIB
    if ep.size < DATA_OFFSET + largest:
        raise SystemExit(f"the region ({ep.size} bytes) is too small for {largest} byte copies")
    shared = ep.memory[DATA_OFFSET : DATA_OFFSET + largest]
    private = memoryview(bytearray(os.urandom(largest)))
    other = memoryview(bytearray(largest))
    ops: dict[str, Callable[[int], object]] = {
        "private->private (memoryview)": lambda n: other[:n].__setitem__(slice(None), private[:n]),
        "private->shared (memoryview)": lambda n: shared[:n].__setitem__(slice(None), private[:n]),
        "shared->private (memoryview)": lambda n: private[:n].__setitem__(slice(None), shared[:n]),
    }
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        shared_np = ep.numpy(offset=DATA_OFFSET, count=largest)
        private_np = np.frombuffer(private, dtype=np.uint8)
        ops["private->shared (numpy.copyto)"] = lambda n: np.copyto(shared_np[:n], private_np[:n])
        ops["shared->private (numpy.copyto)"] = lambda n: np.copyto(private_np[:n], shared_np[:n])
    rates: dict[str, dict[str, float]] = {}
    for name, op in ops.items():
        rates[name] = {}
        for mib in sizes_mib:
            n = mib * MIB
            op(n)
            times: list[float] = []
            spent = 0.0
            while len(times) < 3 or spent < budget:
                start = time.perf_counter()
                op(n)
                took = time.perf_counter() - start
                times.append(took)
                spent += took
            rates[name][str(mib)] = mib / statistics.median(times)
    # The last copy into the region was the private bytes: check it landed (cheap sanity).
    ops["private->shared (memoryview)"](largest)
    if bytes(shared[-4096:]) != bytes(private[largest - 4096 : largest]):
        raise SystemExit("a copy into the shared region did not read back")
    return rates


def peer_main(args: argparse.Namespace) -> int:
    with open_endpoint(args) as ep:
        memory = ep.memory
        me, other_seat = args.seat, 1 - args.seat
        # The id first, the tag and state after it; the reader checks those before trusting
        # the id (x86 keeps stores in order, also across processes and TCG guests).
        PEER_ID.pack_into(memory, me * ENTRY_SIZE + TAG_STATE.size, ep.id)
        TAG_STATE.pack_into(memory, me * ENTRY_SIZE, args.run, READY)

        def ready(seat: int) -> bool:
            tag, state = TAG_STATE.unpack_from(memory, seat * ENTRY_SIZE)
            return bool(tag == args.run and state == READY)

        wait_for_memory(lambda: ready(other_seat), 120, "the other seat to be READY")
        (other,) = PEER_ID.unpack_from(memory, other_seat * ENTRY_SIZE + TAG_STATE.size)
        if me == 1:
            rounds = echo(ep, other, memory)
            print(f"seat 1 (peer {ep.id}) echoed {rounds} rings", flush=True)
            return 0
        times = round_trips(ep, other, args.seconds)
        memory[STOP_OFFSET] = 1
        ep.notify(other, 0)
        result: dict[str, Any] = {
            "endpoint": repr(ep),
            "rounds": len(times),
            "rtt_median_us": statistics.median(times) * 1e6,
            "rtt_p99_us": _percentile(times, 0.99) * 1e6,
            "rtt_min_us": min(times) * 1e6,
        }
        # Let seat 1 finish (a guest powers off) before copying, so its CPU is free.
        time.sleep(0.5 if args.endpoint == "host" else 2.0)
        result["copy_mib_s"] = copy_rates(ep, args.sizes, args.copy_budget)
        print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
    return 0


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the orchestrator ------------------------------------------------------------------------


def peer_args(args: argparse.Namespace, endpoint: str, seat: int, run: int) -> list[str]:
    words = ["peer", "--endpoint", endpoint, "--seat", str(seat), "--run", str(run)]
    words += ["--seconds", str(args.seconds), "--copy-budget", str(args.copy_budget)]
    words += ["--sizes", *map(str, args.sizes)]
    return words


def parse_result(output: str, who: str) -> dict[str, Any]:
    match = re.search(rf"^{RESULT_TAG} (\{{.*\}})$", output, re.MULTILINE)
    if match is None:
        raise SystemExit(f"{who} printed no result:\n{output}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


@contextlib.contextmanager
def server(tmp: Path) -> Iterator[str]:
    """A fresh ``ivshmem-server`` (memfd region, one vector); yields its socket path."""
    sock = str(tmp / "ivshmem.sock")
    proc = start_server(sock, ["-l", REGION, "-n", "1", "--memfd"], str(tmp / "server.log"))
    try:
        yield sock
    finally:
        stop_server(proc)


def run_hosts(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run = random.randrange(1, 1 << 32)
    with server(tmp) as sock:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(THIS),
                    *peer_args(args, "host", seat, run),
                    "--socket",
                    sock,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for seat in (0, 1)
        ]
        try:
            outputs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for seat, (p, out) in enumerate(zip(procs, outputs, strict=True)):
            if p.returncode != 0:
                raise SystemExit(f"host seat {seat} failed ({p.returncode}):\n{out}")
    return parse_result(outputs[0], "host seat 0")


def run_guests(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], list[float]]:
    from ivshmem.lab import Lab

    run = random.randrange(1, 1 << 32)
    with server(tmp) as sock, Lab(iommu=True, memory="384M") as lab:
        guests = [
            lab.start(
                THIS,
                peer_args(args, "pci", seat, run),
                name=f"bench{seat}",
                server_socket=sock,
                vectors=1,
                timeout=300,
            )
            for seat in (0, 1)
        ]
        results = [g.wait() for g in guests]
        for r in results:
            r.check()
    boots = [r.boot_seconds for r in results if r.boot_seconds is not None]
    return parse_result(results[0].output, "guest seat 0"), boots


def qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "qemu-system-x86_64 (version unknown)"
    return out.splitlines()[0]


def print_table(host: dict[str, Any], guest: dict[str, Any], boots: list[float]) -> None:
    print()
    print(
        "Guests run under QEMU TCG software emulation (no KVM): every guest instruction is "
        "translated,\nso guest figures measure the emulator as much as ivshmem."
    )
    print(
        f"{qemu_version()}; host {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; guest boot {', '.join(f'{b:.1f}' for b in boots)} s"
    )
    print(f"host:  {host['endpoint']}\nguest: {guest['endpoint']}\n")
    rows: list[tuple[str, float, float, str]] = [
        ("doorbell round trip, median", host["rtt_median_us"], guest["rtt_median_us"], "us"),
        ("doorbell round trip, p99", host["rtt_p99_us"], guest["rtt_p99_us"], "us"),
        ("doorbell round trip, min", host["rtt_min_us"], guest["rtt_min_us"], "us"),
    ]
    for op, by_size in host["copy_mib_s"].items():
        for mib, rate in by_size.items():
            gr = guest["copy_mib_s"].get(op, {}).get(mib)
            rows.append((f"{op}, {mib} MiB", rate, float("nan") if gr is None else gr, "MiB/s"))
    cells = [
        (name, f"{h:.1f} {unit:<5}", f"{g:.1f} {unit:<5}", f"{g / h:.2f}x")
        for name, h, g, unit in rows
    ]
    head = ("measurement", "host peers", "guests (TCG)", "guest/host")
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    print("guest/host: above 1 for round trips, below 1 for bandwidths = guests slower\n")
    for i, row in enumerate([head, *cells]):
        # The name left-aligned, figures right-aligned, so decimal points line up (every
        # figure has one decimal and a unit padded to the same width).
        print(
            "  ".join(
                [
                    row[0].ljust(widths[0]),
                    *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
                ]
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"\nround trips measured: host {host['rounds']}, guest -> guest {guest['rounds']} "
        "(each guest has one vCPU, i.e. one TCG thread on the host)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("role", nargs="?", choices=["peer"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", choices=["host", "pci"], help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--seat", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds of round trips per side (3)"
    )
    parser.add_argument(
        "--copy-budget", type=float, default=0.3, help="seconds per copy measurement (0.3)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES_MIB), help="copy sizes in MiB"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if max(args.sizes) > 16 or min(args.sizes) < 1:
        parser.error("copy sizes must be 1..16 MiB (the region is 32 MiB)")
    if args.role == "peer":
        return peer_main(args)
    # SIGTERM/SIGHUP unwind like Ctrl-C: guests, server and temporary files go with us.
    with exit_on_termination(), tempfile.TemporaryDirectory(prefix="ivb-", dir="/tmp") as tmp:
        print("measuring two host peers ...", file=sys.stderr, flush=True)
        host = run_hosts(args, Path(tmp))
        print("booting two guests and measuring inside them ...", file=sys.stderr, flush=True)
        guest, boots = run_guests(args, Path(tmp))
    if args.json:
        print(json.dumps({"host": host, "guest": guest, "guest_boot_s": boots}, indent=2))
    else:
        print_table(host, guest, boots)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Device benchmark: this project's ivshmem device (``ivshmem-device`` over vfio-user) beside
QEMU's own ``ivshmem-doorbell``, under the same QEMU >= 10.1, the same accelerator (TCG) and
in the same run.

For each device, with the measuring code of ``bench_lab.py`` (its ``peer`` role), on a fresh
``ivshmem-server`` each time:

* **guest <-> guest**: two guests on that device, seat 0 rings seat 1 and waits for the ring
  back (median, p99, min of single round trips; one ring in flight);
* **guest <-> host**: one guest (seat 0) and a host process (seat 1, ``ivshmem.connect``);
* **BAR2 copy bandwidth**: seat 0 copies 1, 4 and 16 MiB between private memory and BAR2
  (memoryview slices, numpy when installed), after seat 1 left; taken from the guest<->host
  run's guest (its CPU is the only busy one then);
* **register costs** (seat 0, before the round trips): one BAR0 read (IVPosition) and one
  doorbell write to a peer id nobody has (the ring goes nowhere), each timed alone: what the
  guest's vCPU pays per register access on that device.

The runs alternate between the devices (ours, QEMU's, ours, QEMU's) so that a change in the
machine's load hits both alike. Prints a table with the ratios ours/QEMU's and the targets
(BAR2 bandwidth >= 0.95x, doorbell round trip <= 1.5x). Takes several minutes: six guest
boots. Needs root and QEMU >= 10.1 (the lab prepares Debian trixie's in its cache).

    .venv/bin/python benchmarks/bench_device.py
    .venv/bin/python benchmarks/bench_device.py --seconds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_lab

import ivshmem
from ivshmem._signals import exit_on_termination

THIS = Path(__file__).resolve()
REGISTERS_TAG = "REGISTER-COSTS"
NOBODY = 0xFFFF  # a peer id no server hands out here: a ring to it goes nowhere
DEVICES = ("vfio-user", "qemu")
LABELS = {"vfio-user": "ours (vfio-user)", "qemu": "QEMU ivshmem-doorbell"}


# -- in the guest ----------------------------------------------------------------------------


def _time_each(op: Callable[[], object], seconds: float) -> list[float]:
    times: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end or len(times) < 20:
        start = clock()
        op()
        times.append(clock() - start)
    return times


def register_costs(seconds: float) -> dict[str, float]:
    """Seat 0 in a guest: the cost of one BAR0 read and one (lost) doorbell write, opened and
    closed here so that bench_lab's peer opens the device afresh."""
    with ivshmem.open_pci(interrupts=True, bind_vfio=True) as ep:
        registers = ep._registers  # the register block itself: no endpoint checks timed
        read = _time_each(registers.ivposition, seconds)
        ring = _time_each(lambda: registers.ring(NOBODY, 0), seconds)
    return {
        "bar0_read_us": statistics.median(read) * 1e6,
        "doorbell_write_us": statistics.median(ring) * 1e6,
        "samples": float(len(read) + len(ring)),
    }


def peer_main(argv: list[str]) -> int:
    args = bench_lab_args(argv)
    if args.seat == 0 and args.endpoint == "pci":
        costs = register_costs(0.5)
        print(f"{REGISTERS_TAG} {json.dumps(costs)}", flush=True)
    return bench_lab.peer_main(args)


def bench_lab_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("--endpoint", choices=["host", "pci"])
    parser.add_argument("--socket")
    parser.add_argument("--seat", type=int)
    parser.add_argument("--run", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--copy-budget", type=float)
    parser.add_argument("--sizes", type=int, nargs="+")
    return parser.parse_args(argv)


# -- the orchestrator ------------------------------------------------------------------------


def _parse(output: str, tag: str, who: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(tag + " "):
            value: dict[str, Any] = json.loads(line[len(tag) + 1 :])
            return value
    raise SystemExit(f"{who} printed no {tag} line:\n{output}")


def run_once(
    args: argparse.Namespace, tmp: Path, device: str, partner: str
) -> tuple[dict[str, Any], dict[str, float], list[float]]:
    """One measurement: seat 0 a guest on ``device``; seat 1 a guest on it too, or a host
    process. Returns bench_lab's result, the register costs, and the guests' boot times."""
    from ivshmem.lab import Lab

    run = random.randrange(1, 1 << 32)
    with bench_lab.server(tmp) as sock, Lab(iommu=True, memory="384M") as lab:

        def guest(seat: int) -> Any:
            return lab.start(
                THIS,
                bench_lab.peer_args(args, "pci", seat, run),
                name=f"seat{seat}",
                server_socket=sock,
                vectors=1,
                device=device,  # type: ignore[arg-type]
                qemu11=True,  # QEMU's device under the same QEMU as ours
                timeout=600,
            )

        seat0 = guest(0)
        host: subprocess.Popen[str] | None = None
        seat1 = None
        if partner == "guest":
            seat1 = guest(1)
        else:
            host = subprocess.Popen(
                [
                    sys.executable,
                    str(bench_lab.THIS),
                    *bench_lab.peer_args(args, "host", 1, run),
                    "--socket",
                    sock,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            results = [g.wait() for g in (seat0, seat1) if g is not None]
            for r in results:
                r.check()
            if host is not None:
                out = host.communicate(timeout=120)[0]
                if host.returncode != 0:
                    raise SystemExit(f"host seat 1 failed ({host.returncode}):\n{out}")
        finally:
            if host is not None and host.poll() is None:
                host.kill()
                host.communicate()
    output = results[0].output
    boots = [r.boot_seconds for r in results if r.boot_seconds is not None]
    return (
        bench_lab.parse_result(output, f"{device} seat 0"),
        {k: float(v) for k, v in _parse(output, REGISTERS_TAG, f"{device} seat 0").items()},
        boots,
    )


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    figures: dict[str, dict[str, Any]] = {d: {} for d in DEVICES}
    boots: list[float] = []
    for partner in ("guest", "host"):
        for device in DEVICES:
            print(f"{LABELS[device]}: guest <-> {partner} ...", file=sys.stderr, flush=True)
            result, costs, booted = run_once(args, tmp, device, partner)
            boots += booted
            figures[device][partner] = result
            figures[device].setdefault("registers", []).append(costs)
    return {"figures": figures, "boots": boots, "qemu": qemu11_version()}


def qemu11_version() -> str:
    from ivshmem.lab import qemu11

    found = qemu11.prepare()
    where = "trixie chroot" if found.root is not None else found.binary
    return f"QEMU {found.version_text} ({where})"


def _median_costs(entries: list[dict[str, float]], key: str) -> float:
    return statistics.median(e[key] for e in entries)


def rows(measured: dict[str, Any]) -> list[tuple[str, float, float, str, str]]:
    """(measurement, ours, QEMU's, unit, target) for the table."""
    ours, qemus = measured["figures"]["vfio-user"], measured["figures"]["qemu"]
    out: list[tuple[str, float, float, str, str]] = []
    for partner in ("guest", "host"):
        for stat in ("median", "p99", "min"):
            key = f"rtt_{stat}_us"
            target = "<= 1.5x" if stat == "median" else ""
            out.append(
                (
                    f"doorbell round trip guest<->{partner}, {stat}",
                    ours[partner][key],
                    qemus[partner][key],
                    "us",
                    target,
                )
            )
    for key, name in (
        ("bar0_read_us", "BAR0 register read"),
        ("doorbell_write_us", "doorbell write"),
    ):
        out.append(
            (
                f"{name} (one access)",
                _median_costs(ours["registers"], key),
                _median_costs(qemus["registers"], key),
                "us",
                "",
            )
        )
    for op, by_size in ours["host"]["copy_mib_s"].items():
        if "private->private" in op:
            continue
        for mib, rate in by_size.items():
            q = qemus["host"]["copy_mib_s"].get(op, {}).get(mib, float("nan"))
            out.append((f"BAR2 {op}, {mib} MiB", rate, q, "MiB/s", ">= 0.95x"))
    return out


def print_table(measured: dict[str, Any]) -> None:
    print()
    print(
        f"{measured['qemu']}, TCG (no KVM), intel-iommu; host {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; guest boots "
        f"{', '.join(f'{b:.0f}' for b in measured['boots'])} s"
    )
    print(
        "The machine is shared and loaded by other work: compare the two columns (same run, "
        "runs alternating), not the absolute figures.\n"
    )
    table = rows(measured)
    cells = [
        (name, f"{o:.1f} {unit:<5}", f"{q:.1f} {unit:<5}", f"{o / q:.2f}x", target)
        for name, o, q, unit, target in table
    ]
    head = ("measurement", "ours", "QEMU's", "ours/QEMU's", "target")
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    for i, row in enumerate([head, *cells]):
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        return peer_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds of round trips per run (3)"
    )
    parser.add_argument(
        "--copy-budget", type=float, default=0.3, help="seconds per copy measurement (0.3)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(bench_lab.SIZES_MIB), help="copy sizes, MiB"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if max(args.sizes) > 16 or min(args.sizes) < 1:
        parser.error("copy sizes must be 1..16 MiB (the region is 32 MiB)")
    with exit_on_termination(), tempfile.TemporaryDirectory(prefix="ivbd-", dir="/tmp") as tmp:
        measured = measure(args, Path(tmp))
    if args.json:
        print(json.dumps(measured, indent=2))
    else:
        print_table(measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())

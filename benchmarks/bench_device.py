"""Device benchmark: this project's ivshmem device (``ivshmem-device`` over vfio-user) beside
QEMU's own ``ivshmem-doorbell``, under the same QEMU >= 10.1, the same accelerator (TCG), in
the same guests at the same moments.

Each of the two guests has **both devices**, connected to one ``ivshmem-server`` (so both
BAR2s are the same memory): device 0 is ours, device 1 QEMU's. Whatever is measured is
measured on the two devices in alternation, one round or one copy at a time, so that the
machine's load (it is shared and busy) hits both alike:

1. **guest <-> guest doorbell round trip**: guest 0 rings guest 1 through one device and
   waits for the ring back through the same device, then the same through the other device,
   and so on for ``--seconds`` (after a warm-up); one ring in flight;
2. **guest <-> host round trip**: the same between guest 0 and a host process (``ivshmem.connect``)
   that rings back whichever device rang it (guest 1 has left);
3. **register costs**: one BAR0 read (IVPosition) and one doorbell write to a peer id nobody
   has (the ring goes nowhere), timed one access at a time, alternating devices;
4. **BAR2 copy bandwidth**: 1, 4 and 16 MiB copies between private memory and BAR2
   (memoryview slices; numpy when installed), alternating devices copy by copy.

By default the lab starts one ``ivshmem-device`` process per guest, so a ring from guest 0 to
guest 1 on our device goes device process -> server's eventfd -> the other device process.
``--one-device-process`` serves both guests' devices from one process instead, which rings
the other guest's interrupt directly (no eventfd hop between device processes).

Prints medians and the ratio ours/QEMU's with the targets (doorbell round trip <= 1.5x, BAR2
bandwidth >= 0.95x). Two guest boots; takes a minute or two. Needs root and QEMU >= 10.1 (the
lab prepares Debian trixie's in its cache).

    .venv/bin/python benchmarks/bench_device.py
    .venv/bin/python benchmarks/bench_device.py --seconds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ivshmem
from ivshmem._signals import exit_on_termination
from ivshmem.launch import start_server, stop_server

THIS = Path(__file__).resolve()
MIB = 1 << 20
SIZES_MIB = (1, 4, 16)
REGION = "32M"
VECTORS = 2
# The roster: one entry per participant (guest 0, guest 1, host): run tag, state, the
# participant's peer id on device 0 (ours) and on device 1 (QEMU's); a host has one id.
ENTRY = struct.Struct("<IIII")
GUEST0, GUEST1, HOST = 0, 1, 2
READY = 1
STOP_GUEST1 = 256  # guest 0 sets these bytes before its last ring to each
STOP_HOST = 257
DATA_OFFSET = MIB
WARMUP_ROUNDS = 20
NOBODY = 0xFFFF  # a peer id nobody has here: a ring to it goes nowhere
RESULT_TAG = "DEVICE-BENCH"
NAMES = ("ours", "qemu")


# -- shared by every participant ------------------------------------------------------------


def publish(memory: memoryview, seat: int, run: int, ids: tuple[int, int]) -> None:
    # The ids first, then tag and state: a reader that sees the state trusts the ids (x86
    # keeps stores in order, also between processes and TCG guests).
    ENTRY.pack_into(memory, seat * ENTRY.size, 0, 0, *ids)
    ENTRY.pack_into(memory, seat * ENTRY.size, run, READY, *ids)


def await_seat(memory: memoryview, seat: int, run: int, seconds: float) -> tuple[int, int]:
    end = time.monotonic() + seconds
    while True:
        tag, state, a, b = ENTRY.unpack_from(memory, seat * ENTRY.size)
        if tag == run and state == READY:
            return a, b
        if time.monotonic() > end:
            raise SystemExit(f"seat {seat} was not ready within {seconds} s")
        time.sleep(0.005)


def open_both() -> tuple[Any, Any]:
    """Our device and QEMU's, told apart by the register extension."""
    first = ivshmem.open_pci(0, interrupts=True, bind_vfio=True)
    try:
        second = ivshmem.open_pci(1, interrupts=True, bind_vfio=True)
    except BaseException:
        first.close()
        raise
    if first.extension is None:
        first, second = second, first
    if first.extension is None or second.extension is not None:
        raise SystemExit("expected one device of ours and one of QEMU's")
    return first, second


# -- guest 0: measures ----------------------------------------------------------------------


def alternate_round_trips(
    ring: Sequence[Callable[[], None]], wait: Sequence[Callable[[], object]], seconds: float
) -> list[list[float]]:
    """Round trips alternating over the devices; per device the list of seconds."""
    times: list[list[float]] = [[] for _ in ring]
    clock = time.perf_counter
    end: float | None = None
    i = 0
    while end is None or clock() < end:
        d = i % len(ring)
        start = clock()
        ring[d]()
        if wait[d]() is None:
            raise SystemExit(f"round trip {i} on {NAMES[d]} stalled for 30 s")
        took = clock() - start
        if i >= WARMUP_ROUNDS * len(ring):
            times[d].append(took)
        elif i == WARMUP_ROUNDS * len(ring) - 1:
            end = clock() + seconds
        i += 1
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e6,
        "min_us": ordered[0] * 1e6,
        "rounds": float(len(ordered)),
    }


def alternate_accesses(ops: Sequence[Callable[[], object]], seconds: float) -> list[float]:
    """Median seconds of one call of each op, calls alternating."""
    times: list[list[float]] = [[] for _ in ops]
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end or len(times[0]) < 50:
        for k, op in enumerate(ops):
            start = clock()
            op()
            times[k].append(clock() - start)
    return [statistics.median(t) for t in times]


def alternate_copies(eps: Sequence[Any], sizes: Sequence[int], budget: float) -> dict[str, Any]:
    """MiB/s per operation, size and device: medians of copies alternating device by device."""
    largest = max(sizes) * MIB
    private = memoryview(bytearray(os.urandom(largest)))
    shared = [ep.memory[DATA_OFFSET : DATA_OFFSET + largest] for ep in eps]
    ops: dict[str, Callable[[memoryview, int], object]] = {
        "private->shared (memoryview)": lambda s, n: s[:n].__setitem__(slice(None), private[:n]),
        "shared->private (memoryview)": lambda s, n: private[:n].__setitem__(slice(None), s[:n]),
    }
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        private_np = np.frombuffer(private, dtype=np.uint8)
        ops["private->shared (numpy.copyto)"] = lambda s, n: np.copyto(
            np.frombuffer(s, dtype=np.uint8)[:n], private_np[:n]
        )
        ops["shared->private (numpy.copyto)"] = lambda s, n: np.copyto(
            private_np[:n], np.frombuffer(s, dtype=np.uint8)[:n]
        )
    clock = time.perf_counter
    rates: dict[str, Any] = {}
    for name, op in ops.items():
        rates[name] = {}
        for mib in sizes:
            n = mib * MIB
            for s in shared:
                op(s, n)  # fault every page in
            times: list[list[float]] = [[] for _ in shared]
            spent = 0.0
            while len(times[0]) < 5 or spent < budget:
                for k, s in enumerate(shared):
                    start = clock()
                    op(s, n)
                    took = clock() - start
                    times[k].append(took)
                    spent += took
            # Medians per device, and the median of the ratios of copies made one right after
            # the other (a load burst from elsewhere hits a pair, not one device's column).
            paired = statistics.median(b / a for a, b in zip(times[0], times[1], strict=True))
            rates[name][str(mib)] = [*(mib / statistics.median(t) for t in times), paired]
    return rates


def guest0(args: argparse.Namespace) -> int:
    ours, qemus = eps = open_both()
    try:
        memory = ours.memory
        publish(memory, GUEST0, args.run, (ours.id, qemus.id))
        peer = await_seat(memory, GUEST1, args.run, 300)
        host = await_seat(memory, HOST, args.run, 300)[0]

        def ringer(ep: Any, to: int, vector: int) -> Callable[[], None]:
            # An endpoint's notify, or a register block's ring (the same store, unchecked).
            act = ep.notify if hasattr(ep, "notify") else ep.ring
            return lambda: act(to, vector)

        def waiter(ep: Any) -> Callable[[], object]:
            return lambda: ep.wait(0, timeout=30)

        waits = [waiter(ep) for ep in eps]
        gg = alternate_round_trips(
            [ringer(ours, peer[0], 0), ringer(qemus, peer[1], 0)], waits, args.seconds
        )
        memory[STOP_GUEST1] = 1
        ours.notify(peer[0], 0)
        # The host tells the devices apart by vector: ours rings its vector 0, QEMU's 1.
        gh = alternate_round_trips(
            [ringer(ours, host, 0), ringer(qemus, host, 1)], waits, args.seconds
        )
        memory[STOP_HOST] = 1
        ours.notify(host, 0)
        time.sleep(1.0)  # let guest 1 power off and the host process end: their CPU is free
        regs = [ep._registers for ep in eps]  # the register blocks: no endpoint checks timed
        reads = alternate_accesses([r.ivposition for r in regs], 0.5)
        writes = alternate_accesses([ringer(r, NOBODY, 0) for r in regs], 0.5)
        copies = alternate_copies(eps, args.sizes, args.copy_budget)
        result = {
            "endpoints": [repr(ep) for ep in eps],
            "guest_guest": [summary(t) for t in gg],
            "guest_host": [summary(t) for t in gh],
            "bar0_read_us": [t * 1e6 for t in reads],
            "doorbell_write_us": [t * 1e6 for t in writes],
            "copy_mib_s": copies,
        }
        print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
    finally:
        for ep in eps:
            ep.close()
    return 0


# -- guest 1 and the host: echo -------------------------------------------------------------


def guest1(args: argparse.Namespace) -> int:
    ours, qemus = eps = open_both()
    try:
        memory = ours.memory
        publish(memory, GUEST1, args.run, (ours.id, qemus.id))
        back = await_seat(memory, GUEST0, args.run, 300)
        fds = {ep.fileno(0): (ep, to) for ep, to in zip(eps, back, strict=True)}
        while True:
            ready, _, _ = select.select(list(fds), [], [], 120)
            if not ready:
                raise SystemExit("guest 0 went quiet for 120 s")
            for fd in ready:
                ep, to = fds[fd]
                if ep.wait(0, timeout=0) is None:
                    continue
                if memory[STOP_GUEST1]:  # written before guest 0's last ring
                    return 0
                ep.notify(to, 0)
    finally:
        for ep in eps:
            ep.close()


def host_echo(args: argparse.Namespace) -> int:
    with ivshmem.connect(args.socket, vectors=VECTORS, timeout=30) as ep:
        memory = ep.memory
        publish(memory, HOST, args.run, (ep.id, ep.id))
        back = await_seat(memory, GUEST0, args.run, 300)
        while True:
            vector = ep.wait(timeout=300)
            if vector is None:
                raise SystemExit("guest 0 went quiet for 300 s")
            if memory[STOP_HOST]:
                return 0
            ep.notify(back[vector], 0)


# -- the orchestrator ------------------------------------------------------------------------


def role_args(args: argparse.Namespace, role: str, run: int) -> list[str]:
    words = ["--role", role, "--run", str(run), "--seconds", str(args.seconds)]
    words += ["--copy-budget", str(args.copy_budget), "--sizes", *map(str, args.sizes)]
    return words


def start_shared_device(sock: str, tmp: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """One ivshmem-device process serving a device for each guest; their sockets."""
    sockets = [str(tmp / f"dev{k}.sock") for k in (0, 1)]
    argv = [sys.executable, "-m", "ivshmem.cli.device"]
    for path in sockets:
        argv += ["--vm", f"socket={path},server={sock},vectors={VECTORS}"]
    log = open(tmp / "device.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 60
    while not all(Path(p).is_socket() for p in sockets):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SystemExit(f"ivshmem-device did not start:\n{(tmp / 'device.log').read_text()}")
        time.sleep(0.02)
    return proc, sockets


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from ivshmem.lab import Doorbell, Lab, VfioUser

    run = random.randrange(1, 1 << 32)
    sock = str(tmp / "ivshmem.sock")
    server = start_server(
        sock, ["-l", REGION, "-n", str(VECTORS), "--memfd"], str(tmp / "server.log")
    )
    shared: subprocess.Popen[bytes] | None = None
    try:
        ours: list[Doorbell | VfioUser] = [Doorbell(sock, VECTORS, "vfio-user")] * 2
        if args.one_device_process:
            shared, sockets = start_shared_device(sock, tmp)
            ours = [VfioUser(path) for path in sockets]
        with Lab(iommu=True, memory="384M") as lab:
            guests = [
                lab.start(
                    THIS,
                    role_args(args, role, run),
                    name=role,
                    devices=[ours[k], Doorbell(sock, VECTORS, "qemu")],
                    timeout=900,
                )
                for k, role in enumerate(("guest0", "guest1"))
            ]
            host = subprocess.Popen(
                [sys.executable, str(THIS), *role_args(args, "host", run), "--socket", sock],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                results = [g.wait() for g in guests]
                for r in results:
                    r.check()
                out = host.communicate(timeout=120)[0]
                if host.returncode != 0:
                    raise SystemExit(f"the host echo failed ({host.returncode}):\n{out}")
            finally:
                if host.poll() is None:
                    host.kill()
                    host.communicate()
    finally:
        if shared is not None:
            shared.terminate()
            shared.wait(30)
        stop_server(server)
    for line in results[0].output.splitlines():
        if line.startswith(RESULT_TAG + " "):
            measured: dict[str, Any] = json.loads(line[len(RESULT_TAG) + 1 :])
            break
    else:
        raise SystemExit(f"guest 0 printed no result:\n{results[0].output}")
    measured["boots"] = [r.boot_seconds for r in results if r.boot_seconds is not None]
    measured["qemu"] = qemu11_version()
    measured["load"] = os.getloadavg()
    measured["device_processes"] = 1 if args.one_device_process else 2
    return measured


def qemu11_version() -> str:
    from ivshmem.lab import qemu11

    found = qemu11.prepare()
    where = "trixie chroot" if found.root is not None else found.binary
    return f"QEMU {found.version_text} ({where})"


def rows(m: dict[str, Any]) -> list[tuple[str, float, float, str, str]]:
    """(measurement, ours, QEMU's, unit, target)."""
    out: list[tuple[str, float, float, str, str]] = []
    for key, what in (("guest_guest", "guest<->guest"), ("guest_host", "guest<->host")):
        for stat in ("median", "p99", "min"):
            ours, qemus = (m[key][d][f"{stat}_us"] for d in (0, 1))
            target = "<= 1.5x" if stat == "median" else ""
            out.append((f"doorbell round trip {what}, {stat}", ours, qemus, "us", target))
    out.append(("BAR0 register read (one)", *m["bar0_read_us"], "us", ""))
    out.append(("doorbell write (one, to nobody)", *m["doorbell_write_us"], "us", ""))
    for op, by_size in m["copy_mib_s"].items():
        for mib, (ours, qemus, _) in by_size.items():
            out.append((f"BAR2 {op}, {mib} MiB", ours, qemus, "MiB/s", ">= 0.95x"))
    return out


def paired_ratios(m: dict[str, Any]) -> list[tuple[str, float]]:
    """Per copy: the median over back-to-back pairs of (our copy's rate / QEMU's)."""
    return [
        (f"BAR2 {op}, {mib} MiB", paired)
        for op, by_size in m["copy_mib_s"].items()
        for mib, (_, _, paired) in by_size.items()
    ]


def print_table(m: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.1f}" for x in m["load"])
    print(
        f"\n{m['qemu']}, TCG (no KVM), intel-iommu (caching-mode); host {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load}; Python {platform.python_version()}; "
        f"guest boots {', '.join(f'{b:.0f}' for b in m['boots'])} s; "
        f"{m['device_processes']} device process(es) for our devices"
    )
    print(
        "Both devices in each guest, measured in alternation: compare the columns, not the "
        "absolute figures\n(the machine is shared and loaded by other work).\n"
    )
    cells = [
        (name, f"{o:.1f} {unit:<5}", f"{q:.1f} {unit:<5}", f"{o / q:.2f}x", target)
        for name, o, q, unit, target in rows(m)
    ]
    head = ("measurement", "ours", "QEMU's", "ours/QEMU's", "target")
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    for i, row in enumerate([head, *cells]):
        figures = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        print("  ".join([row[0].ljust(widths[0]), *figures]).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    gg, gh = m["guest_guest"], m["guest_host"]
    print(
        f"\nround trips per device: guest<->guest {gg[0]['rounds']:.0f}/{gg[1]['rounds']:.0f}, "
        f"guest<->host {gh[0]['rounds']:.0f}/{gh[1]['rounds']:.0f}"
    )
    print("BAR2 bandwidth, ours/QEMU's as the median of back-to-back copy pairs:")
    pairs = paired_ratios(m)
    for name, ratio in pairs:
        print(f"  {name}: {ratio:.2f}x")
    overall = statistics.geometric_mean(ratio for _, ratio in pairs)
    print(f"  all BAR2 copies (geometric mean): {overall:.2f}x (target >= 0.95x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--role", choices=["guest0", "guest1", "host"], help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds of round trips per phase (3)"
    )
    parser.add_argument(
        "--copy-budget", type=float, default=1.0, help="seconds per copy measurement (1)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES_MIB), help="MiB")
    parser.add_argument(
        "--one-device-process",
        action="store_true",
        help="serve both guests' devices of ours from one ivshmem-device process",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if max(args.sizes) > 16 or min(args.sizes) < 1:
        parser.error("copy sizes must be 1..16 MiB (the region is 32 MiB)")
    if args.role == "guest0":
        return guest0(args)
    if args.role == "guest1":
        return guest1(args)
    if args.role == "host":
        return host_echo(args)
    with exit_on_termination(), tempfile.TemporaryDirectory(prefix="ivbd-", dir="/tmp") as tmp:
        print("booting two guests, each with both devices ...", file=sys.stderr, flush=True)
        measured = measure(args, Path(tmp))
    if args.json:
        print(json.dumps(measured, indent=2))
    else:
        print_table(measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())

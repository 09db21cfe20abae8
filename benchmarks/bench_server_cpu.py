"""The server's own CPU time per join and per leave, optionally beside another source tree's.

A fresh server (-M, V=1) gets ``--stay`` peers that stay; then ``--peers`` more join one at a
time (each waits for its own handshake and for the staying peers to hear of it), then leave
one at a time (each leave waits until the staying peers heard it), or all at once with
``--storm``. The server's CPU time (``/proc/PID/task/*/schedstat``) over each phase, divided
by the number of joins or leaves, is the figure: it includes the fan-out's sends, which grow
with the number of peers, so compare runs of the same parameters only.

``--qemu`` also runs QEMU's own server (contrib/ivshmem-server, built once into a cache as
for bench_join.py) on the same clients, and prints the ratio of medians (this / qemu).

``--other SRC`` also runs the server of another source tree (a directory holding the
``ivshmem`` package, e.g. ``src/`` of a ``git archive`` of main, with its C extensions copied
in if it should use them) in the same run, alternating with this tree's, and prints the ratio
of medians (this / other). Pinned apart by default (``--pin``, as in bench_join.py), so the
clients in this process do not take the server's CPU.

It first prints what watching one socket costs in this process: ``loop.add_reader`` and
``remove_reader`` on an asyncio epoll loop against ``register``/``unregister`` on a
``select.epoll`` set (how the server watches client sockets: server/readers.py).

    .venv/bin/python benchmarks/bench_server_cpu.py
    .venv/bin/python benchmarks/bench_server_cpu.py --other /tmp/main/src --runs 15
    .venv/bin/python benchmarks/bench_server_cpu.py --qemu --runs 11
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_join import QemuServer, cpu_seconds, pin, placement
from qemu_server import BuildError, build
from serverproc import RawPeer, ServerProcess, pump_all


def watch_costs(sockets: int = 200, rounds: int = 100) -> tuple[float, float, float, float]:
    """Median µs per socket: add_reader, remove_reader, epoll register, unregister."""
    loop = asyncio.SelectorEventLoop(selectors.EpollSelector())
    epoll = select.epoll()
    pairs = [socket.socketpair() for _ in range(sockets)]
    fds = [a.fileno() for a, _b in pairs]
    clients: dict[int, int] = {}

    def nothing() -> None:
        pass

    try:
        timings: list[tuple[float, float, float, float]] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for fd in fds:
                loop.add_reader(fd, nothing)
            t1 = time.perf_counter()
            for fd in fds:
                loop.remove_reader(fd)
            t2 = time.perf_counter()
            for fd in fds:  # as ClientReaders.add and .discard do it
                epoll.register(fd, select.EPOLLIN)
                clients[fd] = fd
            t3 = time.perf_counter()
            for fd in fds:
                del clients[fd]
                epoll.unregister(fd)
            t4 = time.perf_counter()
            timings.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        a, r, e, u = (statistics.median(t[i] for t in timings) / sockets * 1e6 for i in range(4))
        return a, r, e, u
    finally:
        for x, y in pairs:
            x.close()
            y.close()
        epoll.close()
        loop.close()


def measure(
    socket_path: str, pid: int, stay: int, peers: int, storm: bool, server_cpu: int | None
) -> tuple[float, float]:
    """The server at ``socket_path`` (process ``pid``): its (µs per join, µs per leave)."""
    if server_cpu is not None:
        pin(pid, server_cpu)
    staying = [RawPeer(socket_path) for _ in range(stay)]
    comers: list[RawPeer] = []
    leavers: list[RawPeer] = []
    try:
        ids = set(range(stay))
        pump_all(staying, lambda: all(p.complete(ids - {p.id}, 1) for p in staying))

        def heard(count: int) -> None:
            # The comers read too, so that no queue grows in the server.
            pump_all(staying + comers, lambda: all(len(p.peers) == count for p in staying))

        cpu0 = cpu_seconds(pid)
        for i in range(peers):
            comer = RawPeer(socket_path)
            comers.append(comer)
            comer.wait(lambda c=comer: c.state.own_vectors == 1)  # type: ignore[misc]
            heard(stay - 1 + i + 1)
        cpu1 = cpu_seconds(pid)
        leavers, comers[:] = comers[:], []
        if storm:
            for comer in leavers:
                comer.close()
            heard(stay - 1)
        else:
            for i, comer in enumerate(leavers):
                comer.close()
                heard(stay - 1 + peers - i - 1)
        cpu2 = cpu_seconds(pid)
    finally:
        for peer in staying + comers + leavers:
            peer.close()
    return (cpu1 - cpu0) / peers * 1e6, (cpu2 - cpu1) / peers * 1e6


def run_server(
    source: str | None, stay: int, peers: int, storm: bool, server_cpu: int | None
) -> tuple[float, float]:
    """Our server's (µs per join, µs per leave); ``source`` is another tree's package dir."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = source
    with tempfile.TemporaryDirectory(prefix="ivb-", dir="/tmp") as tmp:
        name = f"ivb-cpu-{os.getpid()}"
        server = ServerProcess(tmp, extra_args=["-M", name], env=env)
        try:
            with server:
                return measure(server.socket_path, server.pid, stay, peers, storm, server_cpu)
        finally:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass


def run_qemu(
    binary: Path, stay: int, peers: int, storm: bool, server_cpu: int | None
) -> tuple[float, float]:
    """QEMU's server's (µs per join, µs per leave), on the same clients."""
    with tempfile.TemporaryDirectory(prefix="ivb-", dir="/tmp") as tmp:
        server = QemuServer(binary, tmp, 1, f"ivb-cpu-qemu-{os.getpid()}")
        try:
            return measure(server.socket_path, server.pid, stay, peers, storm, server_cpu)
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stay", type=int, default=5, help="peers that stay (default 5)")
    parser.add_argument("--peers", type=int, default=100, help="peers that come and go (100)")
    parser.add_argument("--storm", action="store_true", help="they all leave at once")
    parser.add_argument("--runs", type=int, default=9, help="runs per server (medians; 9)")
    parser.add_argument("--other", metavar="SRC", help="another tree's package directory")
    parser.add_argument(
        "--qemu", action="store_true", help="QEMU's server too (built once into a cache)"
    )
    parser.add_argument(
        "--pin", choices=("apart", "same", "none"), default="apart", help="as bench_join.py"
    )
    args = parser.parse_args()
    if args.stay < 1 or args.peers < 1 or args.runs < 1:
        parser.error("--stay, --peers and --runs must be at least 1")
    if args.other is not None and not (Path(args.other) / "ivshmem" / "__init__.py").is_file():
        parser.error(f"--other {args.other}: no ivshmem package there (give its src/ directory)")
    binary: Path | None = None
    if args.qemu:
        try:
            binary = build()  # before pinning: a first build uses every CPU
        except BuildError as err:
            print(f"QEMU's server is not available ({err}); measuring ours only", file=sys.stderr)
    add, remove, register, unregister = watch_costs()
    print(
        f"watching one socket: loop.add_reader {add:.2f} µs, remove_reader {remove:.2f} µs; "
        f"epoll register {register:.2f} µs, unregister {unregister:.2f} µs"
    )
    cpus = placement(args.pin)
    server_cpu = None
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
        server_cpu = cpus[1]
        print(f"placement: this client on CPU {cpus[0]}, each server on CPU {cpus[1]}")
    else:
        print("placement: left to the scheduler")
    trees: dict[str, str | None] = {"this": None}
    if args.other is not None:
        trees["other"] = args.other
    if binary is not None:
        trees["qemu"] = None
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for run in range(args.runs):
        order = list(trees) if run % 2 == 0 else list(reversed(trees))
        for name in order:  # alternating, so that load changes hit all alike
            if name == "qemu":
                assert binary is not None
                result = run_qemu(binary, args.stay, args.peers, args.storm, server_cpu)
            else:
                result = run_server(trees[name], args.stay, args.peers, args.storm, server_cpu)
            results[name].append(result)
    leaving = "all at once" if args.storm else "one at a time"
    print(f"{args.stay} staying, {args.peers} joining one at a time and leaving {leaving}")
    medians = {}
    for name, runs in results.items():
        join = statistics.median(r[0] for r in runs)
        leave = statistics.median(r[1] for r in runs)
        medians[name] = (join, leave)
        print(
            f"{name:>5}: server CPU per join {join:7.1f} µs, per leave {leave:7.1f} µs "
            f"(medians of {len(runs)})"
        )
    for name in ("other", "qemu"):
        if name in medians:
            (tj, tl), (oj, ol) = medians["this"], medians[name]
            print(f"this / {name}: join {tj / oj:.2f}x, leave {tl / ol:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

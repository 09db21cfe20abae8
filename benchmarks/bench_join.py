"""Join throughput and leave latency of ivshmem-server, beside QEMU's own server in the same run.

For each (N, V) a fresh server starts and N raw clients (protocol.Decoder/ClientState over
real sockets, in this process) connect as fast as they can while everything received is read.
The joins end when every client holds its own V vectors and all other N-1 peers with V vectors
each -- i.e. nothing was lost. The server sends 3 + V*N messages per join, V*(N-1) of them to
the joining client and V to each of the others, so the total is about V*N^2 messages, most
carrying an fd. Then LEAVES clients close one at a time, and each leave's latency is the time
from close() until every remaining client has read the leave message.

Both servers serve a POSIX shm object (-M) and get the very same client code. QEMU's server
(contrib/ivshmem-server, built once into a cache by benchmarks/qemu_server.py from Debian's
qemu source package) loses messages once a client's socket buffer is full and aborts at fd
1024 (it uses select()); a cell it does not complete within --timeout is reported as lost.

Reported per server: wall time, joins/s, messages/s, the server's own CPU time per message
(from /proc/PID/task/*/schedstat, in nanoseconds; the Python clients in this process do at
least as much work as the server), how busy this client process was while the peers joined
and during the leaves (its CPU time over the wall time: 100 % means it never waited for the
server, so the figure is the client's own speed, not the server's), the median leave
latency, and ours/QEMU ratios (medians over --runs runs).

Placement (``--pin``): ``apart``, the default where this process may use two CPUs, runs this
process on one CPU and each server on another; ``same`` runs them all on one CPU, where the
server's CPU time comes out of the client's; ``none`` leaves them to the scheduler. On a 2-CPU
VM, unpinned, the scheduler put the client and the server on the same CPU in some runs and
not in others, and each run's joins/s moved by a quarter with that choice, for either server
alike: pinned, each run measures one situation.

    .venv/bin/python benchmarks/bench_join.py                     # both servers, 3 cells
    .venv/bin/python benchmarks/bench_join.py -N 1000 -V 4 --server ours
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu_server import BuildError, build
from serverproc import RawPeer, ServerProcess, pump_all

from ivshmem.server.queues import ACCELERATED as FANOUT_IN_C
from ivshmem.server.sockets import _listening_unix_paths


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far: from /proc/PID/task/*/schedstat (nanoseconds on a
    CPU, all threads) where the kernel has it, else /proc/PID/stat (10 ms clock ticks, too
    coarse for a 50-peer cell: a few ticks in all)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class QemuServer:
    """QEMU's contrib ivshmem-server in the foreground, on a POSIX shm object."""

    def __init__(self, binary: Path, tmp: str, vectors: int, shm_name: str) -> None:
        self.socket_path = os.path.join(tmp, "qemu.sock")
        self.shm_name = shm_name
        self.log_path = os.path.join(tmp, "qemu.log")
        with open(self.log_path, "wb") as log:
            command = [str(binary), "-F", "-S", self.socket_path, "-M", shm_name, "-l", "1M"]
            command += ["-n", str(vectors)]
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while self.socket_path not in (_listening_unix_paths() or set()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's ivshmem-server did not start: {self.log()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(f"/dev/shm/{self.shm_name}")
        except FileNotFoundError:
            pass


def pin(pid: int, cpu: int) -> None:
    """Run every thread of process ``pid`` on ``cpu`` only."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def placement(mode: str) -> tuple[int, int] | None:
    """(client CPU, server CPU) for ``--pin`` ``mode``, or None to leave them to the scheduler
    (``none``, or ``apart`` where this process may use only one CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "same":
        return cpus[0], cpus[0]
    if mode == "none" or len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


#: The server's CPU when pinning (main() sets it): every server measured runs there.
SERVER_CPU: int | None = None


def measure(
    socket_path: str, pid: int, peers: int, vectors: int, leaves: int, timeout: float
) -> dict[str, float]:
    """Join ``peers`` clients, then close ``leaves`` of them one at a time; NaN figures for a
    server that lost messages (did not complete within ``timeout``)."""
    if SERVER_CPU is not None:
        pin(pid, SERVER_CPU)
    cpu0 = cpu_seconds(pid)
    mine0 = time.process_time()
    start = time.perf_counter()
    clients: list[RawPeer] = []
    try:
        for _ in range(peers):
            clients.append(RawPeer(socket_path))
            # Read as we go, as real peers would; the server must cope either way.
            for client in clients[-8:]:
                client.pump(64)
        ids = set(range(peers))
        try:
            pump_all(
                clients,
                lambda: all(
                    c.id is not None and c.complete(ids - {c.id}, vectors) for c in clients
                ),
                timeout=timeout,
            )
        except AssertionError:
            nan = float("nan")
            return {
                "seconds": nan,
                "joins_per_s": nan,
                "messages": nan,
                "cpu_per_msg_us": nan,
                "client_busy": nan,
                "leave_us": nan,
                "leave_busy": nan,
            }
        elapsed = time.perf_counter() - start
        mine = time.process_time() - mine0
        cpu = cpu_seconds(pid) - cpu0
        messages = sum(c.messages for c in clients)
        latencies = []
        leave_wall = 0.0
        leave_mine0 = time.process_time()
        for _ in range(min(leaves, peers - 1)):
            leaving = clients.pop()
            gone = leaving.id
            before = time.perf_counter()
            leaving.close()

            def done(gone: int | None = gone) -> bool:
                return all(gone not in c.peers for c in clients)

            pump_all(clients, done, timeout=timeout)
            latencies.append(time.perf_counter() - before)
            leave_wall += latencies[-1]
        leave_mine = time.process_time() - leave_mine0
        return {
            "seconds": elapsed,
            "joins_per_s": peers / elapsed,
            "messages": messages,
            "cpu_per_msg_us": cpu / messages * 1e6,
            "client_busy": mine / elapsed,
            "leave_us": statistics.median(latencies) * 1e6 if latencies else float("nan"),
            "leave_busy": leave_mine / leave_wall if leave_wall else float("nan"),
        }
    finally:
        for client in clients:
            client.close()


def run_ours(peers: int, vectors: int, leaves: int, timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ivb-", dir="/tmp") as tmp:
        name = f"ivb-ours-{os.getpid()}"
        server = ServerProcess(tmp, size="1M", vectors=vectors, extra_args=["-M", name])
        try:
            with server:
                baseline = server.fd_count()
                result = measure(server.socket_path, server.pid, peers, vectors, leaves, timeout)
                status = server.status()
                expected = peers * (3 + vectors * peers)
                assert status["counters"]["joins"] == peers
                assert status["counters"]["messages_sent"] >= expected
                server.wait_for_fd_count(baseline, timeout=60)
        finally:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
    return result


def run_qemu(
    binary: Path, peers: int, vectors: int, leaves: int, timeout: float
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ivb-", dir="/tmp") as tmp:
        server = QemuServer(binary, tmp, vectors, f"ivb-qemu-{os.getpid()}")
        try:
            return measure(server.socket_path, server.pid, peers, vectors, leaves, timeout)
        finally:
            server.stop()


def _median(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs]
    if any(v != v for v in values):  # a run that lost messages
        return float("nan")
    return statistics.median(values)


def _ratio(ours: dict[str, float], qemu: dict[str, float], key: str) -> str:
    if not qemu[key] or qemu[key] != qemu[key] or ours[key] != ours[key]:
        return "n/a"
    return f"{ours[key] / qemu[key]:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-N", "--peers", type=int, action="append", help="peers (repeatable)")
    parser.add_argument("-V", "--vectors", type=int, action="append", help="vectors (repeatable)")
    parser.add_argument(
        "--server", choices=("both", "ours", "qemu"), default="both", help="default both"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (medians; default 3)")
    parser.add_argument("--leaves", type=int, default=20, help="leaves timed per run")
    parser.add_argument("--timeout", type=float, default=60.0, help="per cell, seconds")
    parser.add_argument(
        "--pin",
        choices=("apart", "same", "none"),
        default="apart",
        help="apart: this client on one CPU, the servers on another (default); same: all on "
        "one CPU; none: left to the scheduler",
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    binary: Path | None = None
    if args.server != "ours":
        try:
            binary = build()  # before pinning: a first build uses every CPU
        except BuildError as err:
            print(f"QEMU's server is not available ({err}); measuring ours only", file=sys.stderr)
    global SERVER_CPU
    cpus = placement(args.pin)
    if cpus is None:
        print("placement: left to the scheduler")
    else:
        os.sched_setaffinity(0, {cpus[0]})
        SERVER_CPU = cpus[1]
        print(f"placement: this client on CPU {cpus[0]}, each server on CPU {cpus[1]}")
    if args.peers or args.vectors:
        cells = [(n, v) for v in args.vectors or [1, 4] for n in args.peers or [50, 200, 1000]]
    else:
        cells = [(50, 1), (200, 1), (50, 4)]
    servers = [name for name in ("ours", "qemu") if args.server in (name, "both")]
    if binary is None and "qemu" in servers:
        servers.remove("qemu")
    if "ours" in servers:
        # The server subprocess inherits IVSHMEM_PURE_PYTHON: it loads what this one loads.
        fanout = "C (_fanout.c)" if FANOUT_IN_C else "Python (IVSHMEM_PURE_PYTHON=1 or not built)"
        print(f"ours: fan-out in {fanout}")
    print(
        f"{'server':>6} {'peers':>6} {'vectors':>7} {'seconds':>8} {'joins/s':>9} "
        f"{'messages':>9} {'cpu us/msg':>10} {'client':>6} {'leave us':>9} {'client':>6}"
    )
    medians: dict[tuple[str, int, int], dict[str, float]] = {}
    for peers, vectors in cells:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for _ in range(args.runs):
            for name in servers:  # interleaved, so that load changes hit both alike
                if name == "ours":
                    runs[name].append(run_ours(peers, vectors, args.leaves, args.timeout))
                else:
                    assert binary is not None
                    runs[name].append(run_qemu(binary, peers, vectors, args.leaves, args.timeout))
        for name in servers:
            m = {k: _median(runs[name], k) for k in runs[name][0]}
            medians[(name, peers, vectors)] = m
            lost = "" if m["seconds"] == m["seconds"] else "  lost messages"
            print(
                f"{name:>6} {peers:>6} {vectors:>7} {m['seconds']:>8.3f} {m['joins_per_s']:>9.0f} "
                f"{m['messages']:>9.0f} {m['cpu_per_msg_us']:>10.2f} {m['client_busy']:>6.0%} "
                f"{m['leave_us']:>9.0f} {m['leave_busy']:>6.0%}{lost}",
                flush=True,
            )
    if len(servers) == 2:
        print("\nours / QEMU (medians; joins/s: higher is better, leave latency: lower)")
        for peers, vectors in cells:
            ours, qemu = medians[("ours", peers, vectors)], medians[("qemu", peers, vectors)]
            print(
                f"  {peers:>5} x {vectors}: joins/s {_ratio(ours, qemu, 'joins_per_s')}, "
                f"leave latency {_ratio(ours, qemu, 'leave_us')}, server CPU per message "
                f"{_ratio(ours, qemu, 'cpu_per_msg_us')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Join throughput of ivshmem-server: N peers joining with V vectors each, every handshake
checked complete.

For each (N, V) a fresh server process starts; N raw clients (protocol.Decoder/ClientState over
real sockets, in this process) connect as fast as they can while everything received is read.
The run ends when every client holds its own V vectors and all other N-1 peers with V vectors
each -- i.e. nothing was lost. The server sends 3 + V*N messages per join, V*(N-1) of them to
the joining client and V to each of the others, so the total is about V*N^2 messages, most
carrying an fd.

Reported: wall time, joins/s, messages/s, and the server's own CPU time per message (from
/proc/PID/stat), since the Python clients in this process do at least as much work as the
server and dominate the wall time.

    .venv/bin/python benchmarks/bench_join.py              # N = 50, 200, 1000; V = 1, 4
    .venv/bin/python benchmarks/bench_join.py -N 1000 -V 4
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverproc import RawPeer, ServerProcess, pump_all


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def run_one(peers: int, vectors: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ivb-", dir="/tmp") as tmp:
        server = ServerProcess(tmp, size="1M", vectors=vectors)
        with server:
            baseline = server.fd_count()
            cpu0 = cpu_seconds(server.pid)
            start = time.perf_counter()
            clients: list[RawPeer] = []
            for _ in range(peers):
                clients.append(RawPeer(server.socket_path))
                # Read as we go, as real peers would; the server must cope either way.
                for client in clients[-8:]:
                    client.pump(64)
            ids = set(range(peers))
            pump_all(
                clients,
                lambda: all(
                    c.id is not None and c.complete(ids - {c.id}, vectors) for c in clients
                ),
                timeout=600,
            )
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(server.pid) - cpu0
            messages = sum(c.messages for c in clients)
            expected = peers * (3 + vectors * peers)
            assert messages == expected, (messages, expected)
            status = server.status()
            assert status["counters"]["peers"] == peers
            assert status["counters"]["messages_sent"] == expected
            for client in clients:
                client.close()
            server.wait_for_fd_count(baseline, timeout=60)
    return {
        "peers": peers,
        "vectors": vectors,
        "seconds": elapsed,
        "joins_per_s": peers / elapsed,
        "messages": messages,
        "messages_per_s": messages / elapsed,
        "server_cpu_s": cpu,
        "server_us_per_message": cpu / messages * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-N", "--peers", type=int, action="append", help="peers (repeatable)")
    parser.add_argument("-V", "--vectors", type=int, action="append", help="vectors (repeatable)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(
        f"{'peers':>6} {'vectors':>7} {'seconds':>8} {'joins/s':>9} {'messages':>9} "
        f"{'msgs/s':>9} {'server cpu s':>12} {'server us/msg':>13}  handshakes"
    )
    for vectors in args.vectors or [1, 4]:
        for peers in args.peers or [50, 200, 1000]:
            r = run_one(peers, vectors)
            print(
                f"{peers:>6} {vectors:>7} {r['seconds']:>8.2f} {r['joins_per_s']:>9.0f} "
                f"{r['messages']:>9.0f} {r['messages_per_s']:>9.0f} {r['server_cpu_s']:>12.2f} "
                f"{r['server_us_per_message']:>13.2f}  all {peers} complete",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

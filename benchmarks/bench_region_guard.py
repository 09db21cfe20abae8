"""What guarding the region costs, and how fast a truncated region is put back.

Two servers with ``--format`` run one after the other: one on a sealed memfd (``--memfd``: the
membership table is written through a mapping) and one on a POSIX shm object (``-M``: written
with pwrite, the size checked with fstat at every join and leave). For each, JOINS clients
join and leave one at a time; printed: the join latency (connect to complete handshake,
which includes the membership write and, for -M, the size check) as median and p99, and the
ratio -M / memfd of the medians, from the same run.

Then, on the -M server, a hostile peer truncates the region to 0 TRUNCATIONS times:

* idle  -- nobody joins: the time until the server's timer has restored the size;
* join  -- a client joins right after the truncate: the time until it has its handshake
           (the size is restored before the fd is sent) and is listed.

Printed: median and p99 of each, the restores the server counted (must equal the
truncations), and whether the server survived (must be yes).

    .venv/bin/python benchmarks/bench_region_guard.py
    .venv/bin/python benchmarks/bench_region_guard.py --joins 500 --truncations 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverproc import RawPeer, ServerProcess

SIZE = "1M"
SIZE_BYTES = 1 << 20


def _joined(path: str) -> RawPeer:
    peer = RawPeer(path)
    peer.wait(lambda: peer.state.state == peer.state.CONNECTED)
    return peer


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def join_latencies(tmp: str, args: list[str], joins: int) -> list[float]:
    with ServerProcess(tmp, size=SIZE, extra_args=["--format", *args]) as server:
        anchor = _joined(server.socket_path)  # one peer that sees every join and leave
        try:
            samples = []
            for _ in range(joins):
                start = time.perf_counter()
                peer = _joined(server.socket_path)
                samples.append(time.perf_counter() - start)
                peer.close()
                anchor.pump()
            return samples
        finally:
            anchor.close()


def truncations(tmp: str, name: str, count: int) -> tuple[list[float], list[float], int, bool]:
    idle: list[float] = []
    join: list[float] = []
    with ServerProcess(tmp, size=SIZE, extra_args=["-M", name, "--format"]) as server:
        hostile = RawPeer(server.socket_path, keep_fds=True)
        try:
            hostile.wait(lambda: hostile.shm_fd is not None and hostile.id is not None)
            fd = hostile.shm_fd
            assert fd is not None
            for _ in range(count):
                start = time.perf_counter()
                os.ftruncate(fd, 0)
                while os.fstat(fd).st_size != SIZE_BYTES:
                    time.sleep(0.0005)
                idle.append(time.perf_counter() - start)
            for _ in range(count):
                start = time.perf_counter()
                os.ftruncate(fd, 0)
                peer = _joined(server.socket_path)
                join.append(time.perf_counter() - start)
                assert os.fstat(fd).st_size == SIZE_BYTES
                peer.close()
                hostile.pump()
            restores = int(server.status()["shared_memory"]["size_restores"])
            alive = server.alive
        finally:
            hostile.close()
    return idle, join, restores, alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=200)
    parser.add_argument("--truncations", type=int, default=30)
    opts = parser.parse_args()
    name = f"ivshmem-bench-guard-{os.getpid()}"
    print("machine load: shared with other work; compare the ratios from one run only")
    try:
        with tempfile.TemporaryDirectory(prefix="ivb-") as tmp:
            sealed = join_latencies(tmp, ["--memfd"], opts.joins)
            guarded = join_latencies(tmp, ["-M", name], opts.joins)
            Path("/dev/shm", name).unlink(missing_ok=True)
            for label, samples in (("memfd (sealed)", sealed), ("-M (guarded)", guarded)):
                med, p99 = _quantiles(samples)
                print(f"join {label:15} median {med * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us")
            ratio = statistics.median(guarded) / statistics.median(sealed)
            print(f"join median ratio -M / memfd: {ratio:.2f}")
            idle, join, restores, alive = truncations(tmp, name, opts.truncations)
            for label, samples in (("idle (timer)", idle), ("next join", join)):
                med, p99 = _quantiles(samples)
                print(
                    f"truncate to 0, restored by {label:13} median {med * 1e3:7.2f} ms   "
                    f"p99 {p99 * 1e3:7.2f} ms"
                )
            print(f"truncations {2 * opts.truncations}, restores counted {restores}, "
                  f"server survived: {'yes' if alive else 'NO'}")  # fmt: skip
            return 0 if alive and restores == 2 * opts.truncations else 1
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())

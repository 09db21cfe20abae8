"""What guarding the region costs a join.

Two servers with ``--format`` run one after the other: one on a sealed memfd (``--memfd``: the
membership table is written through a mapping) and one on a POSIX shm object (``-M``: written
with pwrite, the size checked with fstat at every join). For each, JOINS clients
join and leave one at a time; printed: the join latency (connect to complete handshake,
which includes the membership write and, for -M, the size check) as median and p99, and the
ratio -M / memfd of the medians, from the same run.

What a truncated region does to the server and its peers -- a hostile peer truncating it
again and again while others ping-pong, join and leave -- is measured by
``benchmarks/stress_server.py --truncate N``.

    .venv/bin/python benchmarks/bench_region_guard.py
    .venv/bin/python benchmarks/bench_region_guard.py --joins 500
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=200)
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
            return 0
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())

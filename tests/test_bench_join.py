"""Smoke test of benchmarks/bench_join.py, ours only and tiny: it runs under every placement,
counts every message a join sends, reports its row, and leaves nothing behind. It times
nothing (the figures are the script's to print, not a test's to judge)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_join.py"
PEERS, VECTORS = 6, 2


def _leftovers() -> set[str]:
    """What a run could leave: its POSIX shm objects and its temporary directories."""
    shm = {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith("ivb-")}
    tmp = {f"/tmp/{n}" for n in os.listdir("/tmp") if n.startswith("ivb-")}
    return shm | tmp


@pytest.mark.parametrize("pin", ["apart", "same", "none"])
def test_bench_join_runs_ours_under_every_placement(pin: str) -> None:
    before = _leftovers()
    command = [sys.executable, str(SCRIPT), "--server", "ours", "-N", str(PEERS)]
    command += ["-V", str(VECTORS), "--runs", "1", "--leaves", "3", "--pin", pin]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    if pin == "none" or (pin == "apart" and not two_cpus):
        assert lines[0] == "placement: left to the scheduler"
    else:
        cpus = sorted(os.sched_getaffinity(0))
        server_cpu = cpus[1] if pin == "apart" else cpus[0]
        assert lines[0] == (
            f"placement: this client on CPU {cpus[0]}, each server on CPU {server_cpu}"
        )
    rows = [line.split() for line in lines if line.split()[:1] == ["ours"]]
    assert len(rows) == 1, done.stdout
    _, peers, vectors, seconds, joins, messages, cpu, busy, leave, leave_busy = rows[0]
    assert (int(peers), int(vectors)) == (PEERS, VECTORS)
    # Each client got the version, its id, the region and V vectors of every peer, itself
    # included: nothing lost, nothing extra.
    assert int(messages) == PEERS * (3 + VECTORS * PEERS)
    assert float(seconds) > 0 and float(joins) > 0 and float(cpu) > 0 and float(leave) > 0
    assert busy.endswith("%") and leave_busy.endswith("%")
    assert _leftovers() == before

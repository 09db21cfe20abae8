"""Smoke test of benchmarks/bench_server_cpu.py, tiny: with --other (this tree's own package,
as a stand-in for another tree), one at a time and as a storm, it prints a figure per server
and their ratio, and leaves nothing behind; a directory without the package is refused. It
times nothing (the figures are the script's to print, not a test's to judge)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ivshmem

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_server_cpu.py"
PACKAGE_DIR = str(Path(ivshmem.__file__).resolve().parent.parent)


def _leftovers() -> set[str]:
    """What a run could leave: its POSIX shm objects and its temporary directories."""
    shm = {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith("ivb-")}
    tmp = {f"/tmp/{n}" for n in os.listdir("/tmp") if n.startswith("ivb-")}
    return shm | tmp


@pytest.mark.parametrize("storm", [False, True])
def test_bench_server_cpu_compares_two_trees(storm: bool) -> None:
    before = _leftovers()
    command = [sys.executable, str(SCRIPT), "--stay", "2", "--peers", "4", "--runs", "2"]
    command += ["--other", PACKAGE_DIR, "--pin", "none"] + (["--storm"] if storm else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"^watching one socket: loop.add_reader [0-9.]+ µs", out, re.M), out
    assert f"leaving {'all at once' if storm else 'one at a time'}" in out
    for name in ("this", "other"):
        found = re.search(
            rf"^ *{name}: server CPU per join +([0-9.]+) µs, per leave +([0-9.]+)", out, re.M
        )
        assert found and float(found[1]) > 0 and float(found[2]) > 0, out
    assert re.search(r"^this / other: join [0-9.]+x, leave [0-9.]+x$", out, re.M), out
    assert _leftovers() == before


def test_bench_server_cpu_refuses_a_tree_without_the_package(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--other", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "no ivshmem package there" in done.stderr

"""The README's first command: ``ivshmem demo`` (what scripts/demo.sh runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem.demo", *args],
        capture_output=True,
        text=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )


def test_host_part_rings_and_shares_bytes_then_exits_cleanly() -> None:
    proc = run_demo("--no-vms")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "this process is peer 0" in out
    assert "peer 1 joined and rang vector 0; its slot says: 'hello from host process" in out
    assert "peer 1 read: 'hello from the first host process (peer 0)'" in out
    assert "peer 1 left; peers now: []" in out
    assert "demo finished cleanly" in out


@pytest.mark.lab
def test_full_demo_with_two_guests(qemu_binary: str) -> None:
    before = set(os.listdir("/dev/shm"))
    proc = run_demo()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "both guests opened the device with VFIO (MSI-X on)" in out
    assert out.count("rang me; its slot says 'hello from guest peer") == 2  # guest -> guest
    assert out.count("I read guest") >= 2  # guest -> host, seen by the host
    assert out.count("doorbell round trip: median") == 2  # host -> guest and back
    assert "host sees peers [] left" in out
    assert set(os.listdir("/dev/shm")) <= before

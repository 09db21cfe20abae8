"""The README's first command: ``ivshmem demo`` (what scripts/demo.sh runs)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import require

from ivshmem import demo
from ivshmem.peer import connect


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem.demo", *args],
        capture_output=True,
        text=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )


def shm_objects() -> set[str]:
    """What the demo could leave in /dev/shm: this project's objects (the server's ``-M``
    default is ``ivshmem``) and Python multiprocessing's (semaphores, SharedMemory). Other
    programs on a shared machine (benchmarks' iceoryx2, Zenoh) come and go meanwhile, and
    are not the demo's."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(("ivshmem", "sem.mp-", "psm_"))}


def children(ppid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            tail = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(tail[1]) == ppid and tail[0] != "Z":
            found.add(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_host_part_rings_and_shares_bytes_then_exits_cleanly() -> None:
    proc = run_demo("--no-vms")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "this process is peer 0" in out
    assert "peer 1 joined and rang vector 0; its slot says: 'hello from host process" in out
    assert "peer 1 read: 'hello from the first host process (peer 0)'" in out
    assert "peer 1 left; peers now: []" in out
    assert "demo finished cleanly" in out


def test_sigterm_stops_the_server_and_removes_the_temporary_directory() -> None:
    before = shm_objects()
    demo = subprocess.Popen(
        [sys.executable, "-m", "ivshmem.demo", "--no-vms"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert demo.stdout is not None
        out = b""
        deadline = time.monotonic() + 60
        # The known point: the host peer has joined and is starting the second host process,
        # which it then waits for; the server runs and the temporary directory exists.
        while b"this process is peer" not in out:
            assert time.monotonic() < deadline, out
            ready, _, _ = select.select([demo.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(demo.stdout.fileno(), 4096)
                assert chunk, out
                out += chunk
        match = re.search(rb"socket (\S+)/ivshmem\.sock", out)
        assert match is not None, out
        directory = Path(os.fsdecode(match.group(1)))
        assert directory.name.startswith("ivshmem-demo-") and directory.is_dir()
        # Signal once the second host process exists (it imports for a good while before it
        # connects), so that it must be ended too.
        while not any(b"spawn_main" in cmdline(pid) for pid in children(demo.pid)):
            assert time.monotonic() < deadline, "the second host process never started"
            time.sleep(0.002)
        helpers = children(demo.pid)
        assert any(b"ivshmem.cli.server" in cmdline(pid) for pid in helpers), helpers
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 128 + signal.SIGTERM
        rest = demo.stdout.read()
        assert b"demo finished cleanly" not in out + rest, "the signal came too late"
        assert not directory.exists()
        # The server, the second host process and multiprocessing's helper all end.
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in helpers if alive(pid)]
        assert shm_objects() <= before
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for stream in (demo.stdout, demo.stderr):
            assert stream is not None
            stream.close()


def test_the_slower_guest_reads_the_faster_ones_greeting_not_its_report(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The guests' exchange, run by two host peers on a real server (a guest's device and a
    # host peer are both Endpoints), with the race forced: guest B is held after guest A's
    # ring until A has read B's greeting and reported to the host. B must still read A's
    # greeting (a report written over it was the flaky full demo's race).
    with demo.running_server(str(short_tmp)) as sock:
        with (
            connect(sock, vectors=demo.VECTORS) as host,
            connect(sock, vectors=demo.VECTORS) as a,
            connect(sock, vectors=demo.VECTORS) as b,
        ):
            demo.write_slot(host, host.id, f"hello from host peer {host.id}")

            def a_has_reported() -> None:
                deadline = time.monotonic() + 30
                while "I read guest" not in demo.read_slot(b, a.id, demo.STATUS):
                    assert time.monotonic() < deadline, "guest A never reported"
                    time.sleep(0.001)

            status: dict[str, int] = {}
            threads = [
                threading.Thread(target=lambda: status.setdefault("a", demo.guest_exchange(a, 30))),
                threading.Thread(
                    target=lambda: status.setdefault(
                        "b", demo.guest_exchange(b, 30, before_reading=a_has_reported)
                    )
                ),
            ]
            for thread in threads:
                thread.start()
            try:
                deadline = time.monotonic() + 30
                while any(demo.read_slot(host, g.id, demo.STATUS) != "ready" for g in (a, b)):
                    assert time.monotonic() < deadline, "the guests never said ready"
                    time.sleep(0.001)
                demo.ROSTER.pack_into(host.memory, 0, host.id, a.id, b.id, 3)
                host.notify(a.id, 0)
                host.notify(b.id, 0)
                for g in (a, b):
                    while "I read guest" not in demo.read_slot(host, g.id, demo.STATUS):
                        assert host.wait(0, timeout=30) is not None, "no report"
                for g in (a, b):  # round trips
                    for _ in range(3):
                        host.notify(g.id, 0)
                        assert host.wait(1, timeout=30) is not None
            finally:
                for thread in threads:
                    thread.join(30)
            ids = (host.id, a.id, b.id)
            slots = {
                g.id: (demo.read_slot(host, g.id), demo.read_slot(host, g.id, demo.STATUS))
                for g in (a, b)
            }
    assert status == {"a": 0, "b": 0}
    out = capsys.readouterr().out
    host_id, a_id, b_id = ids
    for me, other in ((a_id, b_id), (b_id, a_id)):
        greeting = f"hello from guest peer {other}"
        assert f"guest {me}: guest {other} rang me; its slot says '{greeting}'" in out
        assert f"guest {me}: the host's slot says 'hello from host peer {host_id}'" in out
        report = f"I read guest {other}'s slot: '{greeting}'"
        assert slots[me] == (f"hello from guest peer {me}", report)


@pytest.mark.parametrize("ci", [False, True])
def test_without_a_guest_kernel_the_host_part_runs_and_the_skip_is_explained(
    qemu_binary: str, short_tmp: Path, ci: bool
) -> None:
    # QEMU is here, but the lab's cache is empty and Debian's package tools cannot be found:
    # what an offline machine or a non-Debian host meets when fetching the guest kernel.
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to(qemu_binary)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=str(bin_dir), IVSHMEM_LAB_CACHE=str(short_tmp / "cache"))
    if ci:
        env["CI"] = "true"
    proc = run_demo(env=env)
    assert "peer 1 left; peers now: []" in proc.stdout  # the host part ran
    assert "Traceback" not in proc.stderr
    reason = "the VM lab cannot prepare its guest kernel: apt-cache not found"
    if ci:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"demo failed: the guest part cannot run ({reason}" in proc.stderr
        assert "CI is set" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"(skipping the guest part: {reason}" in proc.stdout
        assert "demo finished cleanly" in proc.stdout


@pytest.mark.parametrize("ci", [False, True])
def test_without_qemu11_both_guests_get_qemus_device_and_the_demo_says_why(
    qemu_binary: str, short_tmp: Path, ci: bool
) -> None:
    # The guest kernel is cached (the real cache's files, linked), but no QEMU >= 10.1 can
    # be had: PATH offers only QEMU 7.2, and none of the tools to build trixie's.
    cache = short_tmp / "cache"
    cache.mkdir()
    from ivshmem.lab import LabSetupError, prepare

    try:
        real = prepare().cache
    except LabSetupError as err:
        require(False, f"the VM lab cannot prepare its guest kernel: {err}")
        raise
    for entry in real.iterdir():
        if entry.name not in ("qemu11", "lock"):
            (cache / entry.name).symlink_to(entry)
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to(qemu_binary)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=str(bin_dir), IVSHMEM_LAB_CACHE=str(cache))
    if ci:
        env["CI"] = "true"
        proc = run_demo(env=env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "demo failed: this project's device cannot be shown (no QEMU >= 10.1" in (
            proc.stderr
        )
        assert "CI is set" in proc.stderr and "booting" not in proc.stdout
        return
    # Without CI it goes on with QEMU's device in both guests: stop it once it said why.
    demo = subprocess.Popen(
        [sys.executable, "-m", "ivshmem.demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert demo.stdout is not None
        out = b""
        deadline = time.monotonic() + 120
        while b"booting two" not in out:
            assert time.monotonic() < deadline, out
            ready, _, _ = select.select([demo.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(demo.stdout.fileno(), 4096)
                assert chunk, out
                out += chunk
        text = out.decode()
        assert "(both guests get QEMU's device: no QEMU >= 10.1 for this project's device:" in text
        assert "vm-a gets this project's device" not in text
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 128 + signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for stream in (demo.stdout, demo.stderr):
            assert stream is not None
            stream.close()


@pytest.mark.lab
@pytest.mark.timeout(500)  # above run_demo's 400 s, itself above the demo's 300 s guest part
def test_full_demo_with_two_guests(qemu_binary: str) -> None:
    # CI has QEMU >= 10.1 (the lab prepares trixie's): one guest on this project's device,
    # one on QEMU's, side by side.
    before = shm_objects()
    proc = run_demo()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    if "both guests get QEMU's device" in out:
        require(False, out.split("both guests get QEMU's device: ", 1)[1].split("\n", 1)[0])
    assert "vm-a gets this project's device (ivshmem-device over vfio-user)" in out
    assert "on this project's ivshmem-device (vfio-user)" in out
    assert "on QEMU's ivshmem-doorbell" in out
    assert "both guests opened the device with VFIO (MSI-X on)" in out
    joined = re.search(r"guests joined as peers (\d+) and (\d+); host is peer (\d+)", out)
    assert joined is not None, out
    a, b, host = map(int, joined.groups())
    vm_a = re.search(r"\[vm-a\] guest: I am peer (\d+) \(IVPosition\) on this project's", out)
    assert vm_a is not None, out
    ours, theirs = (a, b) if int(vm_a.group(1)) == a else (b, a)
    # The guest on our device waits until its registers list both the host and the other guest.
    assert f"guest {ours}: my device's registers list peers {sorted([host, theirs])}" in out
    # guest -> guest: each reads exactly the other's greeting, however far ahead that one ran
    # (its report goes elsewhere); host -> guests; guest -> host, seen by the host.
    for me, other in ((a, b), (b, a)):
        greeting = f"hello from guest peer {other}"
        assert f"guest {me}: guest {other} rang me; its slot says '{greeting}'" in out
        assert f"guest {me}: the host's slot says 'hello from host peer {host}'" in out
        report = repr(f"I read guest {other}'s slot: '{greeting}'")
        assert (
            f"host read guest {me}'s slot: 'hello from guest peer {me}', and its report: {report}"
        ) in out
    assert out.count("doorbell round trip: median") == 2  # host -> guest and back
    assert "host sees peers [] left" in out
    assert shm_objects() <= before

"""Getting a QEMU >= 10.1 (vfio-user-pci): PATH's, or Debian trixie's in the lab cache."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ivshmem.lab import qemu11 as q11


def test_prefix_runs_a_qemu_with_vfio_user_and_qtest(qemu11: list[str]) -> None:
    version = qemu11_version(qemu11)
    assert version[:2] >= qemu11_min()
    out = subprocess.run(
        [*qemu11, "-device", "help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert '"vfio-user-pci"' in out
    assert '"ivshmem-doorbell"' in out


def qemu11_version(argv: list[str]) -> tuple[int, int, int]:
    version = q11.qemu_version(argv)
    assert version is not None
    return version


def qemu11_min() -> tuple[int, int]:
    return q11.MIN_VERSION


def test_no_mount_outlives_qemu(qemu11: list[str], short_tmp: Path) -> None:
    found = qemu11_found()
    if found.root is None:
        pytest.skip("QEMU >= 10.1 runs from PATH: no chroot, no mounts")
    proc = subprocess.Popen(
        [
            *qemu11,
            "-machine",
            "q35",
            "-accel",
            "qtest",
            "-display",
            "none",
            "-nodefaults",
            "-qtest",
            f"unix:{short_tmp}/qt.sock,server=on,wait=off",
            "-S",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (short_tmp / "qt.sock").exists():  # QEMU sees /tmp through the bind mount
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # The mounts exist only in QEMU's own namespace, never in ours.
        assert str(found.root) not in Path("/proc/self/mounts").read_text()
        assert Path(f"/proc/{proc.pid}/root").resolve() == found.root.resolve()  # chrooted
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert str(found.root) not in Path("/proc/self/mounts").read_text()


def qemu11_found() -> q11.Qemu11:
    found = q11.find()
    assert found is not None
    return found


def test_a_prepared_root_is_reused(qemu11: list[str]) -> None:
    start = time.monotonic()
    again = q11.prepare(fetch=False)  # no network, no build: the stamp says it is ready
    assert again.argv() == qemu11
    assert time.monotonic() - start < 30


def test_an_empty_cache_without_fetch_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(q11, "_on_path", lambda: None)
    with pytest.raises(q11.Qemu11Unavailable, match="ivshmem lab fetch --qemu11"):
        q11.prepare(tmp_path / "cache", fetch=False)


def test_an_unstamped_root_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q11, "_on_path", lambda: None)
    root = tmp_path / "qemu11" / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/qemu-system-x86_64").touch()  # an interrupted build: no stamp
    assert q11.find(tmp_path) is None
    (root / q11.STAMP).write_text('{"version": [11, 1, 3]}\n')
    found = q11.find(tmp_path)
    assert found is not None and found.root == root and found.version == (11, 1, 3)


def test_building_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q11, "_on_path", lambda: None)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(q11.Qemu11Unavailable, match="needs root"):
        q11.prepare(tmp_path / "cache")


def test_host_root_shows_the_hosts_tree(qemu11: list[str]) -> None:
    found = qemu11_found()
    if found.root is None:
        pytest.skip("QEMU >= 10.1 runs from PATH: it sees the host's tree anyway")
    # /var/tmp is not bound into the chroot; through host_root QEMU sees it.
    fd, name = tempfile.mkstemp(prefix="ivt-q11-", dir="/var/tmp")
    try:
        os.write(fd, b"seen through /.host")
        os.ftruncate(fd, 1 << 20)
        args = [
            "-machine", "q35", "-accel", "qtest", "-display", "none", "-nodefaults",
            "-object", f"memory-backend-file,id=m,mem-path=/.host{name},size=1M,share=on",
            "-device", "ivshmem-plain,memdev=m", "-monitor", "stdio",
        ]  # fmt: skip
        done = subprocess.run(
            [*found.argv(host_root="/.host"), *args],
            input="quit\n",  # the monitor quits QEMU once the machine is built
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and "No such file" not in done.stderr, done.stderr
        without = subprocess.run(
            [*found.argv(), *args], input="quit\n", capture_output=True, text=True, timeout=120
        )
        assert "No such file" in without.stderr  # the chroot alone does not see /var/tmp
    finally:
        os.close(fd)
        os.unlink(name)

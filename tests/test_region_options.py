"""The server's option checks: backing files, the log file, user and group ids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from serverproc import RawPeer, ServerProcess

from ivshmem.cli import server as cli
from ivshmem.errors import ServerConfigError, UsageError
from ivshmem.memory import SharedMemory, check_backing_filesystem
from ivshmem.server import ServerConfig


def _refused(short_tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the server command, which must refuse to start (a FIFO must not make it hang)."""
    cmd = [sys.executable, "-m", "ivshmem.cli.server", "-F", "-S", str(short_tmp / "s"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert "serving" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# -- backing files --------------------------------------------------------------------------


def test_proc_self_mem_is_refused_as_the_region(short_tmp: Path) -> None:
    proc = _refused(short_tmp, "--file", "/proc/self/mem", "-l", "4K")
    assert proc.returncode == cli.EXIT_CANNOT_START
    assert "is on proc, a kernel pseudo filesystem" in proc.stderr, proc.stderr
    with pytest.raises(UsageError, match="on proc"):
        SharedMemory.file("/proc/self/mem", 4096, pseudo_filesystems=False)
    # Device files were refused already (not regular files); they stay so.
    proc = _refused(short_tmp, "--file", "/dev/zero", "-l", "4K")
    assert proc.returncode == cli.EXIT_CANNOT_START
    assert "is not a regular file" in proc.stderr


@pytest.mark.parametrize(
    ("path", "kind"), [("/proc/self/status", "proc"), ("/sys/kernel/uevent_seqnum", "sysfs")]
)
def test_pseudo_filesystems_are_recognised(path: str, kind: str) -> None:
    # Read-only here: the server opens read-write, which needs more rights than a test has
    # for most of these files, but which filesystem holds a file does not depend on that.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(UsageError, match=f"is on {kind}, a kernel pseudo filesystem"):
            check_backing_filesystem(fd, path)
    finally:
        os.close(fd)


def test_tmpfs_and_disk_files_are_accepted(short_tmp: Path) -> None:
    for directory in ("/dev/shm", str(short_tmp)):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_backing_filesystem(fd, directory)
        finally:
            os.close(fd)


# -- the log file ---------------------------------------------------------------------------


def test_a_log_file_that_is_a_symlink_is_not_followed(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    link = short_tmp / "server.log"
    link.symlink_to(victim)
    proc = _refused(short_tmp, "--memfd", "--log-file", str(link))
    assert proc.returncode == cli.EXIT_CANNOT_START
    assert "is a symbolic link, which is not followed" in proc.stderr
    assert victim.read_text() == "precious\n"


def test_a_log_file_with_another_name_or_kind_is_refused(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    hard = short_tmp / "hard.log"
    os.link(victim, hard)
    proc = _refused(short_tmp, "--memfd", "--log-file", str(hard))
    assert proc.returncode == cli.EXIT_CANNOT_START
    assert "has 2 hard links" in proc.stderr
    fifo = short_tmp / "fifo.log"
    os.mkfifo(fifo)
    proc = _refused(short_tmp, "--memfd", "--log-file", str(fifo))
    assert "is not a regular file" in proc.stderr
    assert victim.read_text() == "precious\n"


def test_a_log_file_of_another_user_is_refused(short_tmp: Path) -> None:
    require(os.geteuid() == 0, "giving a file to another user needs root")
    other = short_tmp / "other.log"
    other.write_text("")
    os.chown(other, 65534, 65534)
    proc = _refused(short_tmp, "--memfd", "--log-file", str(other))
    assert "belongs to uid 65534" in proc.stderr
    assert other.read_text() == ""


def test_a_rotated_log_file_replaced_by_a_symlink_is_not_followed(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    log = short_tmp / "own.log"
    with ServerProcess(short_tmp, extra_args=["--log-file", str(log)]) as server:
        server.wait_until(lambda: "serving" in log.read_text(), what="the first log line")
        log.rename(short_tmp / "own.log.1")  # what logrotate does
        log.symlink_to(victim)  # and what an attacker does next
        with RawPeer(server.socket_path) as peer:
            peer.wait(lambda: peer.id is not None)
        server.wait_until(lambda: server.status()["counters"]["leaves"] == 1, what="leave")
        assert victim.read_text() == "precious\n"
        log.unlink()  # once the link is gone, the next line makes a new file
        with RawPeer(server.socket_path) as peer:
            peer.wait(lambda: peer.id is not None)
        server.wait_until(lambda: log.exists() and "joined" in log.read_text(), what="new log")
        output = server.log()  # the server's stderr: the refusal said once, no tracebacks
        assert output.count("is a symbolic link, which is not followed") == 1, output
        assert "Traceback" not in output
    assert victim.read_text() == "precious\n"


# -- user and group ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--allow-gid", "99999999999999999999"],
        ["--allow-gid", "0,4294967295"],
        ["--allow-uid", "4294967295"],
        ["--allow-uid", "18446744073709551616"],
        ["--group", "4294967296"],
    ],
)
def test_ids_out_of_range_are_refused(short_tmp: Path, args: list[str]) -> None:
    proc = _refused(short_tmp, "--memfd", *args)
    assert proc.returncode == cli.EXIT_USAGE
    assert f"{args[0]}: " in proc.stderr and "is out of range" in proc.stderr, proc.stderr
    assert "0..4294967294" in proc.stderr


def test_the_largest_ids_are_accepted() -> None:
    args = cli.build_parser().parse_args(
        ["--allow-uid", "4294967294", "--allow-gid", "0,4294967294", "-F"]
    )
    config = cli.config_from_args(args)
    assert config.allow_uids == {4294967294} and config.allow_gids == {0, 4294967294}
    with pytest.raises(ServerConfigError, match="--allow-uid: uid -1 is out of range"):
        ServerConfig(allow_uids=frozenset({-1})).validate()

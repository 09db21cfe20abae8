"""ivshmem-server's start: the backing store it may use, the files it claims, and what a
failed start leaves behind (nothing). Every case runs the real server command.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import resource
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import require
from serverproc import RawPeer, ServerProcess, server_as_user, wait_gone

from ivshmem.errors import UsageError
from ivshmem.memory import SharedMemory

SERVER = [sys.executable, "-m", "ivshmem.cli.server"]
NOBODY = 65534


def run_cli(
    *args: str,
    as_nobody: bool = False,
    preexec_fn: Callable[[], None] | None = None,
    pass_fds: Sequence[int] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    command, env = SERVER, None
    if as_nobody:
        require(os.geteuid() == 0, "running the server as another user needs root")
        require(shutil.which("setpriv"), "setpriv (util-linux) is not installed")
        python, extra = server_as_user(NOBODY, NOBODY)
        command, env = [*python, *SERVER[1:]], {**os.environ, **extra}
    return subprocess.run(
        [*command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
        pass_fds=pass_fds,
    )


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (to own files as another user)")


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"ivshmem-test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{name}")


@pytest.fixture
def open_dir(short_tmp: Path) -> Path:
    """short_tmp, writable for a server that runs as nobody."""
    short_tmp.chmod(0o777)
    return short_tmp


def _mapped_last_byte(fd: int, size: int) -> int:
    with mmap.mmap(fd, size) as region:
        return region[size - 1]


# --------------------------------------------------------------------------------------------
# A. An existing region is never shrunk


@pytest.mark.parametrize("backing", ["-M", "--file"])
def test_existing_region_is_not_shrunk_under_a_peer_and_may_grow(
    short_tmp: Path, shm_name: str, backing: str
) -> None:
    target = shm_name if backing == "-M" else str(short_tmp / "region")
    path = f"/dev/shm/{shm_name}" if backing == "-M" else target
    with (
        ServerProcess(short_tmp, size="64K", extra_args=[backing, target]) as server,
        RawPeer(server.socket_path, keep_fds=True) as peer,
    ):
        peer.wait(lambda: peer.shm_fd is not None)
        assert peer.shm_fd is not None
        with mmap.mmap(peer.shm_fd, 64 << 10) as region:
            region[-1] = 42
    # A process that still maps all 64K (a VM of the earlier server) when a new server is
    # started asking for less.
    fd = os.open(path, os.O_RDWR)
    try:
        result = run_cli("-F", "-S", str(short_tmp / "s2"), backing, target, "-l", "16K")
        assert result.returncode == 1, result.stderr
        assert "is 64K, larger than the 16K asked for with -l" in result.stderr
        assert "SIGBUS" in result.stderr and "-l 64K or more" in result.stderr
        assert f"rm {path}" in result.stderr
        assert "serving" not in result.stderr
        assert os.fstat(fd).st_size == 64 << 10
        assert _mapped_last_byte(fd, 64 << 10) == 42  # no SIGBUS: nothing was cut off
        assert not (short_tmp / "s2").exists()
        # Growing is fine, and said.
        with ServerProcess(
            short_tmp, size="128K", name="s3", extra_args=[backing, target]
        ) as server:
            assert "grew shared memory" in server.log() and "from 64K to 128K" in server.log()
            assert server.status()["shared_memory"]["size"] == 128 << 10
            assert _mapped_last_byte(fd, 64 << 10) == 42
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# B. Someone else's object is refused


@pytest.mark.parametrize("backing", ["-M", "--file"])
def test_object_owned_by_another_user_is_refused(
    short_tmp: Path, shm_name: str, backing: str
) -> None:
    require_root()
    target = shm_name if backing == "-M" else str(short_tmp / "region")
    path = f"/dev/shm/{shm_name}" if backing == "-M" else target
    # What any local user can do: pre-create the object, open to everyone, and keep it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.fchmod(fd, 0o666)
        os.fchown(fd, NOBODY, NOBODY)
        result = run_cli("-F", "-S", str(short_tmp / "s"), backing, target, "-l", "64K")
        assert result.returncode == 1, result.stderr
        assert f"belongs to uid {NOBODY}" in result.stderr
        assert "remove it" in result.stderr and "choose another name" in result.stderr
        st = os.fstat(fd)
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_size) == (NOBODY, 0o666, 0)
        assert os.path.exists(path)  # not ours to remove either
        assert not (short_tmp / "s").exists()
    finally:
        os.close(fd)
        os.unlink(path)


def test_unprivileged_server_refuses_roots_object(open_dir: Path, shm_name: str) -> None:
    path = f"/dev/shm/{shm_name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    os.chmod(path, 0o666)
    result = run_cli("-F", "-S", str(open_dir / "s"), "-M", shm_name, "-l", "64K", as_nobody=True)
    assert result.returncode == 1, result.stderr
    assert "belongs to uid 0 (root)" in result.stderr
    assert os.stat(path).st_size == 0


def test_mode_that_cannot_be_set_is_refused_and_the_new_object_removed(shm_name: str) -> None:
    """Claiming an object as the server does, as a user who may not give it the group asked
    for: refused, and the object this attempt created is gone again. (Through the command
    the socket, which gets the same group first, would fail before the memory is made.)"""
    require_root()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                SharedMemory.posix(shm_name, 4096, 0o600, owner_uid=NOBODY, group=0).close()
                answer = "served"
            except UsageError as err:
                answer = str(err)
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read().decode()
    os.waitpid(pid, 0)
    assert "cannot give" in answer and "group 0 and mode 600" in answer, answer
    assert "Operation not permitted" in answer
    assert not os.path.exists(f"/dev/shm/{shm_name}")


# --------------------------------------------------------------------------------------------
# C. No symbolic links, regular files only


def test_file_backing_does_not_follow_a_symlink(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_bytes(b"precious data")
    victim.chmod(0o644)
    link = short_tmp / "region"
    link.symlink_to(victim)
    result = run_cli("-F", "-S", str(short_tmp / "s"), "--file", str(link), "-l", "4K")
    assert result.returncode == 1, result.stderr
    assert "is a symbolic link" in result.stderr
    assert victim.read_bytes() == b"precious data"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    # A dangling link is not followed to create a file either.
    link.unlink()
    link.symlink_to(short_tmp / "elsewhere")
    result = run_cli("-F", "-S", str(short_tmp / "s"), "--file", str(link), "-l", "4K")
    assert result.returncode == 1 and "is a symbolic link" in result.stderr
    assert not (short_tmp / "elsewhere").exists()


def test_posix_name_that_is_a_symlink_is_refused(short_tmp: Path, shm_name: str) -> None:
    victim = short_tmp / "victim"
    victim.write_bytes(b"x")
    os.symlink(victim, f"/dev/shm/{shm_name}")
    result = run_cli("-F", "-S", str(short_tmp / "s"), "-M", shm_name, "-l", "4K")
    assert result.returncode == 1 and "is a symbolic link" in result.stderr
    assert victim.read_bytes() == b"x"


def test_file_backing_must_be_a_regular_file(short_tmp: Path) -> None:
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    result = run_cli("-F", "-S", str(short_tmp / "s"), "--file", str(fifo), "-l", "4K")
    assert result.returncode == 1, result.stderr
    assert "is not a regular file" in result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)


# --------------------------------------------------------------------------------------------
# D. A failed start leaves nothing behind and does not claim to serve


def test_failure_after_creating_the_region_removes_it(short_tmp: Path, shm_name: str) -> None:
    # 4K cannot hold the membership table: the start fails after the object was created.
    result = run_cli("-F", "-S", str(short_tmp / "s"), "-M", shm_name, "-l", "4K", "--format")
    assert result.returncode == 1, result.stderr
    assert "too small" in result.stderr
    assert "serving" not in result.stderr
    assert not os.path.exists(f"/dev/shm/{shm_name}")
    assert list(short_tmp.iterdir()) == []


def test_failure_keeps_an_existing_region(short_tmp: Path, shm_name: str) -> None:
    path = Path("/dev/shm", shm_name)
    path.write_bytes(b"kept" + bytes(4092))
    path.chmod(0o600)
    result = run_cli("-F", "-S", str(short_tmp / "s"), "-M", shm_name, "-l", "4K", "--format")
    assert result.returncode == 1
    assert path.read_bytes()[:4] == b"kept"


def test_os_errors_are_worded_not_numbered(short_tmp: Path, shm_name: str) -> None:
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = run_cli(
        "-F", "-S", str(short_tmp / "s"), "-M", shm_name, "-l", "4M", preexec_fn=small_files
    )
    assert result.returncode == 1, result.stderr
    assert "File too large" in result.stderr
    assert "[Errno" not in result.stderr
    assert not os.path.exists(f"/dev/shm/{shm_name}")


def test_unwritable_pid_file_fails_before_the_region_exists(short_tmp: Path, shm_name: str) -> None:
    pidfile = short_tmp / "missing" / "server.pid"
    result = run_cli("-F", "-S", str(short_tmp / "s"), "-M", shm_name, "-p", str(pidfile))
    assert result.returncode == 1, result.stderr
    assert "cannot write pid file" in result.stderr and "No such file or directory" in result.stderr
    assert "-p PATH" in result.stderr and "-F" in result.stderr
    assert "serving" not in result.stderr
    assert not os.path.exists(f"/dev/shm/{shm_name}")
    assert list(short_tmp.iterdir()) == []


def test_daemon_default_pid_file_not_writable_suggests_p_or_f(open_dir: Path) -> None:
    result = run_cli("-S", str(open_dir / "s"), "--memfd", as_nobody=True)
    assert result.returncode == 1, result.stderr
    assert "cannot write pid file '/var/run/ivshmem-server.pid'" in result.stderr
    assert "Permission denied" in result.stderr
    assert "-p PATH" in result.stderr and "-F" in result.stderr
    assert not (open_dir / "s").exists()


def test_memory_directory_the_server_cannot_write(open_dir: Path) -> None:
    """-m DIR that exists but is not writable for the server's user (as a hugetlbfs mount
    owned by root would be): a clear refusal, nothing left behind."""
    locked = open_dir / "locked"
    locked.mkdir(mode=0o755)  # root's; the server runs as nobody
    result = run_cli("-F", "-S", str(open_dir / "s"), "-m", str(locked), as_nobody=True)
    assert result.returncode == 1, result.stderr
    assert f"directory {str(locked)!r} is not writable" in result.stderr
    assert "serving" not in result.stderr
    assert list(locked.iterdir()) == []
    assert not (open_dir / "s").exists()


# --------------------------------------------------------------------------------------------
# E. Empty values


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-M", ""], "-M: empty shared-memory name ''"),
        (["-M", "/"], "-M: empty shared-memory name '/'"),
        (["--file", ""], "--file: empty file path"),
        (["-m", ""], "-m: empty directory"),
        (["-p", ""], "-p: empty pid file path"),
        (["--log-file", ""], "--log-file: empty log file path"),
    ],
)
def test_empty_values_are_refused(short_tmp: Path, args: list[str], message: str) -> None:
    result = run_cli("-F", "-S", str(short_tmp / "s"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert list(short_tmp.iterdir()) == []


def test_empty_socket_path_is_refused() -> None:
    result = run_cli("-F", "--memfd", "-S", "")
    assert result.returncode == 2 and "-S: empty socket path" in result.stderr


# --------------------------------------------------------------------------------------------
# F and I. Sockets of a live server


def test_status_socket_of_a_live_server_names_the_right_option(short_tmp: Path) -> None:
    with ServerProcess(short_tmp) as server:
        result = run_cli(
            "-F", "--memfd", "-S", str(short_tmp / "other"), "--status-socket", server.status_path
        )
        assert result.returncode == 1, result.stderr
        assert "is in use by a running server" in result.stderr
        assert "choose another path with --status-socket" in result.stderr
        assert not (short_tmp / "other").exists()


def test_live_socket_reached_through_a_symlinked_directory_is_not_probed(
    short_tmp: Path,
) -> None:
    real = short_tmp / "real"
    real.mkdir()
    (short_tmp / "link").symlink_to(real)
    with (
        ServerProcess(real, name="s") as server,
        RawPeer(server.socket_path) as peer,
    ):
        peer.wait(lambda: peer.complete(set(), 1))
        result = run_cli("-F", "--memfd", "-S", str(short_tmp / "link" / "s"))
        assert result.returncode == 1, result.stderr
        assert "is in use by a running server" in result.stderr
        # Told from /proc/net/unix, not by connecting: no phantom peer came and went.
        assert server.status()["counters"]["joins"] == 1
        peer.pump()
        assert not peer.eof and peer.messages == 4


# --------------------------------------------------------------------------------------------
# G. The daemon: inherited fds and where its log goes


@contextlib.contextmanager
def stopped_at_exit(pidfile: Path) -> Iterator[None]:
    """Stop the daemon whose pid is in ``pidfile`` when the block ends, however it ends."""
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text())
            os.kill(pid, 15)
            wait_gone(pid)


def test_daemon_closes_inherited_fds_and_warns_that_its_log_is_lost(short_tmp: Path) -> None:
    require(not os.path.exists("/dev/log"), "this host has a syslog socket at /dev/log")
    sock, pidfile = short_tmp / "d.sock", short_tmp / "d.pid"
    read_end, write_end = os.pipe()
    try:
        with stopped_at_exit(pidfile):
            # A launcher's pipe, as a deployment script that waits for EOF would pass it.
            result = run_cli("-S", str(sock), "--memfd", "-p", str(pidfile), pass_fds=[write_end])
            os.close(write_end)
            write_end = -1
            assert result.returncode == 0, result.stderr
            assert "the daemon's log will be lost" in result.stderr
            assert "--log-file PATH" in result.stderr and "-F" in result.stderr
            pid = int(pidfile.read_text())
            ready, _, _ = select.select([read_end], [], [], 10)
            assert ready and os.read(read_end, 1) == b"", "the daemon kept the launcher's pipe"
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert not any(t.startswith("pipe:") for t in targets), targets
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert not sock.exists() and not pidfile.exists()


def test_daemon_logs_to_a_log_file(short_tmp: Path) -> None:
    sock, pidfile, logfile = short_tmp / "d.sock", short_tmp / "d.pid", short_tmp / "d.log"
    with stopped_at_exit(pidfile):
        result = run_cli(
            "-S", str(sock), "--memfd", "-p", str(pidfile), "--log-file", str(logfile), "-n", "2"
        )
        assert result.returncode == 0, result.stderr
        assert "will be lost" not in result.stderr
        with RawPeer(str(sock)) as peer:
            peer.wait(lambda: peer.complete(set(), 2))
        deadline = time.monotonic() + 10
        while "left" not in logfile.read_text():
            assert time.monotonic() < deadline, logfile.read_text()
            time.sleep(0.02)
        text = logfile.read_text()
        assert "serving" in text and "peer 0 joined" in text
    assert "server stopped" in logfile.read_text()


def test_daemon_started_with_stdin_and_stdout_closed(short_tmp: Path) -> None:
    sock, pidfile = short_tmp / "d.sock", short_tmp / "d.pid"

    def close_stdio() -> None:
        os.close(0)
        os.close(1)

    with stopped_at_exit(pidfile):
        result = subprocess.run(
            [*SERVER, "-S", str(sock), "--memfd", "-p", str(pidfile)],
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            preexec_fn=close_stdio,
        )
        assert result.returncode == 0, result.stderr
        with RawPeer(str(sock)) as peer:
            peer.wait(lambda: peer.complete(set(), 1))


def test_unwritable_log_file_is_a_startup_error(short_tmp: Path) -> None:
    result = run_cli(
        "-F", "--memfd", "-S", str(short_tmp / "s"), "--log-file", str(short_tmp / "no" / "log")
    )
    assert result.returncode == 1, result.stderr
    assert "--log-file: cannot open" in result.stderr
    assert not (short_tmp / "s").exists()


# --------------------------------------------------------------------------------------------
# H. Vectors QEMU refuses


def test_more_than_64_vectors_is_served_with_a_warning(short_tmp: Path) -> None:
    with (
        ServerProcess(short_tmp, vectors=65) as server,
        RawPeer(server.socket_path) as peer,
    ):
        peer.wait(lambda: peer.complete(set(), 65))
        assert "QEMU's ivshmem-doorbell device refuses more than 64" in server.log()
    with ServerProcess(short_tmp, vectors=64, name="s64") as server:
        assert "refuses more than 64" not in server.log()


# --------------------------------------------------------------------------------------------
# A socket the server cannot use


def test_unix_socket_check_does_not_connect(short_tmp: Path) -> None:
    """A stale socket (nobody listening) is removed; the check never connects to a live one
    (covered above) -- and a plain listening socket of another program is left alone."""
    path = short_tmp / "other.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    other.listen()
    try:
        result = run_cli("-F", "--memfd", "-S", str(path))
        assert result.returncode == 1 and "is in use by a running server" in result.stderr
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            other.accept()  # nobody connected to find out
    finally:
        other.close()


def test_log_timestamps_are_the_standard_ones_though_cached_per_second() -> None:
    from ivshmem.cli.server import _Formatter

    fmt = "%(asctime)s ivshmem-server[%(process)d] %(levelname)s: %(message)s"
    cached, standard = _Formatter(fmt), logging.Formatter(fmt)
    # Within one second, across a second's boundary, back again (a clock step), and a new day.
    for created in (1_700_000_000.25, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_000.5,
                    1_700_086_400.0625):  # fmt: skip
        record = logging.LogRecord("ivshmem.server", logging.INFO, "", 0, "peer 1 joined", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == standard.format(record)

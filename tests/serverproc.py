"""Run ``ivshmem-server`` as a real process for tests: ``from serverproc import ServerProcess``.

::

    with ServerProcess(tmp_path, size="1M", vectors=4) as server:
        connect(server.socket_path) ...
        server.status()["peers"]      # the server's own view, as JSON
        server.fd_count()             # open fds of the server process

The server runs in the foreground (``-F``) with a memfd backing unless ``extra_args`` chooses
another (``-M``, ``-m``, ``--file``, ``--memfd``), so no /dev/shm object is left behind.
Readiness is the server's own sd_notify ``READY=1`` (sent once the socket accepts), received on
a datagram socket in ``tmpdir``; probing the socket with a connect would make the server admit
a phantom peer and shift every later peer id. Its log goes to ``tmpdir/server.log``
(``.log()``). On exit the server gets SIGTERM, and the helper asserts a clean exit (status 0)
and that the socket file is gone -- unless the ``with`` block raised, or ``check=False``.
The server gets SIGTERM if the process (strictly: the thread) that started it dies, so a
test killed by a timeout leaves no server behind. ``run_as=(uid, gid)`` runs it as another
user through setpriv (the test must be root; ``tmpdir`` must let that user create its socket)
and ``nofile`` gives it that open-file limit, soft and hard, so it cannot raise it.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ivshmem.protocol import (
    MESSAGE_SIZE,
    ClientState,
    Decoder,
    OwnVector,
    PeerLeft,
    PeerVector,
    SharedMemoryReceived,
)

_BACKING_FLAGS = ("-M", "-m", "--file", "--memfd")
_PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process that is not our child to exit (a zombie counts as gone: reaping it
    is its new parent's business)."""

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + timeout
    while not gone():
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.02)


_readable_package: str | None = None


def server_as_user(uid: int, gid: int) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that run ``python -m ...`` as another user.

    That user may not be able to read this checkout or its venv at all (a clone under /root
    or in a 0700 temporary directory), so the server runs from a copy of the package in a
    directory anyone can read (made once, removed at exit; the server needs nothing outside
    the standard library), with an interpreter anyone can run: the system Python if there is
    one. setpriv rather than setuid() before exec: it execs with root's capabilities and drops
    them at the exec. A change of user clears the parent-death signal; setpriv sets it again.
    """
    global _readable_package
    if _readable_package is None:
        import ivshmem

        top = tempfile.mkdtemp(prefix="ivt-pkg-", dir="/tmp")
        atexit.register(shutil.rmtree, top, True)
        shutil.copytree(
            os.path.dirname(ivshmem.__file__),
            os.path.join(top, "ivshmem"),
            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"),
        )
        for directory, _dirs, files in os.walk(top):
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        _readable_package = top
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    setpriv = shutil.which("setpriv") or "setpriv"
    ids = ["--reuid", str(uid), "--regid", str(gid), "--clear-groups", "--pdeathsig", "TERM"]
    env = {"PYTHONPATH": _readable_package, "PYTHONDONTWRITEBYTECODE": "1"}
    return [setpriv, *ids, python], env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, so a test killed
    by a timeout (or by hand) never leaves a server running."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _child_setup(nofile: int | None) -> Callable[[], None]:
    def setup() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        _die_with_parent()

    return setup


class ServerProcess:
    """One ``python -m ivshmem.cli.server -F ...`` subprocess, started on ``__enter__``."""

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        size: str = "1M",
        vectors: int = 1,
        extra_args: Sequence[str] = (),
        *,
        name: str = "ivshmem.sock",
        start_timeout: float = 20.0,
        check: bool = True,
        env: dict[str, str] | None = None,
        run_as: tuple[int, int] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.tmpdir = Path(tmpdir)
        self.size = size
        self.vectors = vectors
        self.extra_args = list(extra_args)
        self.socket_path = str(self.tmpdir / name)
        self.status_path = self.socket_path + ".status"
        self.log_path = self.tmpdir / f"{name}.log"
        self.start_timeout = start_timeout
        self.check = check
        self.env = env
        self.run_as = run_as
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        #: sd_notify messages the server sent (READY=1 ..., STOPPING=1).
        self.notifications: list[str] = []
        self._notify: socket.socket | None = None
        self._notify_path = ""

    # -- lifecycle ------------------------------------------------------------------------

    def command(self) -> list[str]:
        python = [sys.executable]
        if self.run_as is not None:
            python = server_as_user(*self.run_as)[0]
        args = [*python, "-m", "ivshmem.cli.server", "-F", "-S", self.socket_path]
        args += ["-l", self.size, "-n", str(self.vectors)]
        if not any(flag in self.extra_args for flag in _BACKING_FLAGS):
            args.append("--memfd")
        args += self.extra_args
        return args

    def start(self) -> ServerProcess:
        # The notify socket stays bound while the server runs, so its STOPPING=1 at shutdown
        # finds a listener too (``notifications`` keeps everything received).
        self._notify_path = str(self.tmpdir / f".notify-{os.getpid()}-{id(self)}")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self._notify_path)
        if self.run_as is not None:
            os.chmod(self._notify_path, 0o777)  # sending to it needs write permission
        self._notify.settimeout(0.1)
        try:
            env = dict(os.environ if self.env is None else self.env)
            if self.run_as is not None:
                env.update(server_as_user(*self.run_as)[1])
            env["NOTIFY_SOCKET"] = self._notify_path
            env.setdefault("PYTHONUNBUFFERED", "1")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    preexec_fn=_child_setup(self.nofile),
                )
            deadline = time.monotonic() + self.start_timeout
            while True:
                try:
                    self.notifications.append(self._notify.recv(4096).decode())
                    if "READY=1" in self.notifications[-1]:
                        self._settle()
                        return self
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    self.returncode = self.proc.returncode
                    raise RuntimeError(
                        f"ivshmem-server exited with status {self.proc.returncode} during "
                        f"startup:\n{self.log()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ivshmem-server did not become ready in {self.start_timeout} s:\n"
                        f"{self.log()}"
                    )
        except BaseException:
            self.kill()
            raise

    def _close_notify(self) -> None:
        if self._notify is None:
            return
        self._notify.setblocking(False)
        try:
            while True:
                self.notifications.append(self._notify.recv(4096).decode())
        except OSError:
            pass
        self._notify.close()
        self._notify = None
        try:
            os.unlink(self._notify_path)
        except FileNotFoundError:
            pass

    def _settle(self) -> None:
        # The server sends READY=1 from its loop and closes the notify socket just after;
        # one status round trip (answered by that same loop, reply closed before our EOF)
        # guarantees that has happened, so a fd_count() taken now is a stable baseline.
        if "--status-socket" not in self.extra_args:
            self.status()

    def stop(
        self, check: bool | None = None, timeout: float = 20.0, send_signal: bool = True
    ) -> int:
        """SIGTERM (unless ``send_signal`` is false: the test signalled the server itself) and
        wait; with ``check``, assert exit status 0 and the socket removed."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("the server was not started")
        if proc.poll() is None:
            if send_signal:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"ivshmem-server did not stop within {timeout} s of SIGTERM:\n{self.log()}"
                ) from None
        self.returncode = proc.returncode
        self._close_notify()
        if self.check if check is None else check:
            assert proc.returncode == 0, (
                f"ivshmem-server exited with status {proc.returncode}:\n{self.log()}"
            )
            assert not os.path.exists(self.socket_path), "the server left its socket behind"
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL (no clean-up by the server; the socket file stays)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.returncode = self.proc.returncode
        self._close_notify()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is None:
            return
        if exc_type is not None:
            # Do not hide the test's own failure behind a shutdown assertion.
            try:
                self.stop(check=False)
            except AssertionError:
                self.kill()
            return
        self.stop()

    # -- observing ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server was not started")
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def fds(self) -> list[str]:
        """What each open fd of the server points to (``readlink /proc/PID/fd/N``)."""
        base = f"/proc/{self.pid}/fd"
        targets = []
        for name in os.listdir(base):
            try:
                targets.append(os.readlink(f"{base}/{name}"))
            except FileNotFoundError:
                pass
        return sorted(targets)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The server's JSON status (from its status socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.status_path)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        result: dict[str, Any] = json.loads(b"".join(chunks))
        return result

    def peer_ids(self) -> list[int]:
        return [peer["id"] for peer in self.status()["peers"]]

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Poll ``predicate`` until true; fail the test (with the server log) on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; server log:\n{self.log()}")
            if not self.alive:
                raise AssertionError(f"server died while waiting for {what}:\n{self.log()}")
            time.sleep(0.01)

    def wait_for_fd_count(self, expected: int, timeout: float = 10.0) -> None:
        """Wait until the server has exactly ``expected`` fds open (e.g. its baseline)."""
        try:
            self.wait_until(lambda: self.fd_count() == expected, timeout, "fd count")
        except AssertionError:
            raise AssertionError(
                f"the server's fd count stayed at {self.fd_count()}, not {expected}: "
                f"{self.fds()}\n{self.log()}"
            ) from None


class RawPeer:
    """A minimal ivshmem client over a real socket, built on :mod:`ivshmem.protocol` only.

    For tests and benchmarks of the server: it decodes every message with
    :class:`~ivshmem.protocol.Decoder` and :class:`~ivshmem.protocol.ClientState` and, unless
    ``keep_fds``, closes each received fd at once (so thousands of peers cost no fds here).
    With ``keep_fds`` it keeps ``shm_fd``, ``own_fds`` and ``peer_fds`` for ringing.
    """

    def __init__(self, socket_path: str, keep_fds: bool = False, blocking: bool = False) -> None:
        self.state = ClientState()
        self.decoder = Decoder()
        self.keep_fds = keep_fds
        self.events: list[Any] = []
        self.messages = 0
        self.eof = False
        self.shm_fd: int | None = None
        self.own_fds: list[int] = []
        self.peer_fds: dict[int, list[int]] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(socket_path)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(blocking)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def id(self) -> int | None:
        return self.state.peer_id

    @property
    def peers(self) -> dict[int, int]:
        """Vector counts of the other peers, as this client knows them."""
        return self.state.peers

    def pump(self, limit: int = 1 << 30) -> int:
        """Read the messages available now (up to ``limit``); return how many. Sets ``eof``."""
        count = 0
        space = socket.CMSG_SPACE(4)
        while count < limit and not self.eof:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    MESSAGE_SIZE - self.decoder.pending, space
                )
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                self.eof = True
                break
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(
                        struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
                    )
            if not data:
                for fd in fds:
                    os.close(fd)
                self.eof = True
                break
            message = self.decoder.feed(data, fds)
            if message is None:
                continue
            count += 1
            self.messages += 1
            for event in self.state.receive(*message):
                self._take(event)
        return count

    def _take(self, event: Any) -> None:
        self.events.append(event)
        fd = getattr(event, "fd", None)
        if fd is None:
            if isinstance(event, PeerLeft) and self.keep_fds:
                for old in self.peer_fds.pop(event.peer, []):
                    os.close(old)
            return
        if not self.keep_fds:
            os.close(fd)
        elif isinstance(event, SharedMemoryReceived):
            self.shm_fd = fd
        elif isinstance(event, OwnVector):
            self.own_fds.append(fd)
        elif isinstance(event, PeerVector):
            self.peer_fds.setdefault(event.peer, []).append(fd)

    def complete(self, others: set[int] | frozenset[int], vectors: int) -> bool:
        """Whether this client has its own ``vectors`` and exactly ``others`` with all theirs."""
        st = self.state
        return (
            st.state == st.CONNECTED
            and st.own_vectors == vectors
            and set(st.peers) == set(others)
            and all(n == vectors for n in st.peers.values())
        )

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Pump until ``predicate()``; AssertionError on timeout or EOF first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.eof:
                raise AssertionError("the server closed the connection")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out: peer {self.id} state {self.state.state!r}, peers "
                    f"{self.state.peers}, own vectors {self.state.own_vectors}"
                )
            select.select([self.sock], [], [], min(remaining, 0.5))
            self.pump()

    def wait_eof(self, timeout: float = 10.0) -> None:
        self.wait(lambda: self.eof, timeout)

    def close(self) -> None:
        self.sock.close()
        self.decoder.close()
        fds = [self.shm_fd] if self.shm_fd is not None else []
        fds += self.own_fds + [fd for group in self.peer_fds.values() for fd in group]
        self.shm_fd, self.own_fds, self.peer_fds = None, [], {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pump_all(
    peers: Sequence[RawPeer], predicate: Callable[[], bool], timeout: float = 60.0
) -> None:
    """Read from many peers (epoll) until ``predicate()``; AssertionError on timeout."""
    with selectors.DefaultSelector() as sel:
        for peer in peers:
            sel.register(peer.sock, selectors.EVENT_READ, peer)
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the peers' handshakes")
            for key, _mask in sel.select(0.5):
                peer = key.data
                peer.pump(256)
                if peer.eof:
                    sel.unregister(peer.sock)


def membership_settled(server: ServerProcess, survivors: list[RawPeer], baseline: int) -> bool:
    """Whether the server's peers, every survivor's view of them and the server's fd count
    agree, with nothing left queued (pump the survivors first: messages still queued for them
    rightly keep departed peers' eventfds open in the server until sent)."""
    expected = {p.id for p in survivors}
    return (
        set(server.peer_ids()) == expected
        and all(set(p.peers) == expected - {p.id} for p in survivors)
        and server.status()["counters"]["messages_queued"] == 0
        and server.fd_count() == baseline
    )


def fork_client(path: str, messages: int) -> int:
    """Fork a client that reads ``messages`` messages (or up to the server hanging up), then
    waits to be killed; returns its pid once it has read them."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            peer = RawPeer(path, blocking=True)
            while peer.messages < messages and not peer.eof:
                peer.pump(1)
            os.write(write_end, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        if os.read(read_end, 1) != b"x":
            raise RuntimeError(f"client {pid} died before reading {messages} messages")
    finally:
        os.close(read_end)
    return pid

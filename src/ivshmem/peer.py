"""Host peers: a host process as a first-class peer of the VMs on an ivshmem server.

:func:`connect` (or :func:`connect_async`) opens the server's Unix socket, takes the handshake
and returns a :class:`Peer`, an :class:`~ivshmem.endpoint.Endpoint` with its own peer id, the
whole region mapped read-write, and doorbells to and from every other peer (host processes and
QEMU guests alike)::

    with ivshmem.connect("/tmp/ivshmem_socket") as peer:
        peer.memory[0:5] = b"hello"
        for other in peer.peers:
            peer.notify(other, vector=0)
        vector = peer.wait(timeout=1.0)

How this module deals with the protocol's gaps (see :mod:`ivshmem.protocol`):

* **End of the handshake.** The protocol has no end-of-handshake marker: the server sends the
  existing peers' vectors and then ours, and says nothing more. :func:`connect` stops when
  ``vectors`` own vectors have arrived if the caller gave that number; otherwise, when peers
  exist, when we have as many vectors as they have (a server gives every peer the same count,
  and our own vectors come after all of theirs); otherwise (we are alone) when the server has
  been quiet for :data:`HANDSHAKE_QUIET` seconds. Own vectors that arrive later are still taken
  (``vectors`` grows), so a slow server costs nothing but that wait. Pass ``vectors=`` to skip
  the quiet period.
* **Keeping membership current without a thread.** Join and leave messages are read from the
  socket whenever the peer is used: ``peers`` and :meth:`Peer.service` read everything pending
  (never blocking); :meth:`Peer.wait` and :meth:`Peer.wait_async` watch the socket beside the
  vector eventfds; :meth:`Peer.notify` reads pending messages when it does not know the peer or
  vector yet, and waits up to :data:`JOIN_GRACE` seconds for the rest of a joining peer's
  vectors (they arrive one message each). An application that waits on
  :meth:`Peer.fileno` in its own event loop should also watch :attr:`Peer.server_fd` and call
  :meth:`Peer.service` when it is readable, or the server queues the announcements for it.
* **Losing the server.** When the server goes away (its socket reaches EOF or breaks), every
  doorbell fd is closed and ``peers``, ``notify``, ``wait`` raise
  :class:`~ivshmem.errors.ConnectionLostError`; ``memory``, ``id`` and ``size`` stay usable
  until :meth:`Peer.close`. ``notify`` to a peer already known does not look at the socket, so
  it may still succeed (harmlessly) until something reads the EOF.
* **Reconnecting** (``reconnect=True``, opt-in). The server's peer table and eventfds die with
  it, so after a restart everyone has a new id and new doorbells. The peer keeps trying to
  reconnect (with back-off) whenever it is used; meanwhile ``peers`` is empty, ``notify`` raises
  ConnectionLostError, ``wait`` keeps waiting. Once back, ``id`` and the fds of
  :meth:`Peer.fileno` have changed and :attr:`Peer.on_reconnect` is called. If the server's
  region is the same object as before (a named backing, ``-M NAME`` or a file, which a restarted
  server reopens), the mapping and every view of it are kept and so is the content; otherwise
  (a memfd server) the new region is mapped and ``memory`` returns a new view.
  QEMU guests cannot do this (a limit of the protocol and of QEMU's device): the device reads
  the handshake once, while the VM starts, and a later shared-memory message is an error to
  it, so a guest keeps its memory but loses its doorbells and membership when the server
  restarts. For guests: keep the server up (run it as a service), and if it must restart,
  restart the VMs too or hot-plug a fresh ``ivshmem-doorbell`` device with a new chardev.

Threads: one Peer may be used from several threads (a lock orders server messages and
protects doorbell fds from being closed under a ``notify``), but :meth:`Peer.close` must not
race a ``wait`` in another thread. ``wait`` consumes the eventfd counts: only one consumer per
vector.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import resource
import select
import socket
import stat
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._args import flag_arg, int_arg, peer_arg, range_arg, seconds_arg, timeout_arg
from ._eventfd import try_read
from ._scm import received_fds
from .endpoint import (
    NUMBER_TYPES,
    VECTOR_TYPES,
    EventfdEndpoint,
    Spinner,
    make_spinner,
    poll_ms,
)
from .errors import (
    ClosedError,
    ConnectionLostError,
    DoorbellUnavailableError,
    IvshmemError,
    ProtocolError,
    UnknownPeerError,
    UnknownVectorError,
    UsageError,
)
from .memory import Mapping, format_size
from .protocol import (
    MAX_VECTORS,
    MESSAGE_SIZE,
    ClientState,
    Decoder,
    OwnVector,
    PeerLeft,
    PeerVector,
    SharedMemoryReceived,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "FD_HEADROOM",
    "HANDSHAKE_QUIET",
    "JOIN_GRACE",
    "FdLimitError",
    "HandshakeTimeoutError",
    "Peer",
    "Reconnected",
    "ServerUnavailableError",
    "connect",
    "connect_async",
]

log = logging.getLogger(__name__)

_INF = float("inf")

#: Seconds :func:`connect` waits for the handshake by default.
DEFAULT_TIMEOUT = 5.0
#: Seconds of silence after which a handshake with no other peer (and no ``vectors=``) ends.
HANDSHAKE_QUIET = 0.05
#: Longest :meth:`Peer.notify` waits for the rest of a joining peer's vectors to arrive.
JOIN_GRACE = 1.0
#: Reconnection back-off: first retry, growth factor, longest wait between attempts (seconds).
RECONNECT_FIRST = 0.05
RECONNECT_MAX = 1.0

# Ringing = adding 1 to the peer's eventfd (an 8-byte native integer write); waiting = taking
# the count back, with a read that never blocks whatever O_NONBLOCK says (any peer can clear
# the flag on our doorbells: see ivshmem._eventfd). Bound once: these run on every doorbell.
_eventfd_write = os.eventfd_write
_try_read = try_read
_clock = time.perf_counter
_FD_SIZE = array.array("i").itemsize
# Room for several fds so that a server attaching more than one to a message is caught (the
# Decoder refuses it) instead of the kernel silently dropping the extras (MSG_CTRUNC).
_ANCILLARY_SPACE = socket.CMSG_SPACE(4 * _FD_SIZE)
_RECV_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_EVENTFD_LINK = "anon_inode:[eventfd]"


class ServerUnavailableError(ConnectionLostError):
    """No ivshmem server accepts connections at the socket path (or we may not connect)."""


class HandshakeTimeoutError(IvshmemError, TimeoutError):
    """The server accepted the connection but did not complete the handshake in time."""


class FdLimitError(IvshmemError):
    """This process is at its open-file limit (RLIMIT_NOFILE), so an fd the server sent was
    lost: raise the limit. Not the server's fault."""


@dataclass(frozen=True)
class Reconnected:
    """What :attr:`Peer.on_reconnect` is told after the peer reconnected to a restarted server.

    ``memory_kept`` is True when the new server shares the same region object (named backing),
    so the old mapping, its views and its content are still the shared memory."""

    old_id: int
    new_id: int
    memory_kept: bool


# -- the open-file limit -----------------------------------------------------------------------
#
# A host peer holds one eventfd per vector of every other peer: 1000 peers with 4 vectors each
# are 4000 fds, while most systems start processes with a soft RLIMIT_NOFILE of 1024 (kept low
# for programs that still use select(), which cannot watch fds above 1023). Running into the
# limit is worse than an error: when a message arrives with an fd the process cannot take, the
# kernel does not fail recvmsg(), it drops the fd and sets MSG_CTRUNC, and that doorbell is
# gone for good (the server sends it once). So a peer raises the soft limit -- never the hard
# one, which needs privilege -- before it is reached: whenever a received fd's number comes
# within FD_HEADROOM of it. A process that never gets that many fds is left untouched.

#: A received fd numbered within this many of the soft RLIMIT_NOFILE makes the peer raise it.
FD_HEADROOM = 64
# Fd numbers below this need no look at the limit (recomputed on every look).
_fd_watermark = 0


def _fd_limits() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _make_room_for_fds(fd: int) -> None:
    """Raise the soft open-file limit if ``fd`` is within FD_HEADROOM of it (and the hard
    limit allows): double it, or more if that is not enough room."""
    global _fd_watermark
    soft, hard = _fd_limits()
    infinity = resource.RLIM_INFINITY
    if soft != infinity and fd + FD_HEADROOM >= soft and (hard == infinity or soft < hard):
        new = max(soft * 2, fd + 2 * FD_HEADROOM)
        if hard != infinity:
            new = min(new, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (OSError, ValueError) as err:
            log.warning("cannot raise the soft open-file limit from %d to %d: %s", soft, new, err)
        else:
            log.info(
                "raised this process's soft open-file limit from %d to %d (hard limit %s) to "
                "hold the doorbell fds of the ivshmem peers",
                soft,
                new,
                "unlimited" if hard == infinity else hard,
            )
            soft = new
    _fd_watermark = (1 << 62) if soft == infinity else soft - FD_HEADROOM


def _at_fd_limit(fd: int) -> bool:
    """True when this process cannot open one more fd now (probed by duplicating ``fd``)."""
    try:
        probe = os.dup(fd)
    except OSError as err:
        return err.errno == errno.EMFILE
    os.close(probe)
    return False


def _fd_limit_message(what: str, certain: bool) -> str:
    soft, hard = _fd_limits()
    state = "is at" if certain else "was probably at"
    if hard != resource.RLIM_INFINITY and soft >= hard:
        how = (
            f"the hard limit is {hard} too, so as root: ulimit -Hn, or LimitNOFILE= in the "
            "service's systemd unit"
        )
    else:
        how = "ulimit -n, or resource.setrlimit(resource.RLIMIT_NOFILE, ...) in the program"
    return (
        f"{what}: this process {state} its open-file limit ({soft}): raise it; {how}. A host "
        "peer holds one fd per vector of every peer on the server, itself included, plus two"
    )


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _ServerClosed(Exception):
    """The server closed its end of the socket (EOF)."""

    def __init__(self) -> None:
        super().__init__("the server closed the connection")


class _Connection:
    """One connection to a server: the socket, the protocol state and every fd received on it.

    It owns each fd from the moment ``recvmsg`` returns it: the shared-memory fd until
    :meth:`take_shm`, the eventfds until :meth:`close`.
    """

    def __init__(self, sock: socket.socket, path: str, vectors: int | None) -> None:
        self.sock = sock
        self.path = path
        self.expected_vectors = vectors
        self.decoder = Decoder()
        self.state = ClientState(MAX_VECTORS if vectors is None else vectors)
        self.messages = 0
        self.shm_fd: int | None = None
        #: Our vector eventfds, in vector order.
        self.own: list[int] = []
        #: Each other peer's doorbell eventfds, in vector order.
        self.ring: dict[int, list[int]] = {}

    @property
    def peer_id(self) -> int:
        assert self.state.peer_id is not None
        return self.state.peer_id

    def read_message(self) -> tuple[int, int | None] | None:
        """One whole message if the socket has it now, else None (a partial one is kept)."""
        while True:
            want = MESSAGE_SIZE - self.decoder.pending
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(want, _ANCILLARY_SPACE, _RECV_FLAGS)
            except BlockingIOError:
                return None
            except OSError as err:
                raise ConnectionLostError(
                    f"the connection to the ivshmem server at {self.path} broke: {err}"
                ) from err
            fds = received_fds(ancdata)
            if flags & socket.MSG_CTRUNC:
                # The kernel truncates the fds of a message for two reasons: more than the room
                # we gave (4: only a server breaking the protocol sends more than 1), or this
                # process could not take one (EMFILE), which drops that fd and the rest. Probe
                # before closing what did arrive, so that the probe sees the same fd table.
                at_limit = _at_fd_limit(self.sock.fileno())
                for fd in fds:
                    _close_quietly(fd)
                if at_limit or not fds:
                    raise FdLimitError(
                        _fd_limit_message(
                            f"the kernel dropped an fd the ivshmem server at {self.path} sent",
                            certain=at_limit,
                        )
                    )
                raise ProtocolError(
                    "the server attached more fds to one message than the protocol allows (1)"
                )
            if fds and max(fds) >= _fd_watermark:
                _make_room_for_fds(max(fds))
            if not data:
                for fd in fds:  # cannot happen (fds come with data), but never leak
                    _close_quietly(fd)
                raise _ServerClosed
            message = self.decoder.feed(data, fds)
            if message is not None:
                self.messages += 1
                return message

    def apply(self, value: int, fd: int | None) -> list[tuple[str, int]]:
        """Take one message; return the membership changes it causes, as (what, peer)."""
        changes: list[tuple[str, int]] = []
        try:
            events = self.state.receive(value, fd)
        except ProtocolError as err:
            if self.expected_vectors is not None and "vectors" in str(err):
                raise ProtocolError(
                    f"{err} (connect() was told to expect {self.expected_vectors} vector(s): "
                    f"is the server running with -n {self.expected_vectors}?)"
                ) from err
            raise
        for event in events:
            if isinstance(event, PeerVector):
                self._check_eventfd(event.fd, f"peer {event.peer} vector {event.vector}")
                self.ring.setdefault(event.peer, []).append(event.fd)
                if event.vector == 0:
                    changes.append(("joined", event.peer))
            elif isinstance(event, OwnVector):
                self._check_eventfd(event.fd, f"own vector {event.vector}")
                self.own.append(event.fd)
                changes.append(("own-vector", event.vector))
            elif isinstance(event, PeerLeft):
                for old in self.ring.pop(event.peer, ()):
                    _close_quietly(old)
                changes.append(("left", event.peer))
            elif isinstance(event, SharedMemoryReceived):
                self.shm_fd = event.fd
        return changes

    @staticmethod
    def _check_eventfd(fd: int, what: str) -> None:
        # Trust argument: notify() writes 8 bytes to these fds and wait() reads 8 from them. A
        # server handing us some other kind of fd (a file, a socket) would make us write into it,
        # so each one is checked once, when it arrives. Without /proc we cannot tell; accept.
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if kind != _EVENTFD_LINK:
            _close_quietly(fd)
            raise ProtocolError(f"the fd the server sent for {what} is not an eventfd ({kind})")

    def take_shm(self) -> int:
        fd, self.shm_fd = self.shm_fd, None
        assert fd is not None
        return fd

    def close(self) -> None:
        self.sock.close()
        self.decoder.close()
        if self.shm_fd is not None:
            _close_quietly(self.take_shm())
        own, self.own = self.own, []
        for fd in own:
            _close_quietly(fd)
        ring, self.ring = self.ring, {}
        for fds in ring.values():
            for fd in fds:
                _close_quietly(fd)


# --------------------------------------------------------------------------------------------
# Opening a connection and taking the handshake


def _open_socket(path: str, timeout: float | None) -> socket.socket:
    """A socket connected to ``path``, trying until ``timeout`` while the server's listen
    backlog is full.

    A Unix socket's connect() to a listener whose backlog is full (a flood of connects, a
    server short of fds) fails at once with EAGAIN when the socket is non-blocking, and
    Python's socket timeouts make it non-blocking. QEMU's blocking connect waits in the kernel
    instead; so does this, with ``timeout=None``, and otherwise retries with a short back-off
    until the deadline."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise UsageError(f"socket path must be a path, not {type(path).__name__}")
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _BACKLOG_FIRST
    sock = _new_socket()
    try:
        sock.setblocking(deadline is None)
        while True:
            try:
                sock.connect(os.fspath(path))
                break
            except BlockingIOError:
                assert deadline is not None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _backlog_full(str(path), timeout) from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, _BACKLOG_MAX)
        sock.setblocking(False)
    except BaseException as err:
        sock.close()
        if isinstance(err, IvshmemError):
            raise
        raise _connect_error(str(path), err) from err
    return sock


#: Back-off while a server's listen backlog is full: first pause, longest pause (seconds).
_BACKLOG_FIRST = 0.001
_BACKLOG_MAX = 0.05


def _backlog_full(path: str, timeout: float | None) -> HandshakeTimeoutError:
    return HandshakeTimeoutError(
        f"the ivshmem server at {path} did not accept the connection within {timeout or 0:g} s: "
        "its listen backlog stayed full (many clients connecting at once, or the server is out "
        "of file descriptors: see its log); retry later or pass a longer timeout"
    )


def _new_socket() -> socket.socket:
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as err:
        if err.errno == errno.EMFILE:
            raise FdLimitError(
                _fd_limit_message("cannot open a socket to the ivshmem server", certain=True)
            ) from err
        raise


def _connect_error(path: str, err: BaseException) -> BaseException:
    if isinstance(err, FileNotFoundError):
        return ServerUnavailableError(
            f"no ivshmem server socket at {path}: start one (ivshmem-server -S {path}) or pass "
            "the path it listens on"
        )
    if isinstance(err, ConnectionRefusedError):
        return ServerUnavailableError(
            f"{path} exists but no ivshmem server listens on it (left over from a server that "
            "stopped?): start the server"
        )
    if isinstance(err, PermissionError):
        return ServerUnavailableError(
            f"no permission to connect to {path}: the server's socket mode or group does not "
            "admit this user"
        )
    if isinstance(err, (TimeoutError, socket.timeout)):
        return HandshakeTimeoutError(f"connecting to {path} timed out: the server is not accepting")
    if isinstance(err, OSError) and "too long" in str(err):
        return UsageError(f"socket path {path!r} is too long for a Unix socket (108 bytes max)")
    if isinstance(err, OSError):
        return ServerUnavailableError(f"cannot connect to {path}: {err.strerror or err}")
    return err


class _Handshake:
    """Drives a :class:`_Connection` through the handshake; I/O-free apart from non-blocking
    reads, so a blocking and an asyncio driver share it."""

    def __init__(
        self, conn: _Connection, timeout: float | None, quiet: float, started: float
    ) -> None:
        """``timeout`` counts from ``started`` (time.monotonic() before connecting): it bounds
        connecting and the handshake together, and the error message names it as given."""
        self.conn = conn
        self.quiet = quiet
        self.deadline = None if timeout is None else started + timeout
        self.timeout = timeout
        self.last = time.monotonic()

    def _complete(self) -> bool | None:
        """True when done, False when more is needed, None when only silence can tell."""
        conn = self.conn
        if conn.state.state != ClientState.CONNECTED:
            return False
        own = len(conn.own)
        if conn.expected_vectors is not None:
            return own >= conn.expected_vectors
        if conn.state.peers:
            # Our own vectors come after every existing peer's, and a server gives every peer
            # the same number: once ours start, theirs tell how many to expect.
            return own > 0 and own >= max(conn.state.peers.values())
        return None

    def step(self) -> float | None:
        """Read what is there; return None when the handshake is complete, else how long to
        wait (seconds; ``inf``: no limit) for the socket to become readable before calling
        again."""
        while True:
            try:
                message = self.conn.read_message()
            except _ServerClosed:
                raise self._closed_error() from None
            if message is None:
                break
            self.conn.apply(*message)
            self.last = time.monotonic()
            if self._complete():
                return None  # what follows belongs to the session (joins, leaves)
        done = self._complete()
        now = time.monotonic()
        if done:
            return None
        if done is None and now - self.last >= self.quiet:
            return None
        if self.deadline is not None and now >= self.deadline:
            raise self._timeout_error()
        # No deadline is an infinite wait, not None: None means "complete", and a handshake
        # with timeout=None once ended here, before the shared memory had arrived.
        wait = _INF if self.deadline is None else self.deadline - now
        if done is None:
            wait = min(wait, self.quiet - (now - self.last))
        return wait

    def _closed_error(self) -> IvshmemError:
        conn = self.conn
        if conn.messages == 0 and not conn.decoder.pending:
            return ConnectionLostError(
                f"the ivshmem server at {conn.path} closed the connection before the handshake "
                "(it may refuse this user or be shutting down: see its log)"
            )
        return ProtocolError(
            f"the ivshmem server at {conn.path} closed the connection in the middle of the "
            f"handshake ({conn.state.state}, after {conn.messages} message(s))"
        )

    def _timeout_error(self) -> HandshakeTimeoutError:
        conn = self.conn
        if conn.state.state != ClientState.CONNECTED:
            where = conn.state.state
        elif conn.expected_vectors is not None:
            where = (
                f"{len(conn.own)} of the {conn.expected_vectors} own vector(s) expected arrived: "
                f"is the server running with -n {conn.expected_vectors}?"
            )
        else:
            where = f"{len(conn.own)} own vector(s) arrived"
        return HandshakeTimeoutError(
            f"the ivshmem server at {conn.path} did not complete the handshake within "
            f"{self.timeout or 0:g} s ({where})"
        )


def _handshake_sync(
    path: str, timeout: float | None, vectors: int | None, quiet: float
) -> _Connection:
    started = time.monotonic()
    sock = _open_socket(path, timeout)
    conn = _Connection(sock, path, vectors)
    try:
        handshake = _Handshake(conn, timeout, quiet, started)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while (wait := handshake.step()) is not None:
            poller.poll(-1 if wait == _INF else poll_ms(wait))
    except BaseException:
        conn.close()
        raise
    return conn


async def _handshake_async(
    path: str, timeout: float | None, vectors: int | None, quiet: float
) -> _Connection:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    pause = _BACKLOG_FIRST
    sock = _new_socket()
    sock.setblocking(False)
    try:
        while True:
            # A Unix socket's non-blocking connect() completes at once or fails with EAGAIN
            # (never EINPROGRESS), so it is called directly: loop.sock_connect() would wait for
            # writability, which an unconnected Unix socket reports at once, and then take the
            # missing connection for an established one.
            try:
                sock.connect(os.fspath(path))
                break
            except BlockingIOError:
                # The backlog is full (see _open_socket): try again until the deadline.
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise _backlog_full(str(path), timeout) from None
                await asyncio.sleep(pause if left is None else min(pause, left))
                pause = min(pause * 2, _BACKLOG_MAX)
    except BaseException as err:
        sock.close()
        if isinstance(err, (asyncio.CancelledError, IvshmemError)):
            raise
        raise _connect_error(str(path), err) from err
    conn = _Connection(sock, path, vectors)
    try:
        handshake = _Handshake(conn, timeout, quiet, started)
        while (wait := handshake.step()) is not None:
            await _readable(loop, sock.fileno(), None if wait == _INF else wait)
    except BaseException:
        conn.close()
        raise
    return conn


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float | None) -> None:
    """Return when ``fd`` is readable or ``timeout`` seconds passed."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)


class _Region:
    """The mapping of the server's shared memory and what identifies the object behind it."""

    def __init__(self, fd: int) -> None:
        """Map the region behind ``fd`` (always closed here: the mapping keeps the memory)."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError(
                    "the fd the server sent as shared memory is not a memory object or file"
                )
            if st.st_size <= 0:
                raise ProtocolError(
                    "the shared memory the server sent is empty (size 0): check the server's -l"
                )
            try:
                self.mapping = Mapping(fd, st.st_size)
            except UsageError as err:
                cause = err.__cause__
                if isinstance(cause, OSError) and cause.errno == errno.EMFILE:
                    # Python's mmap keeps a duplicate of the fd: one more fd than received.
                    raise FdLimitError(
                        _fd_limit_message("cannot map the shared memory", certain=True)
                    ) from err
                raise ProtocolError(f"cannot map the shared memory the server sent: {err}") from err
            self.key = (st.st_dev, st.st_ino, st.st_size)
        finally:
            _close_quietly(fd)


# --------------------------------------------------------------------------------------------
# The peer


_PollMethod = Callable[..., list[tuple[int, int]]]
# A cached poll set: its bound poll() method, {eventfd: vector}, the server socket's fd, and for
# spinning (see ivshmem.endpoint.make_spinner) a spinner, and with a single eventfd also
# (fd, vector), which wait() spins on inline.
_Poller = tuple[_PollMethod, dict[int, int], int, Spinner, tuple[int, int] | None]


class Peer(EventfdEndpoint):
    """A host process connected to an ivshmem server as one of its peers.

    Made by :func:`connect` / :func:`connect_async`. Callbacks (``None`` by default; exceptions
    they raise propagate to the call that processed the server message):

    * ``on_peer_joined(peer_id)`` when a peer's first vector arrives (its further vectors may
      still be on the way; :meth:`notify` waits for them);
    * ``on_peer_left(peer_id)`` when a peer leaves (or, with ``reconnect=True``, when the
      server is lost: every known peer is reported as left);
    * ``on_reconnect(Reconnected)`` after a reconnection; then every peer of the new server is
      reported through ``on_peer_joined``.
    """

    on_peer_joined: Callable[[int], Any] | None
    on_peer_left: Callable[[int], Any] | None
    on_reconnect: Callable[[Reconnected], Any] | None

    def __init__(
        self,
        conn: _Connection,
        region: _Region,
        *,
        timeout: float | None,
        vectors: int | None,
        reconnect: bool,
        quiet: float,
    ) -> None:
        # Private: use connect(). Takes over ``conn`` and ``region``.
        self.on_peer_joined = None
        self.on_peer_left = None
        self.on_reconnect = None
        self._path = conn.path
        self._timeout = timeout
        self._expected_vectors = vectors
        self._reconnect = reconnect
        self._quiet = quiet
        self._lock = threading.Lock()
        self._region: _Region | None = region
        self._closed = False
        self._lost: BaseException | None = None
        self._retry_at = 0.0
        self._retry_wait = RECONNECT_FIRST
        self._reconnecting = False
        self._last_vectors = 0
        self._pollers: dict[int | None, _Poller] = {}
        self._install(conn)

    # -- connection state ------------------------------------------------------------------

    def _install(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self._id = conn.peer_id
        # The hot paths (notify, wait) read these directly: the lists and dict are the
        # connection's own, updated in place as messages arrive.
        self._own = conn.own
        self._ring = conn.ring
        self._last_vectors = len(conn.own)
        self._pollers = {}

    def _lose(self, err: BaseException) -> list[tuple[str, int]]:
        """The connection is gone: release it. Caller holds the lock."""
        conn, self._conn = self._conn, None
        changes: list[tuple[str, int]] = []
        self._drop_async_watches()
        if conn is not None:
            if self._reconnect:
                changes = [("left", p) for p in sorted(conn.ring)]
            conn.close()
        self._own = []
        self._ring = {}
        self._pollers = {}
        if self._reconnect:
            log.warning("lost the ivshmem server at %s (%s); reconnecting", self._path, err)
            self._retry_at = time.monotonic()
            self._retry_wait = RECONNECT_FIRST
        else:
            self._lost = err
        return changes

    def _lost_error(self) -> ConnectionLostError:
        if self._reconnect:
            return ConnectionLostError(
                f"not connected to the ivshmem server at {self._path} (reconnecting)"
            )
        cause = self._lost
        if isinstance(cause, FdLimitError):
            # Not the server's doing: say so first, and what to fix before connecting again.
            what = f"{cause}. Doorbells and membership are gone"
        else:
            if isinstance(cause, _ServerClosed):
                how = "closed the connection"
            elif isinstance(cause, ProtocolError):
                how = f"broke the protocol ({cause})"
            else:
                how = f"connection broke ({cause})"
            what = f"the ivshmem server at {self._path} {how}: doorbells and membership are gone"
        err = ConnectionLostError(
            f"{what}; the memory stays mapped until close(). Connect again (or use reconnect=True)"
        )
        err.__cause__ = cause
        return err

    def _check_usable(self) -> None:
        """Raise ClosedError / ConnectionLostError if doorbells cannot be used."""
        if self._closed:
            raise ClosedError("the peer is closed")
        if self._conn is None:
            raise self._lost_error()

    def _drain(self) -> list[tuple[str, int]]:
        """Apply every message the server has sent so far. Caller holds the lock."""
        conn = self._conn
        if conn is None:
            return []
        changes: list[tuple[str, int]] = []
        try:
            while (message := conn.read_message()) is not None:
                changes.extend(conn.apply(*message))
        except (_ServerClosed, ConnectionLostError, ProtocolError, FdLimitError) as err:
            # A dropped fd (FdLimitError) leaves a peer without a doorbell that the server will
            # never send again: only a new connection is complete again.
            changes.extend(self._lose(err))
            return changes
        if any(what == "own-vector" for what, _ in changes):
            # A late own vector: every wait set must include it (async waiters start over).
            self._pollers = {}
            self._fds_changed()
            self._last_vectors = len(conn.own)
        return changes

    def _dispatch(self, changes: list[tuple[str, int]]) -> None:
        for what, peer in changes:
            if what == "joined":
                log.debug("peer %d joined", peer)
                if self.on_peer_joined is not None:
                    self.on_peer_joined(peer)
            elif what == "left":
                log.debug("peer %d left", peer)
                if self.on_peer_left is not None:
                    self.on_peer_left(peer)

    def service(self) -> None:
        """Process every message the server has sent so far (never blocks), and with
        ``reconnect=True`` try to reconnect if due. Raises ConnectionLostError once the server
        is gone (without ``reconnect``), ClosedError after :meth:`close`."""
        if self._closed:
            raise ClosedError("the peer is closed")
        with self._lock:
            changes = self._drain()
        self._dispatch(changes)
        if self._conn is None:
            if not self._reconnect:
                raise self._lost_error()
            self._reconnect_sync()

    # -- reconnection ----------------------------------------------------------------------

    def _reconnect_due(self) -> bool:
        """Claim the next reconnection attempt if one is due (one attempt at a time: two
        threads reconnecting at once would make two connections and leak one)."""
        with self._lock:
            if (
                self._closed
                or self._conn is not None
                or self._reconnecting
                or time.monotonic() < self._retry_at
            ):
                return False
            self._reconnecting = True
            return True

    def _reconnect_failed(self, err: BaseException) -> None:
        log.debug("reconnecting to %s failed: %s", self._path, err)
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, RECONNECT_MAX)
        self._reconnecting = False

    def _reconnect_sync(self) -> None:
        if not self._reconnect_due():
            return
        try:
            conn = _handshake_sync(self._path, self._timeout, self._expected_vectors, self._quiet)
        except IvshmemError as err:
            self._reconnect_failed(err)
            return
        except BaseException:
            self._reconnecting = False
            raise
        self._adopt(conn)

    async def _reconnect_async(self) -> None:
        if not self._reconnect_due():
            return
        try:
            conn = await _handshake_async(
                self._path, self._timeout, self._expected_vectors, self._quiet
            )
        except IvshmemError as err:
            self._reconnect_failed(err)
            return
        except BaseException:  # cancelled: the next wait tries again
            self._reconnecting = False
            raise
        self._adopt(conn)

    def _adopt(self, conn: _Connection) -> None:
        """Install a new connection after a reconnect (the handshake is done)."""
        old = self._region
        try:
            shm_fd = conn.take_shm()
            try:
                st = os.fstat(shm_fd)
            except OSError:
                _close_quietly(shm_fd)
                raise
            kept = old is not None and old.key == (st.st_dev, st.st_ino, st.st_size)
            if kept:
                _close_quietly(shm_fd)
                region = old
            else:
                region = _Region(shm_fd)
        except BaseException as err:
            conn.close()
            if isinstance(err, (IvshmemError, OSError)):
                self._reconnect_failed(err)
                return
            self._reconnecting = False
            raise
        with self._lock:
            self._reconnecting = False
            if self._closed:
                conn.close()
                if region is not old and region is not None:
                    region.mapping.close()
                return
            if not kept and old is not None:
                old.mapping.close()
            self._region = region
            old_id = self._id
            self._install(conn)
        info = Reconnected(old_id, self._id, kept)
        log.info(
            "reconnected to %s as peer %d (was %d); memory %s",
            self._path,
            self._id,
            old_id,
            "kept" if kept else "replaced (the server has a new region)",
        )
        if self.on_reconnect is not None:
            self.on_reconnect(info)
        self._dispatch([("joined", p) for p in sorted(conn.ring)])

    def _reconnect_sleep(self) -> float:
        return max(0.0, self._retry_at - time.monotonic())

    # -- the Endpoint contract -------------------------------------------------------------

    @property
    def id(self) -> int:
        """Our peer id (it changes when the peer reconnects to a restarted server)."""
        return self._id

    @property
    def size(self) -> int:
        return self._mapped().size

    @property
    def memory(self) -> memoryview:
        return self._mapped().memory

    def _mapped(self) -> Mapping:
        region = self._region
        if region is None or self._closed:
            raise ClosedError("the peer is closed")
        return region.mapping

    @property
    def vectors(self) -> int:
        """How many vectors we receive on (the last known count while reconnecting)."""
        return len(self._own) if self._conn is not None else self._last_vectors

    @property
    def peers(self) -> frozenset[int]:
        """Ids of the other peers connected to the server now (reads pending server messages
        first). Empty while reconnecting."""
        self.service()
        return frozenset(self._ring)

    @property
    def connected(self) -> bool:
        """True while the server connection is up."""
        return self._conn is not None and not self._closed

    @property
    def socket_path(self) -> str:
        return self._path

    @property
    def server_fd(self) -> int:
        """The server socket's fd: readable when the server has news; call :meth:`service`."""
        self._check_usable()
        assert self._conn is not None
        return self._conn.sock.fileno()

    def vectors_of(self, peer: int) -> int:
        """How many vectors of ``peer`` we can ring (our own id included)."""
        peer = peer_arg(peer)
        self.service()
        if peer == self._id:
            return len(self._own)
        fds = self._ring.get(peer)
        if fds is None:
            raise UnknownPeerError(peer, frozenset(self._ring))
        return len(fds)

    def notify(self, peer: int, vector: int = 0) -> None:
        """Ring vector ``vector`` of ``peer``. Our own id rings our own vector (the server
        sends us the eventfds we receive on, and writing one is ringing it, as QEMU's client
        and device allow too): a :meth:`wait` here, or whoever watches :meth:`fileno`, gets it.
        """
        # The doorbell hot path. acquire()/release() rather than ``with``: measurably cheaper
        # here, and this runs once per doorbell.
        lock = self._lock
        lock.acquire()
        try:
            # The type() checks: True and 1.0 hash as 1, and would ring peer or vector 1.
            fds = self._ring.get(peer) if type(peer) is int else None
            if fds is not None and type(vector) is int and 0 <= vector < len(fds):
                # Under the lock: a leave processed by another thread cannot close this fd (and
                # let its number be reused for something else) between lookup and write.
                try:
                    _eventfd_write(fds[vector], 1)
                except BlockingIOError:
                    pass  # see _ring()
                return
        finally:
            lock.release()
        self._notify_slow(peer, vector)

    def _notify_slow(self, peer: int, vector: int) -> None:
        # The peer or vector is not known (yet): read what the server sent meanwhile. A new
        # peer's vectors arrive one message each, and the server may still be writing them: a
        # known peer with fewer vectors than we have (a server gives every peer the same count)
        # is still joining, so wait for the rest, briefly.
        peer = peer_arg(peer)
        vector = int_arg(vector, "vector")
        self._check_usable()
        if peer == self._id:
            with self._lock:
                self._check_usable()
                own = self._own
                if not 0 <= vector < len(own):
                    raise UnknownVectorError(vector, len(own), peer)
                _ring(own[vector])  # under the lock, like any ring: close() cannot race it
            return
        self.service()
        deadline = time.monotonic() + JOIN_GRACE
        while True:
            with self._lock:
                self._check_usable()
                assert self._conn is not None
                fds = self._ring.get(peer)
                if fds is None:
                    raise UnknownPeerError(peer, frozenset(self._ring))
                if 0 <= vector < len(fds):
                    _ring(fds[vector])
                    return
                joining = len(fds) <= vector < len(self._own)
                sock_fd = self._conn.sock.fileno()
                left = deadline - time.monotonic()
                if not joining or left <= 0:
                    raise UnknownVectorError(vector, len(fds), peer)
            poller = select.poll()
            poller.register(sock_fd, select.POLLIN)
            poller.poll(max(1, int(left * 1000)))
            self.service()

    def _own_fds(self) -> list[int]:
        return self._own

    def _extra_fds(self) -> tuple[int, ...]:
        conn = self._conn
        return () if conn is None else (conn.sock.fileno(),)

    def _on_extra(self, fd: int) -> None:
        self.service()

    def fileno(self, vector: int = 0) -> int:
        """The eventfd of our vector ``vector`` (changes when the peer reconnects)."""
        self._check_usable()
        return self._own[self._check_vector(vector)]

    def _poller(self, vector: int | None) -> _Poller:
        """A poll set (cached until the fds change) of the wanted vector(s) and the socket."""
        cached = self._pollers.get(vector)
        if cached is not None:
            return cached
        self._check_usable()
        assert self._conn is not None
        own = self._own
        if vector is None:
            if not own:
                raise DoorbellUnavailableError(
                    "the server gave this peer no vectors, so there is nothing to wait on"
                )
            wanted = dict((fd, v) for v, fd in enumerate(own))
        else:
            self._check_vector(vector)
            wanted = {own[vector]: vector}
        p = select.poll()
        for fd in wanted:
            p.register(fd, select.POLLIN)
        sock_fd = self._conn.sock.fileno()
        p.register(sock_fd, select.POLLIN)
        single = next(iter(wanted.items())) if len(wanted) == 1 else None
        poller: _Poller = (p.poll, wanted, sock_fd, make_spinner(wanted), single)
        self._pollers[vector] = poller
        return poller

    def wait(
        self, vector: int | None = None, timeout: float | None = None, *, spin: float | None = None
    ) -> int | None:
        """Block until one of our vectors (or ``vector``) is rung; return its number, or None
        after ``timeout`` seconds. Server messages are processed meanwhile. When several vectors
        are pending the lowest is returned first. Spins ``spin`` seconds (default
        :attr:`spin`) before sleeping; see :mod:`ivshmem.endpoint`. ``timeout`` holds even
        when another peer cleared O_NONBLOCK on our doorbell (see :mod:`ivshmem._eventfd`)."""
        # The doorbell hot path: a cached poll set, one poll(), one read. Anything else (socket
        # news, several vectors ready, no cached set yet) takes the full loop. A blocking read()
        # alone would be cheaper, but it is not available: O_NONBLOCK is a flag of the open file
        # description, which every holder of an eventfd shares, and our server creates them
        # non-blocking while QEMU sets it on every eventfd it receives. It would also leave the
        # server socket (joins, leaves, the server going away) unwatched. Every read here is
        # ivshmem._eventfd's try_read, which never blocks even if another peer cleared the
        # shared O_NONBLOCK: a timeout is kept whatever other holders of the fd do.
        # type() first: True and 1.0 would find vector 1's set, and a list is unhashable.
        cached = self._pollers.get(vector) if type(vector) in VECTOR_TYPES else None
        if (
            cached is None
            or not (timeout is None or (type(timeout) in NUMBER_TYPES and 0 <= timeout < _INF))
            or not (spin is None or (type(spin) in NUMBER_TYPES and 0 <= spin < _INF))
        ):
            return self._wait_checked(vector, timeout, spin)
        budget = self.spin if spin is None else spin
        if timeout is None:
            deadline = None
        else:
            deadline = _deadline(timeout)
            if timeout < budget:
                budget = timeout  # 0 or less: no spin
        if budget > 0:
            # Socket news is not looked at while spinning: the budget is microseconds.
            single = cached[4]
            if single is None:
                found = cached[3](budget)
                if found is not None:
                    return found
            else:
                # One eventfd, the usual case: make_spinner's loop written out here, which
                # saves a call on the way from the ring to the return (the round trip of two
                # spinning peers is about 2 µs, and each call is a few percent of it).
                fd = single[0]
                end = _clock() + budget
                while True:
                    if _try_read(fd):
                        return single[1]
                    if _clock() >= end:
                        break
        # poll() counts whole milliseconds: round a timeout up, never down to "block".
        ms = -1 if deadline is None else poll_ms(deadline - time.monotonic())
        try:
            events = cached[0](ms)
        except RuntimeError:  # another thread is polling this set
            return self._wait(vector, deadline)
        if not events:
            return None  # timed out (poll() itself retries after EINTR)
        if len(events) == 1:
            fd = events[0][0]
            found = cached[1].get(fd)
            # Readable a moment ago is no promise: another holder of the fd may have taken the
            # count since (and cleared O_NONBLOCK), so this read must not block either.
            if found is not None and _try_read(fd):
                return found
        return self._wait(vector, deadline)

    def _wait_checked(self, vector: object, timeout: object, spin: object) -> int | None:
        """wait() for arguments its hot path does not take: check them (the argument rule,
        see ivshmem._args), then wait."""
        v = None if vector is None else int_arg(vector, "vector")
        t = timeout_arg(timeout)
        s = None if spin is None else seconds_arg(spin, "spin", finite=True)
        if v is not None and self._conn is not None:
            self._check_vector(v)
        if self._pollers.get(v) is not None:
            return self.wait(v, t, spin=s)  # plain values now: takes the hot path
        return self._wait(v, None if t is None else _deadline(t))

    def _wait(self, vector: int | None, deadline: float | None) -> int | None:
        """The full wait loop, until ``deadline`` (time.monotonic(); None: no limit)."""
        while True:
            if self._conn is None and self._reconnect and not self._closed:
                self._reconnect_sync()
                if self._conn is None:
                    if vector is not None:
                        self._check_vector(vector)
                    pause = self._reconnect_sleep()
                    if deadline is not None:
                        pause = min(pause, deadline - time.monotonic())
                        if pause <= 0:
                            return None
                    time.sleep(pause)
                    continue
            cached = self._poller(vector)
            poll, wanted, sock_fd, _, _ = cached
            ms = -1 if deadline is None else poll_ms(deadline - time.monotonic())
            try:
                events = poll(ms)
            except RuntimeError:
                # Another thread is in poll() on this cached set: use a private one.
                self._pollers.pop(vector, None)
                continue
            best = -1
            best_fd = -1
            server = False
            for fd, _ in events:
                v = wanted.get(fd)
                if v is None:
                    server = fd == sock_fd
                elif best < 0 or v < best:
                    best, best_fd = v, fd
            if server:
                # Serve the socket before answering, so that a busy doorbell cannot starve
                # membership updates. The set may change (reconnect, late vector): start over.
                self.service()
                if self._pollers.get(vector) is not cached:
                    continue
            # Someone else may have taken the count since poll() (the fd is shared with a
            # selector of ours, or with a peer that holds it too): try_read never blocks.
            if best >= 0 and _try_read(best_fd):
                return best
            if deadline is not None and time.monotonic() >= deadline:
                return None

    async def wait_async(
        self, vector: int | None = None, timeout: float | None = None
    ) -> int | None:
        """Asyncio variant of :meth:`wait` (uses ``add_reader`` on the vector fds and the
        socket for the duration of the call: do not register them yourself meanwhile)."""
        vector = None if vector is None else int_arg(vector, "vector")
        timeout = timeout_arg(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            if self._conn is None and self._reconnect and not self._closed:
                await self._reconnect_async()
                if self._conn is None:
                    if vector is not None:
                        self._check_vector(vector)
                    pause = self._reconnect_sleep()
                    if deadline is not None:
                        pause = min(pause, deadline - time.monotonic())
                        if pause <= 0:
                            return None
                    await asyncio.sleep(pause)
                    continue
            # Anything already pending (and the socket) is handled without touching the loop.
            found = self.wait(vector, 0)
            if found is not None:
                return found
            if self._conn is None:
                continue
            _, wanted, sock_fd, _, _ = self._poller(vector)
            if not await self._await_readable(loop, (*wanted, sock_fd), deadline):
                return None
            # Loop: the non-blocking wait at the top consumes the count (or serves the socket).

    def _drop_async_watches(self) -> None:
        """Unregister every wait_async reader before its fd is closed (a closed fd left in an
        event loop's selector breaks the next registration of the same number) and wake the
        waiters so they start over with the new fds."""
        self._fds_changed()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disconnect from the server and release every fd and the mapping. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_async_watches()
            conn, self._conn = self._conn, None
            region, self._region = self._region, None
            self._own = []
            self._ring = {}
            self._pollers = {}
        if conn is not None:
            conn.close()
        if region is not None:
            region.mapping.close()

    def __enter__(self) -> Peer:
        return self

    def __del__(self) -> None:
        # A peer dropped without close() must not leak its fds; say so, as sockets do.
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._conn is None:
            state = "reconnecting" if self._reconnect else "lost"
        else:
            state = f"{len(self._ring)} other peer(s)"
        size = format_size(self._region.mapping.size) if self._region is not None else "-"
        return f"<Peer id={self._id} {self._path} size={size} vectors={self.vectors} {state}>"


def _deadline(timeout: float) -> float:
    return time.monotonic() + max(timeout, 0.0)


def _ring(fd: int) -> None:
    try:
        _eventfd_write(fd, 1)
    except BlockingIOError:
        # A non-blocking eventfd whose counter is at its maximum: the peer has rings pending
        # already and will wake up; nothing is lost by dropping ours.
        pass


# --------------------------------------------------------------------------------------------
# Entry points


def _check_args(
    socket_path: object, vectors: object, timeout: object, reconnect: object
) -> tuple[str, int | None, float | None, bool]:
    """connect()'s arguments by the argument rule (ivshmem._args), normalised."""
    if not isinstance(socket_path, (str, os.PathLike)):
        raise UsageError(
            f"socket_path must be a path (str or os.PathLike), not {type(socket_path).__name__}"
        )
    path = os.fspath(socket_path)
    if not isinstance(path, str) or not path or "\0" in path:
        raise UsageError(f"socket_path {path!r} is not a usable socket path")
    v = None if vectors is None else range_arg(vectors, "vectors", 1, MAX_VECTORS)
    t = timeout_arg(timeout)
    if t == 0:
        raise UsageError("timeout must be a number of seconds > 0 (or None for no limit), not 0")
    return path, v, t, flag_arg(reconnect, "reconnect")


def connect(
    socket_path: str | os.PathLike[str] = "/tmp/ivshmem_socket",
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    vectors: int | None = None,
    reconnect: bool = False,
) -> Peer:
    """Connect to the ivshmem server at ``socket_path`` and return the :class:`Peer`.

    ``timeout`` bounds connecting plus the handshake (None: no bound). ``vectors`` is how many
    own vectors to expect (the server's ``-n``); without it the count is learned as described in
    this module's docstring, which for the first peer means waiting :data:`HANDSHAKE_QUIET`
    seconds. ``reconnect=True`` makes the peer reconnect when the server restarts.

    Raises ServerUnavailableError (nobody listens), HandshakeTimeoutError, ConnectionLostError
    (the server closed before the handshake, e.g. refusing us), ProtocolError (the server broke
    the protocol; every fd received is closed).
    """
    path, vectors, timeout, reconnect = _check_args(socket_path, vectors, timeout, reconnect)
    conn = _handshake_sync(path, timeout, vectors, HANDSHAKE_QUIET)
    return _make_peer(conn, timeout, vectors, reconnect)


async def connect_async(
    socket_path: str | os.PathLike[str] = "/tmp/ivshmem_socket",
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    vectors: int | None = None,
    reconnect: bool = False,
) -> Peer:
    """Asyncio variant of :func:`connect` (the handshake does not block the event loop)."""
    path, vectors, timeout, reconnect = _check_args(socket_path, vectors, timeout, reconnect)
    conn = await _handshake_async(path, timeout, vectors, HANDSHAKE_QUIET)
    return _make_peer(conn, timeout, vectors, reconnect)


def _make_peer(
    conn: _Connection, timeout: float | None, vectors: int | None, reconnect: bool
) -> Peer:
    try:
        region = _Region(conn.take_shm())
    except BaseException:
        conn.close()
        raise
    peer = Peer(
        conn,
        region,
        timeout=timeout,
        vectors=vectors,
        reconnect=reconnect,
        quiet=HANDSHAKE_QUIET,
    )
    log.debug("connected to %s: %r", conn.path, peer)
    return peer

"""The ivshmem server: an asyncio loop around :class:`ivshmem.protocol.PeerTable`.

A drop-in replacement for QEMU's example ``ivshmem-server`` (same wire protocol, same flags
through :mod:`ivshmem.cli.server`), built to keep serving when clients misbehave:

* **Nothing blocks, nothing is dropped.** Every client has a queue of messages. A queue is
  flushed with non-blocking ``sendmsg`` calls, one 8-byte message (and at most one fd) at a
  time, until the kernel says the socket is full (EAGAIN); the loop then waits until the socket
  is writable. A client whose queue grows past a bound (its full handshake plus
  ``max_queue`` messages) is disconnected with a log line saying why -- it is never silently
  skipped, which is what QEMU's server does once a client's socket buffer is full.
* **Fd lifetimes.** A queued message may carry the eventfd of a peer that has left since. Every
  eventfd therefore lives in a :class:`SharedFd`, a reference-counted holder: the peer's table
  entry holds one reference and every queued message one more, and the fd is closed when the
  last goes. A number is never sent after it was closed (or reused by the kernel for another
  file), and every fd the server creates is inside a holder or a socket object from the moment
  it exists, so no error path leaks it.
* **One client's failure is that client's problem.** Accept errors (EMFILE included: accepting
  pauses with a back-off and resumes), a client that closes during its handshake, a client that
  sends bytes (a protocol violation that QEMU's server also answers with a disconnect), a
  client refused by the allow-list: each is logged and the server goes on.
* **Scale.** The default asyncio selector on Linux is epoll, so fds above 1023 are fine, and
  the soft fd limit is raised to the hard one at start.

Clients never send anything on the ivshmem socket, so the status query lives on a second Unix
socket (``status_socket``): connecting to it returns one JSON document (see
:meth:`Server.status`) and EOF. :func:`query_status` is the client side.

With ``format_region`` the server keeps the membership table of the channel layout
(:mod:`ivshmem.channel`) in the region: a peer is listed before its handshake is sent (so it
finds itself there at once) and unlisted when it leaves, also at shutdown; with
``membership_vector`` every other peer is rung on that vector after each join or leave has
been announced. Guests, which cannot learn membership from the device, read the table.
Membership observers (:class:`MembershipObserver`) are told about every join and leave after
the announcements are queued, for anything else that wants to follow membership.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import resource
import selectors
import signal
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .errors import ClosedError, IvshmemError, ServerConfigError, UsageError
from .memory import (
    Mapping,
    SharedMemory,
    format_size,
    round_up_power_of_two,
    validate_shm_name,
)
from .protocol import MAX_PEER_ID, MAX_VECTORS, PeerTable, Send, TableFullError, encode

if TYPE_CHECKING:
    from .channel import MembershipWriter

__all__ = [
    "BACKINGS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_SHM_NAME",
    "DEFAULT_SIZE",
    "DEFAULT_SOCKET_PATH",
    "MembershipObserver",
    "Server",
    "ServerConfig",
    "SharedFd",
    "query_status",
    "raise_fd_limit",
    "run",
    "sd_notify",
    "status_path_for",
]

log = logging.getLogger("ivshmem.server")

DEFAULT_SOCKET_PATH = "/tmp/ivshmem_socket"
DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_SIZE = 4 << 20
#: Messages a client may have queued beyond one full handshake before it is disconnected.
#: Generous: a client must fall behind by this many join/leave messages (thousands of peers
#: coming and going) while not reading at all. Each queued message costs ~100 bytes of server
#: memory, and one with an fd may keep a departed peer's eventfd open until it is sent.
DEFAULT_MAX_QUEUE = 16384
#: ``backing`` values: POSIX shm object (``-M``), unlinked file in a directory (``-m``),
#: anonymous memfd (``--memfd``), named file (``--file``; survives restarts).
BACKINGS = ("posix", "directory", "memfd", "file")
#: QEMU's server tries doubling sizes up to this when ftruncate fails in a directory backing
#: (hugetlbfs only accepts multiples of its page size); so do we.
_MAX_HUGEPAGE_SIZE = 1 << 30
#: Linux's sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
#: SO_PEERGROUPS (Linux >= 4.13, include/uapi/asm-generic/socket.h); not in Python's socket.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_CREDS = struct.Struct("3i")
_FD = struct.Struct("i")
_MSG_NOSIGNAL = socket.MSG_NOSIGNAL
_ACCEPT_BURST = 64
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
#: Retry delay after ETOOMANYREFS (too many fds in flight for this user; not for root).
_INFLIGHT_RETRY = 0.01


def status_path_for(socket_path: str) -> str:
    """The default status socket of a server listening on ``socket_path``."""
    return socket_path + ".status"


# --------------------------------------------------------------------------------------------
# Fd ownership


class SharedFd:
    """An fd shared by a peer table entry and the queued messages that carry it.

    Created with one reference (the creator's). :meth:`acquire` adds one, :meth:`release`
    drops one and closes the fd at zero; after that :meth:`fileno` raises, so a closed (and
    possibly reused) number is never handed to the kernel again.
    """

    __slots__ = ("_ancillary", "_close", "_fd", "_refs")

    def __init__(self, fd: int, close: Callable[[int], None] = os.close) -> None:
        self._fd = fd
        self._refs = 1
        self._close = close
        self._ancillary: list[tuple[int, int, bytes]] | None = None

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError("this fd was already closed")
        return self._fd

    def ancillary(self) -> list[tuple[int, int, bytes]]:
        """The SCM_RIGHTS control message for ``sendmsg`` (built once: this is the hot path
        of every handshake)."""
        if self._fd < 0:
            raise ClosedError("this fd was already closed")
        if self._ancillary is None:
            self._ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(self._fd))]
        return self._ancillary

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def refs(self) -> int:
        return self._refs

    def acquire(self) -> SharedFd:
        if self._refs <= 0:
            raise ClosedError("cannot take a reference to a closed fd")
        self._refs += 1
        return self

    def release(self) -> None:
        if self._refs <= 0:
            return
        self._refs -= 1
        if self._refs == 0:
            fd, self._fd = self._fd, -1
            self._ancillary = None
            with contextlib.suppress(OSError):
                self._close(fd)

    def __repr__(self) -> str:
        return f"<SharedFd fd={self._fd} refs={self._refs}>"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ServerConfig:
    """What to serve and how. Paths are used as given; the CLI makes them absolute."""

    socket_path: str = DEFAULT_SOCKET_PATH
    backing: str = "posix"
    #: The POSIX shm name (posix), directory (directory) or file path (file); unused for memfd.
    shm_path: str = DEFAULT_SHM_NAME
    #: Requested size; rounded up to a power of two (as QEMU's server does) by :meth:`Server.open`.
    size: int = DEFAULT_SIZE
    vectors: int = 1
    #: Permissions of the socket, the status socket and any named shared-memory file.
    mode: int = 0o600
    #: Group given to those files (None: the server's own).
    group: int | None = None
    #: If either is non-empty, only clients whose uid (or primary or supplementary gid) is
    #: listed, or who run as the server's own uid, are served.
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    #: Where the JSON status is served; None disables it.
    status_socket: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    #: Where id allocation starts (0 like QEMU; other values exist to test wrap-around).
    first_id: int = 0
    pidfile: str | None = None
    #: Keep a membership table in the region (``ivshmem.channel`` layout): the region is
    #: formatted at start unless it already is (a restarted server with a named backing).
    format_region: bool = False
    #: Membership slots when the region is formatted here.
    max_peers: int = 16
    #: With ``format_region``: ring this vector on every peer when one joins or leaves.
    membership_vector: int | None = None

    def validate(self) -> None:
        if self.backing not in BACKINGS:
            raise ServerConfigError(
                f"unknown backing {self.backing!r}: choose one of {', '.join(BACKINGS)}"
            )
        if not 1 <= self.vectors <= MAX_VECTORS:
            raise ServerConfigError(
                f"{self.vectors} vectors per peer is out of range: use 1..{MAX_VECTORS}"
            )
        if self.size <= 0:
            raise ServerConfigError(f"size {self.size} must be greater than zero")
        if not 0 <= self.first_id <= MAX_PEER_ID:
            raise ServerConfigError(f"first id {self.first_id} is out of range 0..{MAX_PEER_ID}")
        if self.max_queue < 1:
            raise ServerConfigError(f"max queue {self.max_queue} must be at least 1")
        if not 0 <= self.mode <= 0o777:
            raise ServerConfigError(f"mode {self.mode:o} is not a permission mode (0..777)")
        if self.backing == "posix":
            try:
                validate_shm_name(self.shm_path)
            except UsageError as err:
                raise ServerConfigError(str(err)) from None
        for path in (self.socket_path, self.status_socket):
            if path is not None and len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise ServerConfigError(
                    f"socket path {path!r} is longer than {_MAX_SOCKET_PATH} bytes, the most "
                    "a Unix socket address holds: choose a shorter path"
                )
        if self.status_socket is not None and self.status_socket == self.socket_path:
            raise ServerConfigError("the status socket must differ from the ivshmem socket")
        if self.membership_vector is not None:
            if not self.format_region:
                raise ServerConfigError(
                    "a membership vector needs the membership table: add --format"
                )
            if not 0 <= self.membership_vector < self.vectors:
                raise ServerConfigError(
                    f"membership vector {self.membership_vector} does not exist: peers have "
                    f"{self.vectors} vector(s), numbered 0..{self.vectors - 1} (raise -n)"
                )


def parse_uid(text: str) -> int:
    """A uid from a number or a user name."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ServerConfigError(
            f"unknown user {text!r}: give a user name or a numeric uid"
        ) from None


def parse_gid(text: str) -> int:
    """A gid from a number or a group name."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ServerConfigError(
            f"unknown group {text!r}: give a group name or a numeric gid"
        ) from None


# --------------------------------------------------------------------------------------------
# Small OS helpers


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the (old, new) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # setrlimit refuses more than fs.nr_open.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, err)
    return soft, soft


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd's $NOTIFY_SOCKET, if there is one.

    Returns whether it was sent. Never raises: readiness notification must not stop a server
    that is otherwise fine."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.warning("cannot notify systemd at %r: %s", os.environ["NOTIFY_SOCKET"], err)
        return False
    return True


def _listening_unix_paths() -> set[str] | None:
    """Paths of the listening Unix sockets in this network namespace (None if unknown)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    paths = set()
    for line in lines:
        parts = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON = 0x10000.
        if len(parts) == 8 and int(parts[3], 16) & 0x10000:
            paths.add(parts[7])
    return paths


def _claim_socket_path(path: str) -> None:
    """Make ``path`` free for bind(): refuse if a live server listens there, remove a stale
    socket file, refuse to remove anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise ServerConfigError(f"cannot check socket path {path!r}: {err.strerror}") from err
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerConfigError(
            f"{path!r} exists and is not a socket: remove it or choose another path"
        )
    # /proc/net/unix tells without connecting. Connecting to a live ivshmem server would make
    # it admit (and then drop) a phantom peer, which every connected VM would see.
    listening = _listening_unix_paths()
    live = listening is not None and path in listening
    if not live:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(2.0)
            probe.connect(path)
            live = True
        except (ConnectionRefusedError, FileNotFoundError):
            live = False
        except OSError as err:
            raise ServerConfigError(
                f"cannot tell whether {path!r} belongs to a running server: {err.strerror}"
            ) from err
        finally:
            probe.close()
    if live:
        raise ServerConfigError(
            f"socket {path!r} is in use by a running server: stop it first, or choose "
            "another path with -S"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ServerConfigError(
            f"cannot remove stale socket {path!r}: {err.strerror}; remove it by hand"
        ) from err
    log.info("removed stale socket %s (no server was listening on it)", path)


def _listen(path: str, mode: int, group: int | None, backlog: int) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` with ``mode``/``group``."""
    _claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # bind() creates the file with 0777 & ~umask; a umask that leaves only the owner bits
        # closes the window in which another user could connect before chmod() runs.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ServerConfigError(
                f"cannot set group/mode of socket {path!r}: {err.strerror}"
            ) from err
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        directory = os.path.dirname(path) or "."
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ServerConfigError(
                f"cannot create socket {path!r}: directory {directory!r} is not writable "
                f"({err.strerror}); choose another path with -S"
            ) from err
        if err.errno == errno.ENOENT:
            raise ServerConfigError(
                f"cannot create socket {path!r}: directory {directory!r} does not exist"
            ) from err
        raise ServerConfigError(f"cannot listen on {path!r}: {err.strerror}") from err
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = _CREDS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    )
    return pid, uid, gid


def _peer_groups(sock: socket.socket) -> set[int]:
    """Supplementary groups of the connecting process (empty if the kernel cannot say)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 4096)
    except OSError:
        return set()
    count = len(raw) // 4
    return set(struct.unpack(f"{count}I", raw[: count * 4]))


def _open_fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


# --------------------------------------------------------------------------------------------
# The server


class MembershipObserver(Protocol):
    """Told about membership changes, after the protocol announcements are queued."""

    def on_join(self, server: Server, peer: int) -> None: ...

    def on_leave(self, server: Server, peer: int) -> None: ...


class _Client:
    """One connected peer: its socket, its queue, and what the status report shows."""

    __slots__ = (
        "closed",
        "connected_at",
        "dirty",
        "fd",
        "gid",
        "overflowed",
        "partial",
        "peer",
        "pid",
        "queue",
        "sent",
        "sock",
        "uid",
        "writing",
    )

    def __init__(self, sock: socket.socket, peer: int, creds: tuple[int, int, int]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pid, self.uid, self.gid = creds
        self.queue: deque[tuple[int, SharedFd | None]] = deque()
        #: Unsent tail of a message the kernel took only part of (its fd went with byte 0).
        self.partial = b""
        self.sent = 0
        self.connected_at = time.monotonic()
        self.closed = False
        self.dirty = False  # in the server's to-flush list
        self.writing = False  # registered with add_writer
        self.overflowed = False

    def describe(self) -> str:
        return f"peer {self.peer} (pid {self.pid}, uid {self.uid})"


@dataclass
class _Counters:
    joins: int = 0
    leaves: int = 0
    messages_sent: int = 0
    clients_refused: int = 0
    slow_clients_dropped: int = 0
    clients_sent_data: int = 0
    accept_errors: int = 0
    status_queries: int = 0


@dataclass
class _Tasks:
    status: set[asyncio.Task[None]] = field(default_factory=set)


class Server:
    """The ivshmem server. :meth:`open` (synchronous) creates the shared memory and the
    listening sockets -- every configuration error surfaces there, before daemonizing --
    and :meth:`serve` runs until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.observers: list[MembershipObserver] = []
        self._shm: SharedMemory | None = None
        self._shm_ref: SharedFd | None = None
        self._table: PeerTable[SharedFd] | None = None
        self._listener: socket.socket | None = None
        self._status_listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._dirty: list[_Client] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._accept_paused = False
        #: Accepted clients waiting for fds to create their eventfds.
        self._parked: deque[tuple[socket.socket, tuple[int, int, int]]] = deque()
        self._backoff = _BACKOFF_MIN
        self._starved = False  # in a shortage of fds (warned about once)
        self._started = time.monotonic()
        self._counters = _Counters()
        self._tasks = _Tasks()
        self._closed = False
        self._stop_requested = False
        #: (st_dev, st_ino) of each socket file we bound, to remove only our own at exit.
        self._bound: dict[str, tuple[int, int]] = {}
        self.size = 0
        #: With ``format_region``: the server's mapping of the region and its table writer.
        self._region_map: Mapping | None = None
        self._membership: MembershipWriter | None = None

    # -- setup --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the shared memory and listening sockets. Raises IvshmemError subclasses
        with a message saying what to change; on error nothing is left behind."""
        if self._listener is not None:
            return
        old, new = raise_fd_limit()
        if new != old:
            log.debug("raised the open-file limit from %d to %d", old, new)
        try:
            # Sockets first: their failures are the common ones (path in use, directory not
            # writable) and undoing them is exact, while a new /dev/shm object is not ours
            # to remove once it may hold someone's data.
            cfg = self.config
            self._listener = self._listen(cfg.socket_path, socket.SOMAXCONN)
            if cfg.status_socket is not None:
                self._status_listener = self._listen(cfg.status_socket, 16)
            self._open_shm()
            if cfg.format_region:
                self._open_membership()
        except BaseException:
            self.close()
            raise
        assert self._shm is not None
        shm = self._shm
        log.info(
            "serving %s shared memory (%s%s) with %d vector(s) per peer on %s",
            format_size(self.size),
            shm.kind,
            f" {shm.path or cfg.shm_path}" if shm.kind != "memfd" else "",
            cfg.vectors,
            cfg.socket_path,
        )

    def _open_membership(self) -> None:
        """Map the region and take the membership table's writer role, formatting the
        region first unless it already carries the layout (kept across a restart)."""
        from .channel import MembershipWriter, format_region, is_formatted

        assert self._shm is not None
        self._region_map = self._shm.map()
        memory = self._region_map.memory
        if is_formatted(memory):
            log.info("the region is already formatted: keeping its layout and content")
        else:
            format_region(memory, max_peers=self.config.max_peers)
            log.info("formatted the region for %d peers", self.config.max_peers)
        self._membership = MembershipWriter(memory)

    def _membership_joined(self, peer: int) -> None:
        if self._membership is None:
            return
        try:
            self._membership.joined(peer, self.config.vectors)
        except IvshmemError as err:  # e.g. every slot taken: the peer still gets doorbells
            log.warning("peer %d is not in the membership table: %s", peer, err)

    def _membership_changed(self, peer: int) -> None:
        """Ring the membership vector of every peer but ``peer`` (who joined or left)."""
        vector = self.config.membership_vector
        if vector is None or self._table is None:
            return
        for other in list(self._table):
            if other != peer:
                self.ring(other, vector)

    def _listen(self, path: str, backlog: int) -> socket.socket:
        sock = _listen(path, self.config.mode, self.config.group, backlog)
        st = os.lstat(path)
        self._bound[path] = (st.st_dev, st.st_ino)
        return sock

    def _open_shm(self) -> None:
        cfg = self.config
        size = round_up_power_of_two(cfg.size)
        if size != cfg.size:
            log.info(
                "size %s (%d bytes) rounded up to %s, the next power of two (QEMU sizes the "
                "BAR as a power of two)",
                format_size(cfg.size),
                cfg.size,
                format_size(size),
            )
        shm: SharedMemory
        created = cfg.backing in ("posix", "file") and not os.path.exists(self._shm_file())
        if cfg.backing == "memfd":
            shm = SharedMemory.memfd(size, "ivshmem")
        elif cfg.backing == "posix":
            shm = SharedMemory.posix(cfg.shm_path, size, cfg.mode)
        elif cfg.backing == "file":
            shm = SharedMemory.file(cfg.shm_path, size, cfg.mode)
        else:
            shm = self._open_in_directory(size)
        try:
            if shm.kind in ("posix", "file"):
                self._set_file_permissions(shm)
        except BaseException:
            if created:
                shm.unlink()
            shm.close()
            raise
        self.size = shm.size
        self._shm = shm
        self._shm_ref = SharedFd(shm.fd, close=lambda _fd: shm.close())
        self._table = PeerTable(self._shm_ref, first_id=cfg.first_id)

    def _shm_file(self) -> str:
        cfg = self.config
        if cfg.backing == "posix":
            return os.path.join("/dev/shm", validate_shm_name(cfg.shm_path))
        return cfg.shm_path

    def _open_in_directory(self, size: int) -> SharedMemory:
        directory = self.config.shm_path
        attempt = size
        while True:
            try:
                return SharedMemory.in_directory(directory, attempt)
            except UsageError as err:
                cause = err.__cause__
                # hugetlbfs rejects sizes that are not multiples of its page size (EINVAL):
                # QEMU's server then tries the next powers of two up to 1 GiB; so do we.
                if not (
                    isinstance(cause, OSError)
                    and cause.errno == errno.EINVAL
                    and attempt < _MAX_HUGEPAGE_SIZE
                ):
                    raise
                attempt *= 2
                log.info(
                    "%s cannot hold %s (%s); trying %s",
                    directory,
                    format_size(attempt // 2),
                    cause.strerror,
                    format_size(attempt),
                )

    def _set_file_permissions(self, shm: SharedMemory) -> None:
        cfg = self.config
        try:
            st = os.fstat(shm.fd)
            if cfg.group is not None and st.st_gid != cfg.group:
                os.fchown(shm.fd, -1, cfg.group)
            if stat.S_IMODE(st.st_mode) != cfg.mode:
                os.fchmod(shm.fd, cfg.mode)
        except PermissionError as err:
            # Someone else's existing object that we may read and write (as QEMU's server
            # would use it): serve it, but say that its permissions are not ours to set.
            log.warning(
                "shared memory %s belongs to uid %d: cannot set its group/mode (%s); it keeps "
                "mode %o",
                shm.path,
                st.st_uid,
                err.strerror,
                stat.S_IMODE(st.st_mode),
            )
        except OSError as err:
            raise ServerConfigError(
                f"cannot set group/mode of shared memory {shm.path!r}: {err.strerror}"
            ) from err

    # -- public state -------------------------------------------------------------------

    @property
    def shm(self) -> SharedMemory:
        """The shared memory (for observers that format or read the region)."""
        if self._shm is None or self._shm.closed:
            raise ClosedError("the server is not open")
        return self._shm

    @property
    def peers(self) -> frozenset[int]:
        return frozenset(self._clients)

    def ring(self, peer: int, vector: int) -> None:
        """Ring ``vector`` of ``peer`` (as if another peer wrote its doorbell)."""
        table = self._table
        if table is None or peer not in table:
            raise UsageError(f"peer {peer} is not connected")
        fds = table.vectors_of(peer)
        if not 0 <= vector < len(fds):
            raise UsageError(f"vector {vector} does not exist: peers have {len(fds)}")
        with contextlib.suppress(BlockingIOError):  # counter saturated: a ring is pending
            os.eventfd_write(fds[vector].fileno(), 1)

    def status(self) -> dict[str, Any]:
        """Everything an operator asks about, JSON-ready."""
        cfg = self.config
        now = time.monotonic()
        shm = self._shm
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        c = self._counters
        return {
            "server": {
                "version": __version__,
                "pid": os.getpid(),
                "socket": cfg.socket_path,
                "uptime_seconds": round(now - self._started, 3),
            },
            "shared_memory": {
                "backing": cfg.backing,
                "path": None if shm is None or cfg.backing == "memfd" else shm.path or cfg.shm_path,
                "size": self.size,
            },
            "vectors": cfg.vectors,
            "peers": [
                {
                    "id": cl.peer,
                    "pid": cl.pid,
                    "uid": cl.uid,
                    "gid": cl.gid,
                    "queued": len(cl.queue),
                    "sent": cl.sent,
                    "connected_seconds": round(now - cl.connected_at, 3),
                }
                for cl in sorted(self._clients.values(), key=lambda cl: cl.peer)
            ],
            "counters": {
                "peers": len(self._clients),
                "joins": c.joins,
                "leaves": c.leaves,
                "messages_sent": c.messages_sent,
                "messages_queued": sum(len(cl.queue) for cl in self._clients.values()),
                "clients_refused": c.clients_refused,
                "slow_clients_dropped": c.slow_clients_dropped,
                "clients_sent_data": c.clients_sent_data,
                "accept_errors": c.accept_errors,
                "status_queries": c.status_queries,
            },
            "membership": None
            if self._membership is None
            else {
                "generation": self._membership.generation,
                "listed": sorted(self._membership.peers),
                "vector": cfg.membership_vector,
            },
            "limits": {
                "max_queue": cfg.max_queue,
                "open_fds": _open_fd_count(),
                "fd_limit": soft,
                "accept_paused": self._accept_paused,
            },
        }

    # -- running ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until :meth:`stop` is called or SIGTERM/SIGINT arrives, then close."""
        self.open()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        installed: list[signal.Signals] = []
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(signum, self._on_signal, signum)
                    installed.append(signum)
                except (RuntimeError, ValueError):
                    pass  # not the main thread: the embedder handles signals
            assert self._listener is not None
            loop.add_reader(self._listener.fileno(), self._on_accept)
            if self._status_listener is not None:
                loop.add_reader(self._status_listener.fileno(), self._on_status_accept)
            sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {self.config.socket_path}")
            await self._stopping.wait()
        finally:
            sd_notify("STOPPING=1")
            # Close while our handlers are still installed: a second SIGTERM during
            # shutdown then changes nothing instead of killing a half-closed server.
            self.close()
            for signum in installed:
                loop.remove_signal_handler(signum)

    def stop(self) -> None:
        """Ask :meth:`serve` to finish; safe to call from any thread."""
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None:
            self._stop_requested = True  # serve() has not started yet: it returns at once
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            stopping.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)

    def _on_signal(self, signum: int) -> None:
        log.info("received signal %d: shutting down", signum)
        self.stop()

    def close(self) -> None:
        """Disconnect every client (which is how they learn the server is gone), remove the
        socket files and release the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if self._clients:
            log.info("closing %d client connection(s)", len(self._clients))
        for client in list(self._clients.values()):
            self._drop(client, announce=False)
        while self._parked:
            self._parked.popleft()[0].close()
        self._dirty.clear()
        for task in list(self._tasks.status):
            task.cancel()
        for listener, path in (
            (self._listener, self.config.socket_path),
            (self._status_listener, self.config.status_socket),
        ):
            if listener is None:
                continue
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(listener.fileno())
            if path is not None:
                self._remove_socket_file(path)
            listener.close()
        self._listener = self._status_listener = None
        self._membership = None
        if self._region_map is not None:
            self._region_map.close()
            self._region_map = None
        if self._shm_ref is not None:
            self._shm_ref.release()  # the server's reference; queued ones are gone already
            self._shm_ref = None
        elif self._shm is not None:
            self._shm.close()

    def _remove_socket_file(self, path: str) -> None:
        """Unlink ``path`` only if it is still the socket we bound: an operator may have
        removed ours and started another server there."""
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._bound.get(path):
                os.unlink(path)
        except OSError:
            pass

    # -- accepting ----------------------------------------------------------------------

    def _on_accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BURST):
            if self._accept_paused:
                return
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._counters.accept_errors += 1
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(err)
                    return
                if err.errno in (errno.ECONNABORTED, errno.EPROTO):
                    log.info("a client went away before it was accepted")
                    continue
                log.error("accept failed: %s; continuing", err)
                self._pause_accepting(err)
                return
            try:
                self._admit(conn)
            except Exception:
                # A bug or an unexpected OSError around one client must not stop the server.
                log.exception("unexpected error while admitting a client; dropping it")
                conn.close()

    def _pause_accepting(self, err: OSError) -> None:
        loop = self._loop
        if loop is None or self._listener is None or self._accept_paused:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Warn once per shortage, not at every retry of a server that sits at its limit.
        log.log(
            logging.DEBUG if self._starved else logging.WARNING,
            "cannot accept clients: %s (%d fds open, limit %d); pausing accept for %.2f s, "
            "waiting clients stay in the backlog",
            err.strerror,
            _open_fd_count(),
            soft,
            self._backoff,
        )
        self._starved = True
        loop.remove_reader(self._listener.fileno())
        self._accept_paused = True
        loop.call_later(self._backoff, self._resume_accepting)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _relieved(self) -> None:
        """An fd could be had again: end the shortage (and its back-off)."""
        self._backoff = _BACKOFF_MIN
        if self._starved:
            self._starved = False
            log.info("file descriptors are available again: serving new clients")

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._listener is None or self._loop is None or self._closed:
            return
        while self._parked:
            conn, creds = self._parked.popleft()
            if not self._join(conn, creds):
                # _join parked it again at the back; put it back in front to keep order.
                self._parked.appendleft(self._parked.pop())
                return
        self._loop.add_reader(self._listener.fileno(), self._on_accept)
        self._on_accept()

    def _allowed(self, conn: socket.socket, uid: int, gid: int) -> bool:
        cfg = self.config
        if not cfg.allow_uids and not cfg.allow_gids:
            return True
        if uid == os.geteuid() or uid in cfg.allow_uids:
            return True
        if not cfg.allow_gids:
            return False
        return gid in cfg.allow_gids or bool(_peer_groups(conn) & cfg.allow_gids)

    def _admit(self, conn: socket.socket) -> None:
        """Give a new connection an id and eventfds, queue its handshake and the announcements."""
        assert self._table is not None and self._loop is not None
        try:
            conn.setblocking(False)
            creds = _peer_credentials(conn)
        except OSError as err:
            log.info("a client went away while being accepted: %s", err.strerror)
            conn.close()
            return
        pid, uid, gid = creds
        log.debug("connection from pid %d uid %d gid %d", pid, uid, gid)
        if not self._allowed(conn, uid, gid):
            self._counters.clients_refused += 1
            log.warning("refused client pid %d uid %d gid %d: not in the allow-list", pid, uid, gid)
            conn.close()
            return
        self._join(conn, creds)

    def _join(self, conn: socket.socket, creds: tuple[int, int, int]) -> bool:
        """Make an accepted, allowed connection a peer. Returns False if it had to be parked
        because the fd limit is reached (it joins when fds are free again)."""
        assert self._table is not None and self._loop is not None
        pid, uid, _gid = creds
        holders: list[SharedFd] = []
        try:
            for _ in range(self.config.vectors):
                holders.append(SharedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)))
            peer = self._table.allocate_id()
        except OSError as err:
            for holder in holders:
                holder.release()
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                # Out of fds in the middle of a handshake: keep the accepted connection
                # waiting (it costs one fd, already spent) and stop accepting until fds
                # are free, rather than turning a transient limit into a failed client.
                self._parked.append((conn, creds))
                log.log(
                    logging.DEBUG if self._starved else logging.WARNING,
                    "client pid %d waits: cannot create its eventfds (%s)",
                    pid,
                    err.strerror,
                )
                self._pause_accepting(err)
                return False
            conn.close()
            self._counters.clients_refused += 1
            log.warning("cannot serve client pid %d: cannot create eventfds: %s", pid, err)
            return True
        except TableFullError as err:
            for holder in holders:
                holder.release()
            conn.close()
            self._counters.clients_refused += 1
            log.warning("cannot serve client pid %d: %s", pid, err)
            return True
        self._relieved()
        client = _Client(conn, peer, creds)
        self._clients[peer] = client
        # The table's entry owns the holders' first reference from here on.
        sends = self._table.join(peer, holders)
        self._counters.joins += 1
        self._loop.add_reader(client.fd, self._on_client_readable, client)
        log.info(
            "peer %d joined (pid %d, uid %d); %d peer(s) connected",
            peer,
            pid,
            uid,
            len(self._clients),
        )
        # Listed in the membership table before it is sent anything, so a peer that looks at
        # the table right after its handshake finds itself there.
        self._membership_joined(peer)
        self._dispatch(sends)
        self._membership_changed(peer)
        self._notify_observers("on_join", peer)
        return True

    # -- sending ------------------------------------------------------------------------

    def _queue_limit(self) -> int:
        assert self._table is not None
        # One full handshake (3 fixed messages, every peer's vectors and its own) always fits.
        return self.config.max_queue + 3 + self.config.vectors * len(self._table)

    def _dispatch(self, sends: Iterable[Send[SharedFd]]) -> None:
        limit = self._queue_limit()
        overflowed: list[_Client] = []
        clients = self._clients
        for send in sends:
            client = clients.get(send.recipient)
            if client is None or client.closed:
                continue
            client.queue.append((send.value, None if send.fd is None else send.fd.acquire()))
            if not client.dirty and not client.writing:
                client.dirty = True
                self._dirty.append(client)
            if len(client.queue) > limit and not client.overflowed:
                client.overflowed = True
                overflowed.append(client)
        for client in overflowed:
            self._counters.slow_clients_dropped += 1
            self._disconnect(
                client,
                f"disconnected: it is not reading; {len(client.queue)} messages queued for it "
                f"pass the bound of {limit} (one full handshake + --max-queue "
                f"{self.config.max_queue})",
                logging.WARNING,
            )
        if self._dirty and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        # Disconnects during flushing queue leave messages, which append to the list.
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for client in dirty:
                client.dirty = False
                if not client.closed:
                    self._flush(client)

    def _on_writable(self, client: _Client) -> None:
        if not client.closed:
            self._flush(client)
        if self._dirty and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_dirty)

    def _flush(self, client: _Client) -> None:
        """Send queued messages until the queue is empty or the socket is full."""
        sock = client.sock
        queue = client.queue
        sent = 0
        try:
            while client.partial or queue:
                if client.partial:
                    n = sock.send(client.partial, socket.MSG_NOSIGNAL)
                    client.partial = client.partial[n:]
                    continue
                value, holder = queue[0]
                data = encode(value)
                if holder is None:
                    n = sock.send(data, _MSG_NOSIGNAL)
                else:
                    # The queued reference keeps the fd open: its number cannot be a closed
                    # or reused one here.
                    n = sock.sendmsg([data], holder.ancillary(), _MSG_NOSIGNAL)
                queue.popleft()
                if holder is not None:
                    holder.release()
                sent += 1
                if n < len(data):
                    # Stream sockets may take part of a message; its fd went with byte 0.
                    client.partial = data[n:]
        except (BlockingIOError, InterruptedError):
            if not client.writing and self._loop is not None:
                log.debug(
                    "%s: socket full, %d message(s) wait in its queue",
                    client.describe(),
                    len(queue),
                )
                client.writing = True
                self._loop.add_writer(client.fd, self._on_writable, client)
            return
        except OSError as err:
            if err.errno in (errno.ETOOMANYREFS, errno.ENOBUFS, errno.ENOMEM):
                # Transient, and not this client's fault. ETOOMANYREFS: too many fds in
                # flight for this (unprivileged) user -- the kernel counts fds sitting in
                # every receive queue against RLIMIT_NOFILE, and they drain as clients read.
                # ENOBUFS/ENOMEM: memory pressure. Retry shortly rather than drop anything.
                log.debug("%s: sending deferred: %s", client.describe(), err.strerror)
                if self._loop is not None and not client.writing:
                    self._loop.call_later(_INFLIGHT_RETRY, self._retry_flush, client)
                return
            self._disconnect(
                client, f"went away while messages were queued for it ({err.strerror})"
            )
            return
        finally:
            client.sent += sent
            self._counters.messages_sent += sent
        if client.writing and self._loop is not None:
            client.writing = False
            self._loop.remove_writer(client.fd)

    def _retry_flush(self, client: _Client) -> None:
        if not client.closed:
            self._flush(client)

    # -- leaving ------------------------------------------------------------------------

    def _on_client_readable(self, client: _Client) -> None:
        if client.closed:
            return
        try:
            data = client.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._disconnect(client, f"connection broke ({err.strerror})")
            return
        if data:
            # Clients never send in protocol version 0; QEMU's server treats any input as a
            # disconnect, and a client that writes is confused or hostile either way.
            self._counters.clients_sent_data += 1
            self._disconnect(
                client,
                "sent data, which ivshmem clients never do: disconnected",
                logging.WARNING,
            )
        else:
            self._disconnect(client, "left")

    def _disconnect(self, client: _Client, reason: str, level: int = logging.INFO) -> None:
        if client.closed:
            return
        log.log(level, "%s %s", client.describe(), reason)
        self._drop(client, announce=True)

    def _drop(self, client: _Client, announce: bool) -> None:
        """Close a client, release its queue and table entry and (if ``announce``) queue the
        leave message to everyone else."""
        if client.closed:
            return
        client.closed = True
        loop = self._loop
        if loop is not None:
            loop.remove_reader(client.fd)
            if client.writing:
                loop.remove_writer(client.fd)
        client.writing = False
        client.sock.close()
        while client.queue:
            _value, holder = client.queue.popleft()
            if holder is not None:
                holder.release()
        self._clients.pop(client.peer, None)
        table = self._table
        if table is None or client.peer not in table:
            return
        fds, sends = table.leave(client.peer)
        for holder in fds:
            holder.release()
        self._counters.leaves += 1
        if self._membership is not None:
            # Also at shutdown (announce=False): the table must not list peers of a server
            # that is gone.
            self._membership.left(client.peer)
        if announce:
            self._dispatch(sends)
            self._membership_changed(client.peer)
            self._notify_observers("on_leave", client.peer)

    def _notify_observers(self, method: str, peer: int) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, method)(self, peer)
            except Exception:
                log.exception("membership observer %r failed in %s(%d)", observer, method, peer)

    # -- status socket ------------------------------------------------------------------

    def _on_status_accept(self) -> None:
        listener = self._status_listener
        if listener is None or self._loop is None:
            return
        for _ in range(_ACCEPT_BURST):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning(
                    "status socket: accept failed: %s; retrying in %.1f s", err.strerror, 0.5
                )
                # A level-triggered reader on a backlog we cannot accept from would spin.
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(0.5, self._resume_status)
                return
            self._counters.status_queries += 1
            try:
                conn.setblocking(False)
                body = (json.dumps(self.status(), indent=1) + "\n").encode()
            except Exception:
                log.exception("cannot build the status report")
                conn.close()
                continue
            task = self._loop.create_task(self._send_status(conn, body))
            self._tasks.status.add(task)
            task.add_done_callback(self._tasks.status.discard)

    def _resume_status(self) -> None:
        if self._status_listener is not None and self._loop is not None and not self._closed:
            self._loop.add_reader(self._status_listener.fileno(), self._on_status_accept)

    async def _send_status(self, conn: socket.socket, body: bytes) -> None:
        assert self._loop is not None
        try:
            await asyncio.wait_for(self._loop.sock_sendall(conn, body), timeout=10.0)
        except (OSError, asyncio.TimeoutError) as err:
            log.info("status reader went away: %s", err)
        finally:
            conn.close()


def run(server: Server) -> None:
    """Run ``server`` on a new epoll-based event loop until it stops."""
    # asyncio's default on Linux is epoll already; being explicit documents that select()
    # (and its 1024-fd ceiling, which QEMU's server hits) is never used.
    loop = asyncio.SelectorEventLoop(selectors.EpollSelector())
    try:
        loop.run_until_complete(server.serve())
    finally:
        loop.close()


def query_status(status_socket: str, timeout: float = 10.0) -> dict[str, Any]:
    """Read the JSON status from a running server's status socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(status_socket)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as err:
        raise ServerConfigError(
            f"cannot read the status of the server at {status_socket!r}: {err.strerror or err}"
        ) from err
    finally:
        sock.close()
    try:
        result = json.loads(b"".join(chunks))
    except ValueError as err:
        raise IvshmemError(f"{status_socket!r} did not answer with a JSON status") from err
    if not isinstance(result, dict):
        raise IvshmemError(f"{status_socket!r} did not answer with a JSON object")
    return result

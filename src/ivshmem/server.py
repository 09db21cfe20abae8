"""The ivshmem server: an asyncio loop around :class:`ivshmem.protocol.PeerTable`.

A drop-in replacement for QEMU's example ``ivshmem-server`` (same wire protocol, same flags
through :mod:`ivshmem.cli.server`), built to keep serving when clients misbehave:

* **Nothing blocks, nothing is dropped.** Every client has a queue of messages. A queue is
  flushed with non-blocking ``sendmsg`` calls, one 8-byte message (and at most one fd) at a
  time, until the kernel says the socket is full (EAGAIN); the loop then waits until the socket
  is writable. A client whose queue grows past a bound (its full handshake plus
  ``max_queue`` messages) is disconnected with a log line saying why -- it is never silently
  skipped, which is what QEMU's server does once a client's socket buffer is full. All queues
  together are bounded too (``max_queued_total``): past it, the longest queues go first.
* **Fds in flight.** The kernel counts every fd sent but not yet received against the sending
  user's open-file limit and refuses more (ETOOMANYREFS) past it, for every client at once.
  Clients that do not read can fill that budget; the server then warns once, retries with a
  back-off, and disconnects the clients that hold the most unread messages and read none of
  them, largest first (their unread fds are returned once their process reads or closes).
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
import fcntl
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
from typing import Any, Protocol

from . import __version__
from .errors import ClosedError, IvshmemError, ServerConfigError, UsageError
from .memory import (
    SharedMemory,
    ShrinkRefusedError,
    format_size,
    posix_shm_path,
    round_up_power_of_two,
    validate_shm_name,
)
from .protocol import MAX_PEER_ID, MAX_VECTORS, PeerTable, Send, TableFullError, encode
from .regionguard import CHECK_INTERVAL, RegionGuard, RegionMembership, ring_eventfd

__all__ = [
    "BACKINGS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_QUEUED_TOTAL",
    "DEFAULT_SHM_NAME",
    "DEFAULT_SIZE",
    "DEFAULT_SOCKET_PATH",
    "QEMU_MAX_VECTORS",
    "MembershipObserver",
    "Server",
    "ServerConfig",
    "SharedFd",
    "client_allowed",
    "peer_credentials",
    "peer_groups",
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
#: coming and going) while not reading at all. Each queued message costs about 16 bytes of
#: server memory, and one with an fd may keep a departed peer's eventfd open until it is sent.
DEFAULT_MAX_QUEUE = 16384
#: Messages queued for all clients together before the longest queues are cut. At about 16
#: bytes each (measured: two deque slots) the default bounds them near 128 MiB. A join queues
#: its handshake (3 + vectors x peers) and one message per vector to every other peer, so N
#: peers that all join at once and read slowly need up to vectors x N^2: 1000 peers with 4
#: vectors joining as fast as they can (benchmarks/bench_join.py) peak at 3.7 million.
DEFAULT_MAX_QUEUED_TOTAL = 1 << 23
#: The largest uid or gid: they are 32-bit, and (uid_t)-1 means "no id" (chown's "keep").
MAX_ID = (1 << 32) - 2
#: QEMU's ivshmem device refuses more vectors than this (hw/misc/ivshmem.c).
QEMU_MAX_VECTORS = 64
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
#: First retry after the kernel refused to pass fds (ETOOMANYREFS) or lacked memory; doubled
#: up to _BACKOFF_MAX while it lasts.
_SEND_RETRY_MIN = 0.01
#: A client that read nothing for this long while sends were stalled counts as not reading.
_STALL_GRACE = 1.0
_SIOCOUTQ = 0x5411  # TIOCOUTQ (asm-generic/ioctls.h): bytes sent but not yet read by the peer


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
    #: Messages queued for all clients together before the longest queues are disconnected.
    max_queued_total: int = DEFAULT_MAX_QUEUED_TOTAL
    #: Where id allocation starts (0 like QEMU; other values exist to test wrap-around).
    first_id: int = 0
    pidfile: str | None = None
    #: Keep a membership table in the region (``ivshmem.channel`` layout): the region is
    #: formatted at start unless it already is (a restarted server with a named backing).
    format_region: bool = False
    #: Format the region even if it already carries a layout (erasing every channel in it).
    reformat: bool = False
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
        # [region branch] user and group ids are 32-bit, and (uid_t)-1 means "no id".
        for option, kind, ids in (
            ("--group", "gid", () if self.group is None else (self.group,)),
            ("--allow-uid", "uid", self.allow_uids),
            ("--allow-gid", "gid", self.allow_gids),
        ):
            for value in sorted(ids):
                if not 0 <= value <= MAX_ID:
                    raise ServerConfigError(
                        f"{option}: {kind} {value} is out of range: user and group ids are "
                        f'0..{MAX_ID} ({MAX_ID + 1} is the kernel\'s "no id")'
                    )
        if self.max_queue < 1:
            raise ServerConfigError(f"max queue {self.max_queue} must be at least 1")
        if self.max_queued_total < 1:
            raise ServerConfigError(f"max queued total {self.max_queued_total} must be at least 1")
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
        if self.reformat and not self.format_region:
            raise ServerConfigError("--reformat formats the region: it needs --format")
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
            reason = err.strerror if isinstance(err, OSError) else err
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, reason)
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
        log.warning("cannot notify systemd at %r: %s", os.environ["NOTIFY_SOCKET"], err.strerror)
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


def _is_listening(path: str, st: os.stat_result, listening: set[str]) -> bool:
    """Whether the socket file ``path`` (``st``: its lstat) is one of ``listening``.

    The table lists paths as they were given to bind(), so the same socket may be listed
    under another spelling (a symlinked directory, a bind mount, a relative path): compare
    the files themselves, not their names."""
    if path in listening:
        return True
    for other in listening:
        if not other.startswith("/"):
            continue  # abstract (@...) or relative to a cwd we do not know
        try:
            ost = os.stat(other, follow_symlinks=False)
        except OSError:
            continue
        if (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _claim_socket_path(path: str, option: str = "-S") -> None:
    """Make ``path`` free for bind(): refuse if a live server listens there, remove a stale
    socket file, refuse to remove anything that is not a socket. ``option`` is the flag that
    chose the path, for the messages."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise ServerConfigError(f"cannot check socket path {path!r}: {err.strerror}") from err
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerConfigError(
            f"{path!r} exists and is not a socket: remove it or choose another path with {option}"
        )
    # /proc/net/unix tells without connecting. Connecting to a live ivshmem server would make
    # it admit (and then drop) a phantom peer, which every connected VM would see.
    listening = _listening_unix_paths()
    live = listening is not None and _is_listening(path, st, listening)
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
            f"another path with {option}"
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


def _listen(
    path: str, mode: int, group: int | None, backlog: int, option: str = "-S"
) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` with ``mode``/``group``."""
    _claim_socket_path(path, option)
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
                f"({err.strerror}); choose another path with {option}"
            ) from err
        if err.errno == errno.ENOENT:
            raise ServerConfigError(
                f"cannot create socket {path!r}: directory {directory!r} does not exist; "
                f"create it, or choose another path with {option}"
            ) from err
        raise ServerConfigError(f"cannot listen on {path!r}: {err.strerror}") from err
    except BaseException:
        sock.close()
        raise
    return sock


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock`` (SO_PEERCRED)."""
    pid, uid, gid = _CREDS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    )
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> set[int]:
    """Supplementary groups of the process that connected ``sock`` (SO_PEERGROUPS; empty if
    the kernel cannot say)."""
    try:
        # Python's getsockopt() takes at most 1024 bytes: 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError as err:
        if err.errno != errno.ERANGE:
            return set()
        # More groups than that: the kernel's list is out of reach, read the process's own.
        # Its pid could in principle be reused, but not while it holds this connection open.
        return _proc_groups(peer_credentials(sock)[0])
    count = len(raw) // 4
    return set(struct.unpack(f"{count}I", raw[: count * 4]))


def _proc_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(gid) for gid in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def client_allowed(
    config: ServerConfig,
    uid: int,
    gid: int,
    groups: Callable[[], set[int]],
    server_uid: int | None = None,
) -> bool:
    """Whether the allow-list of ``config`` admits a client running as ``uid``/``gid``.

    ``groups`` returns the client's supplementary groups; it is called only when they
    decide. The server's own user (``server_uid``, default the effective uid) is always
    admitted: it could open the memory itself anyway."""
    if not config.allow_uids and not config.allow_gids:
        return True
    if uid == (os.geteuid() if server_uid is None else server_uid) or uid in config.allow_uids:
        return True
    if not config.allow_gids:
        return False
    return gid in config.allow_gids or bool(groups() & config.allow_gids)


def _open_fd_count() -> int:
    """Open fds of this process; raises OSError (EMFILE when there is none to spare)."""
    # The listing's own directory fd is in the listing.
    return len(os.listdir("/proc/self/fd")) - 1


def _message_truesize() -> int:
    """What one 8-byte message costs in a peer's receive queue, as SIOCOUTQ reports it.

    Unix stream sockets charge each unread message (one sendmsg each) to the sender at its
    kernel allocation size, a few hundred bytes that depend on the kernel; dividing SIOCOUTQ
    by it turns bytes into unread messages. 1 if it cannot be measured (unread counts are
    then in bytes, which still ranks clients correctly)."""
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return 1
    with a, b:
        try:
            a.send(encode(0))
            return max(1, _outq(a.fileno()))
        except OSError:
            return 1


def _outq(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0"))[0])


# --------------------------------------------------------------------------------------------
# The server


class MembershipObserver(Protocol):
    """Told about membership changes, after the protocol announcements are queued."""

    def on_join(self, server: Server, peer: int) -> None: ...

    def on_leave(self, server: Server, peer: int) -> None: ...


class _Client:
    """One connected peer: its socket, its queue, and what the status report shows."""

    __slots__ = (
        "blocked",
        "closed",
        "connected_at",
        "dirty",
        "fd",
        "fds",
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
        # The queue: message values, and beside them the fd each carries (or None). Two
        # deques of references cost about 16 bytes a message where a deque of pairs costs 75,
        # and a join of N peers queues V x N messages for the newcomer alone.
        self.queue: deque[int] = deque()
        self.fds: deque[SharedFd | None] = deque()
        #: Unsent tail of a message the kernel took only part of (its fd went with byte 0).
        self.partial = b""
        self.sent = 0
        self.connected_at = time.monotonic()
        self.closed = False
        self.dirty = False  # in the server's to-flush list
        self.writing = False  # registered with add_writer
        self.blocked = False  # waiting for the kernel to take fds again (a send stall)
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
    #: Episodes in which the kernel would not pass fds (ETOOMANYREFS) or lacked memory.
    send_stalls: int = 0
    #: Clients disconnected in those episodes for holding unread messages and not reading.
    stalled_clients_dropped: int = 0
    #: Clients disconnected because all queues together passed max_queued_total.
    queue_budget_drops: int = 0
    #: Episodes in which the server ran out of fds (accept or eventfd creation failed).
    fd_shortages: int = 0


@dataclass
class _SendStall:
    """The kernel refuses to send (ETOOMANYREFS, ENOBUFS or ENOMEM) since ``started``."""

    errno: int
    started: float
    #: Per peer when last sampled (and when): its unread messages and its messages sent so
    #: far. Whatever was sent since is either still unread or was read: a client whose
    #: unread count grew by all of it, while it had some, read nothing.
    samples: dict[int, tuple[int, int]]
    sampled_at: float
    dropped: int = 0


@dataclass
class _Shortage:
    """The server is out of fds since ``started``."""

    started: float
    accept_failures: int = 0
    clients_waited: int = 0


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
        #: Messages in all clients' queues together (bounded by max_queued_total).
        self._queued_total = 0
        self._budget_check_scheduled = False
        #: Clients whose flushing waits for the kernel to take fds again, in stall order.
        self._blocked: list[_Client] = []
        self._stall: _SendStall | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_delay = _SEND_RETRY_MIN
        self._truesize = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._accept_paused = False
        #: Accepted clients waiting for fds to create their eventfds.
        self._parked: deque[tuple[socket.socket, tuple[int, int, int]]] = deque()
        self._backoff = _BACKOFF_MIN
        self._shortage: _Shortage | None = None
        #: An fd held in reserve (on /dev/null): closed when the server is out of fds, so it
        #: can still count its fds and answer a status query, and reopened afterwards.
        self._reserve = -1
        self._reserve_usable = True
        self._pidfile_written = False
        self._started = time.monotonic()
        self._counters = _Counters()
        self._tasks = _Tasks()
        self._closed = False
        self._stop_requested = False
        #: (st_dev, st_ino) of each socket file we bound, to remove only our own at exit.
        self._bound: dict[str, tuple[int, int]] = {}
        self.size = 0
        # [regionguard] The region's size guard (a no-op on a sealed memfd) and its timer;
        # with ``format_region`` the membership table, written so the server cannot fault.
        self._guard: RegionGuard | None = None
        self._region_timer: asyncio.TimerHandle | None = None
        self._membership: RegionMembership | None = None

    # -- setup --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the listening sockets, the pid file and the shared memory. Raises
        IvshmemError subclasses with a message saying what to change; on error nothing is
        left behind (a region this call created is removed again)."""
        if self._listener is not None:
            return
        cfg = self.config
        old, new = raise_fd_limit()
        if new != old:
            log.debug("raised the open-file limit from %d to %d", old, new)
        if cfg.vectors > QEMU_MAX_VECTORS:
            log.warning(
                "%d vectors per peer: QEMU's ivshmem-doorbell device refuses more than %d, so "
                "QEMU guests cannot connect to this server (host peers can); use -n %d or "
                "fewer for guests",
                cfg.vectors,
                QEMU_MAX_VECTORS,
                QEMU_MAX_VECTORS,
            )
        try:
            self._restore_reserve()
            self._truesize = _message_truesize()
            # Sockets first: their failures are the common ones (path in use, directory not
            # writable). Then the pid file, so that failing on it leaves no region behind.
            self._listener = self._listen(cfg.socket_path, socket.SOMAXCONN, "-S")
            if cfg.status_socket is not None:
                self._status_listener = self._listen(cfg.status_socket, 16, "--status-socket")
            if cfg.pidfile is not None:
                self._write_pidfile(cfg.pidfile)
            self._open_shm()
            if cfg.format_region:
                self._open_membership()
        except BaseException:
            self.close(discard=True)
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

    def _write_pidfile(self, path: str) -> None:
        # Written beside and renamed over: a reader never sees a partial pid. O_EXCL and
        # O_NOFOLLOW: the temporary name is predictable, and a link planted there by someone
        # else must not make a privileged server write through it.
        tmp = f"{path}.{os.getpid()}.tmp"
        created = False
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
            created = True
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as err:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise ServerConfigError(
                f"cannot write pid file {path!r}: {err.strerror}; choose a writable path with "
                "-p PATH, or run in the foreground with -F (which writes no pid file unless "
                "-p asks for one)"
            ) from err
        self._pidfile_written = True

    def _remove_pidfile(self) -> None:
        path = self.config.pidfile
        if not self._pidfile_written or path is None:
            return
        self._pidfile_written = False
        try:
            with open(path) as f:
                if f.read().strip() != str(os.getpid()):
                    return  # another server wrote it since
            os.unlink(path)
        except OSError:
            pass

    def _open_membership(self) -> None:
        """Take the membership table's writer role, formatting the region first unless it
        already carries the layout (kept across a restart)."""
        # [regionguard] Written with pwrite (or into a sealed region's mapping): see there.
        assert self._guard is not None and self._shm is not None
        self._membership = RegionMembership.open(
            self._guard, self._shm, max_peers=self.config.max_peers, reformat=self.config.reformat
        )

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

    def _listen(self, path: str, backlog: int, option: str) -> socket.socket:
        sock = _listen(path, self.config.mode, self.config.group, backlog, option)
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
        if cfg.format_region and not cfg.reformat and cfg.backing in ("posix", "file"):
            self._check_layout_fits(size)
        shm: SharedMemory
        try:
            if cfg.backing == "memfd":
                shm = SharedMemory.memfd(size, "ivshmem")
            elif cfg.backing == "posix":
                shm = SharedMemory.posix(
                    cfg.shm_path, size, cfg.mode, owner_uid=os.geteuid(), group=cfg.group
                )
            elif cfg.backing == "file":
                # Never through a symbolic link: a link planted at the path would make the
                # server resize and chmod whatever it points to.
                shm = SharedMemory.file(
                    cfg.shm_path,
                    size,
                    cfg.mode,
                    follow_symlinks=False,
                    owner_uid=os.geteuid(),
                    group=cfg.group,
                    pseudo_filesystems=False,  # [region branch] never /proc/self/mem
                )
            else:
                shm = self._open_in_directory(size)
        except ShrinkRefusedError as err:
            flag = "-M" if cfg.backing == "posix" else "--file"
            raise ServerConfigError(
                f"shared memory {err.path} ({flag}) is {format_size(err.current)}, larger than "
                f"the {format_size(err.requested)} asked for with -l: shrinking it would crash "
                "(SIGBUS) every process that still maps its end, such as a running VM or a "
                f"peer of an earlier server; start with -l {format_size(err.current)} or more, "
                f"or remove it first (rm {err.path}) if its content is not needed"
            ) from err
        if shm.previous_size is not None:
            log.info(
                "grew shared memory %s from %s to %s (its content is kept; processes that "
                "mapped it before see only the first %s)",
                shm.path,
                format_size(shm.previous_size),
                format_size(shm.size),
                format_size(shm.previous_size),
            )
        self.size = shm.size
        self._shm = shm
        self._guard = RegionGuard(shm)  # [regionguard]
        self._shm_ref = SharedFd(shm.fd, close=lambda _fd: shm.close())
        self._table = PeerTable(self._shm_ref, first_id=cfg.first_id)

    def _check_layout_fits(self, size: int) -> None:
        """Before a named region is grown: refuse to start if it carries a channel layout
        that growing it would make stale (the layout records the region's size), or one of
        another layout version, saying how to go on. Anything unusual about the file (missing,
        a link, not ours) is left to the opening code, which explains it."""
        from .channel.layout import LAYOUT_VERSION, PAGE, peek_header

        cfg = self.config
        path = cfg.shm_path if cfg.backing == "file" else posix_shm_path(cfg.shm_path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < PAGE:
                return
            header = peek_header(os.pread(fd, PAGE, 0))
        except OSError:
            return
        finally:
            os.close(fd)
        if header is None:
            return
        version, formatted, _ = header
        flag = "-M" if cfg.backing == "posix" else "--file"
        erase = "--reformat to lay it out afresh (this erases every channel in it)"
        if version != LAYOUT_VERSION:
            raise ServerConfigError(
                f"shared memory {path} ({flag}) carries a channel layout of version {version}; "
                f"this server writes version {LAYOUT_VERSION}: add {erase}, or run the "
                "version of this project that formatted it"
            )
        final = max(size, st.st_size)
        if formatted != final:
            raise ServerConfigError(
                f"shared memory {path} ({flag}) carries a channel layout for "
                f"{format_size(formatted)}, and would be {format_size(final)} with -l "
                f"{format_size(size)}: start with -l {format_size(formatted)} to keep its "
                f"channels, or add {erase}"
            )

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
        # [regionguard] Never blocks, even on an eventfd a peer made blocking and saturated.
        ring_eventfd(fds[vector].fileno())

    def status(self) -> dict[str, Any]:
        """Everything an operator asks about, JSON-ready."""
        return self._status(self._count_fds())

    def _status(self, open_fds: int) -> dict[str, Any]:
        cfg = self.config
        now = time.monotonic()
        shm = self._shm
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        c = self._counters
        clients = sorted(self._clients.values(), key=lambda cl: cl.peer)
        unread = {cl.peer: self._unread(cl) for cl in clients}
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
                # [regionguard]
                "sealed": self._guard is not None and self._guard.sealed,
                "size_restores": 0 if self._guard is None else self._guard.restores,
            },
            "vectors": cfg.vectors,
            "peers": [
                {
                    "id": cl.peer,
                    "pid": cl.pid,
                    "uid": cl.uid,
                    "gid": cl.gid,
                    "queued": len(cl.queue),
                    "unread": unread[cl.peer],
                    "sent": cl.sent,
                    "connected_seconds": round(now - cl.connected_at, 3),
                }
                for cl in clients
            ],
            "counters": {
                "peers": len(self._clients),
                "joins": c.joins,
                "leaves": c.leaves,
                "messages_sent": c.messages_sent,
                "messages_queued": self._queued_total,
                "messages_unread": sum(unread.values()),
                "clients_refused": c.clients_refused,
                "slow_clients_dropped": c.slow_clients_dropped,
                "queue_budget_drops": c.queue_budget_drops,
                "clients_sent_data": c.clients_sent_data,
                "send_stalls": c.send_stalls,
                "stalled_clients_dropped": c.stalled_clients_dropped,
                "accept_errors": c.accept_errors,
                "fd_shortages": c.fd_shortages,
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
                "max_queued_total": cfg.max_queued_total,
                "open_fds": open_fds,
                "fd_limit": soft,
                "accept_paused": self._accept_paused,
                "fd_shortage": self._shortage is not None,
                "sends_stalled": self._stall is not None,
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
            if self._guard is not None and not self._guard.sealed:  # [regionguard]
                self._region_timer = loop.call_later(CHECK_INTERVAL, self._on_region_timer)
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

    def close(self, discard: bool = False) -> None:
        """Disconnect every client (which is how they learn the server is gone), remove the
        socket files and the pid file and release the shared memory. Idempotent.

        ``discard`` (for a start that failed) also removes a named region that this server
        created: nobody can have used it yet, and left behind it would look like a region
        worth keeping."""
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
        self._blocked.clear()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._region_timer is not None:  # [regionguard]
            self._region_timer.cancel()
            self._region_timer = None
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
        if self._membership is not None:  # [regionguard]
            self._membership.close()
            self._membership = None
        if discard and self._shm is not None and self._shm.created:
            log.info("removing %s, created by this failed start", self._shm.path)
            self._shm.unlink()
        if self._shm_ref is not None:
            self._shm_ref.release()  # the server's reference; queued ones are gone already
            self._shm_ref = None
        elif self._shm is not None:
            self._shm.close()
        self._remove_pidfile()
        self._release_reserve()

    def _remove_socket_file(self, path: str) -> None:
        """Unlink ``path`` only if it is still the socket we bound: an operator may have
        removed ours and started another server there."""
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._bound.get(path):
                os.unlink(path)
        except OSError:
            pass

    # -- the reserve fd -----------------------------------------------------------------

    def _restore_reserve(self) -> None:
        if self._reserve >= 0 or self._closed or not self._reserve_usable:
            return
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                # No /dev/null (an odd chroot): do without a reserve rather than wait for one.
                log.debug("no reserve fd: %s", err.strerror)
                self._reserve_usable = False

    def _release_reserve(self) -> bool:
        fd, self._reserve = self._reserve, -1
        if fd < 0:
            return False
        os.close(fd)
        return True

    def _count_fds(self) -> int:
        """Open fds (the reserve included), or -1 if they cannot be counted."""
        try:
            return _open_fd_count()
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE) or not self._release_reserve():
                return -1
        # Listing /proc/self/fd takes an fd: the reserve's. Its count then misses the
        # reserve and includes the listing, which is the right total.
        try:
            return _open_fd_count() + 1
        except OSError:
            return -1
        finally:
            self._restore_reserve()

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
                # The backlog is empty: whoever waited through a shortage has been served.
                if self._shortage is not None and not self._parked:
                    self._end_shortage()
                return
            except OSError as err:
                self._counters.accept_errors += 1
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    first = self._begin_shortage()
                    assert self._shortage is not None
                    self._shortage.accept_failures += 1
                    if first:
                        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                        log.warning(
                            "cannot accept clients: %s (%d fds open, limit %d); waiting "
                            "clients stay in the listen backlog and are served as fds are "
                            "freed (logged once per shortage, with a summary when it ends)",
                            err.strerror,
                            self._count_fds(),
                            soft,
                        )
                    else:
                        log.debug("accept still fails: %s", err.strerror)
                    self._pause_accepting()
                    return
                if err.errno in (errno.ECONNABORTED, errno.EPROTO):
                    log.info("a client went away before it was accepted")
                    continue
                log.error("accept failed: %s; retrying in %.2f s", err.strerror, self._backoff)
                self._pause_accepting()
                return
            try:
                self._admit(conn)
            except Exception:
                # A bug or an unexpected OSError around one client must not stop the server.
                log.exception("unexpected error while admitting a client; dropping it")
                conn.close()

    def _begin_shortage(self) -> bool:
        """Enter (or stay in) an fd shortage; True if it starts now (warn once per shortage:
        a flood at the limit would otherwise log a line per attempt)."""
        if self._shortage is not None:
            return False
        self._shortage = _Shortage(time.monotonic())
        self._counters.fd_shortages += 1
        return True

    def _end_shortage(self) -> None:
        shortage, self._shortage = self._shortage, None
        if shortage is None:
            return
        log.info(
            "file descriptors are available again after %.1f s: accepting failed %d time(s) "
            "and %d client(s) waited for their eventfds during the shortage; every waiting "
            "client has been served",
            time.monotonic() - shortage.started,
            shortage.accept_failures,
            shortage.clients_waited,
        )

    def _pause_accepting(self) -> None:
        """Stop accepting for a back-off period (a level-triggered listener that cannot be
        accepted from would spin)."""
        loop = self._loop
        if loop is None or self._listener is None or self._accept_paused:
            return
        loop.remove_reader(self._listener.fileno())
        self._accept_paused = True
        loop.call_later(self._backoff, self._resume_accepting)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._listener is None or self._loop is None or self._closed:
            return
        self._restore_reserve()
        if self._reserve < 0 and self._reserve_usable:
            # The reserve's slot is lent to a status query or taken: a client accepted now
            # would take it, and the next status query could not be answered.
            self._pause_accepting()
            return
        while self._parked:
            conn, creds = self._parked.popleft()
            if not self._join(conn, creds):
                # _join parked it again at the back; put it back in front to keep order.
                self._parked.appendleft(self._parked.pop())
                return
        self._loop.add_reader(self._listener.fileno(), self._on_accept)
        self._on_accept()

    def _admit(self, conn: socket.socket) -> None:
        """Give a new connection an id and eventfds, queue its handshake and the announcements."""
        assert self._table is not None and self._loop is not None
        try:
            conn.setblocking(False)
            creds = peer_credentials(conn)
        except OSError as err:
            log.info("a client went away while being accepted: %s", err.strerror)
            conn.close()
            return
        pid, uid, gid = creds
        log.debug("connection from pid %d uid %d gid %d", pid, uid, gid)
        if not client_allowed(self.config, uid, gid, lambda: peer_groups(conn)):
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
                first = self._begin_shortage()
                assert self._shortage is not None
                self._shortage.clients_waited += 1
                if first:
                    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                    log.warning(
                        "client pid %d waits: cannot create its eventfds (%s; %d fds open, "
                        "limit %d); accepting pauses until fds are freed (logged once per "
                        "shortage, with a summary when it ends)",
                        pid,
                        err.strerror,
                        self._count_fds(),
                        soft,
                    )
                else:
                    log.debug("client pid %d waits for its eventfds: %s", pid, err.strerror)
                self._pause_accepting()
                return False
            conn.close()
            self._counters.clients_refused += 1
            log.warning("cannot serve client pid %d: cannot create eventfds: %s", pid, err.strerror)
            return True
        except TableFullError as err:
            for holder in holders:
                holder.release()
            conn.close()
            self._counters.clients_refused += 1
            log.warning("cannot serve client pid %d: %s", pid, err)
            return True
        self._backoff = _BACKOFF_MIN
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
        # [regionguard] Before the newcomer is sent the fd: it must map the right size.
        self._check_region()
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
        queued = 0
        for send in sends:
            client = clients.get(send.recipient)
            if client is None or client.closed:
                continue
            client.queue.append(send.value)
            client.fds.append(None if send.fd is None else send.fd.acquire())
            queued += 1
            if not client.dirty and not client.writing:
                client.dirty = True
                self._dirty.append(client)
            if len(client.queue) > limit and not client.overflowed:
                client.overflowed = True
                overflowed.append(client)
        self._queued_total += queued
        for client in overflowed:
            self._counters.slow_clients_dropped += 1
            self._disconnect(
                client,
                f"disconnected: it is not reading; {len(client.queue)} messages queued for it "
                f"pass the bound of {limit} (one full handshake + --max-queue "
                f"{self.config.max_queue})",
                logging.WARNING,
            )
        loop = self._loop
        if loop is None:
            return
        if self._queued_total > self.config.max_queued_total and not self._budget_check_scheduled:
            # Not from here: a join or leave is half-way through its bookkeeping.
            self._budget_check_scheduled = True
            loop.call_soon(self._enforce_queue_budget)
        if self._dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_dirty)

    def _enforce_queue_budget(self) -> None:
        """Disconnect the clients with the longest queues until all queues together fit in
        max_queued_total (each one's leave announcement is one more message for the rest)."""
        self._budget_check_scheduled = False
        budget = self.config.max_queued_total
        while self._queued_total > budget and not self._closed:
            victim = max(self._clients.values(), key=lambda cl: len(cl.queue), default=None)
            if victim is None or not victim.queue:
                break
            self._counters.queue_budget_drops += 1
            self._disconnect(
                victim,
                f"disconnected: {self._queued_total} messages are queued for all clients "
                f"together, past the bound of {budget} (--max-queued-total), and its queue is "
                f"the longest ({len(victim.queue)} messages)",
                logging.WARNING,
            )

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        # Disconnects during flushing queue leave messages, which append to the list.
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for client in dirty:
                client.dirty = False
                # A blocked client is retried by the stall timer, all of them in one round.
                if not client.closed and not client.blocked:
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
        fds = client.fds
        sent = 0
        try:
            while client.partial or queue:
                if client.partial:
                    n = sock.send(client.partial, socket.MSG_NOSIGNAL)
                    client.partial = client.partial[n:]
                    continue
                holder = fds[0]
                data = encode(queue[0])
                if holder is None:
                    n = sock.send(data, _MSG_NOSIGNAL)
                else:
                    # The queued reference keeps the fd open: its number cannot be a closed
                    # or reused one here.
                    n = sock.sendmsg([data], holder.ancillary(), _MSG_NOSIGNAL)
                queue.popleft()
                fds.popleft()
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
                self._stalled(client, err)
                return
            self._disconnect(
                client, f"went away while messages were queued for it ({err.strerror})"
            )
            return
        finally:
            client.sent += sent
            self._counters.messages_sent += sent
            self._queued_total -= sent
        if client.writing and self._loop is not None:
            client.writing = False
            self._loop.remove_writer(client.fd)

    # -- send stalls --------------------------------------------------------------------

    def _unread(self, client: _Client) -> int:
        """Messages sent to ``client`` that it has not read yet (from SIOCOUTQ)."""
        if client.closed:
            return 0
        try:
            return _outq(client.fd) // self._truesize
        except OSError:
            return 0

    def _unread_all(self) -> dict[int, tuple[int, int]]:
        return {peer: (self._unread(cl), cl.sent) for peer, cl in self._clients.items()}

    def _stalled(self, client: _Client, err: OSError) -> None:
        """The kernel would not take a message for ``client`` for a reason that is nobody's
        in particular (fds in flight, memory): retry it with the others later."""
        loop = self._loop
        if client.writing and loop is not None:
            # The socket itself is writable: a writer callback would fire again at once,
            # forever. The stall timer retries instead.
            loop.remove_writer(client.fd)
            client.writing = False
        if not client.blocked:
            client.blocked = True
            self._blocked.append(client)
        if self._stall is None:
            now = time.monotonic()
            self._stall = _SendStall(err.errno or 0, now, self._unread_all(), now)
            self._counters.send_stalls += 1
            self._warn_stall(err)
        if self._stall_timer is None and loop is not None and not self._closed:
            self._stall_timer = loop.call_later(self._stall_delay, self._retry_stalled)

    def _warn_stall(self, err: OSError) -> None:
        if err.errno != errno.ETOOMANYREFS:
            log.warning(
                "cannot send to clients: %s (the kernel is short of memory); retrying with a "
                "back-off, nothing is dropped (logged once per episode)",
                err.strerror,
            )
            return
        assert self._stall is not None
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        samples = self._stall.samples
        log.warning(
            "cannot pass file descriptors to clients (ETOOMANYREFS): as many are in flight "
            "-- sent, not yet received -- as the open-file limit of the server's user allows "
            "(%d); %d client(s) hold %d unread message(s). Clients that read none of theirs "
            "for %.0f s are disconnected, those holding the most first. If clients are merely "
            "slow, raise the limit (LimitNOFILE=). Logged once per episode",
            soft,
            sum(1 for unread, _sent in samples.values() if unread),
            sum(unread for unread, _sent in samples.values()),
            _STALL_GRACE,
        )

    def _retry_stalled(self) -> None:
        self._stall_timer = None
        stall = self._stall
        if self._closed or stall is None:
            return
        blocked, self._blocked = self._blocked, []
        for client in blocked:
            client.blocked = False
        if stall.errno == errno.ETOOMANYREFS:
            self._drop_non_readers(stall)
        # Clients that stall again are back in the list and retried after a longer pause.
        self._stall_delay = min(self._stall_delay * 2, _BACKOFF_MAX)
        for client in blocked:
            if not client.closed and not client.blocked:
                self._flush(client)
        self._blocked = [client for client in self._blocked if not client.closed]
        if self._blocked:
            if self._stall_timer is None and self._loop is not None:
                self._stall_timer = self._loop.call_later(self._stall_delay, self._retry_stalled)
            return
        self._stall, self._stall_delay = None, _SEND_RETRY_MIN
        log.info(
            "sending works again after %.1f s; %d client(s) were disconnected for not reading",
            time.monotonic() - stall.started,
            stall.dropped,
        )

    def _drop_non_readers(self, stall: _SendStall) -> None:
        """Disconnect the clients that hold unread messages and read none of them since the
        last sample (at least _STALL_GRACE ago), those holding the most first: half of the
        largest holding or more now, the rest in later rounds if sending still fails.

        Closing our end does not give the fds back by itself -- they sit in the client's
        receive queue until its process reads or closes the socket -- but it stops the
        client from taking more, and a client that is stuck rather than hostile lets go of
        them as soon as it runs again (it reads, sees the hang-up, closes)."""
        now = time.monotonic()
        if now - stall.sampled_at < _STALL_GRACE:
            return
        previous = stall.samples
        current = self._unread_all()
        stall.samples, stall.sampled_at = current, now
        stuck = []
        for peer, (unread, sent) in current.items():
            if peer not in previous:
                continue  # joined since: judged at the next look
            was_unread, was_sent = previous[peer]
            # A count that merely stayed the same is not enough: leave messages carry no fd
            # and still go out, and a reading client may hold as many unread as before.
            if was_unread > 0 and unread - was_unread >= sent - was_sent:
                stuck.append((unread, self._clients[peer]))
        if not stuck:
            return
        largest = max(count for count, _client in stuck)
        stuck.sort(key=lambda item: item[0], reverse=True)
        for count, client in stuck:
            if count * 2 < largest:
                break
            if client.closed:
                continue
            stall.dropped += 1
            self._counters.stalled_clients_dropped += 1
            self._disconnect(
                client,
                f"disconnected: it read none of its {count} unread message(s) while sending "
                f"fds was stalled for {now - stall.started:.1f} s (their fds count against "
                "the server's limit until its process reads or closes them)",
                logging.WARNING,
            )

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
        self._queued_total -= len(client.queue)
        client.queue.clear()
        while client.fds:
            holder = client.fds.popleft()
            if holder is not None:
                holder.release()
        self._restore_reserve()  # an fd was just freed
        self._clients.pop(client.peer, None)
        table = self._table
        if table is None or client.peer not in table:
            return
        fds, sends = table.leave(client.peer)
        for holder in fds:
            holder.release()
        self._counters.leaves += 1
        if announce:
            self._check_region()  # [regionguard]
        if self._membership is not None:
            # Also at shutdown (announce=False): the table must not list peers of a server
            # that is gone.
            self._membership.left(client.peer)
        if announce:
            self._dispatch(sends)
            self._membership_changed(client.peer)
            self._notify_observers("on_leave", client.peer)

    # -- [regionguard] the region's size ---------------------------------------------------

    def _check_region(self) -> None:
        """Restore an unsealed region's size if a peer changed it, write back what the
        server keeps in it, and ring the membership vector if that changed the table."""
        guard = self._guard
        if guard is None or guard.sealed or self._closed:
            return
        resized = guard.check() is not None
        if self._membership is not None and self._membership.repair(resized):
            self._membership_changed(-1)

    def _on_region_timer(self) -> None:
        self._region_timer = None
        if self._closed or self._loop is None:
            return
        self._check_region()
        self._region_timer = self._loop.call_later(CHECK_INTERVAL, self._on_region_timer)

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
            open_fds: int | None = None
            conn: socket.socket | None = None
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE) and self._reserve >= 0:
                    # Out of fds: answer with the reserve's slot, so that an operator can
                    # still ask the server what is going on.
                    open_fds = self._count_fds()
                    self._release_reserve()
                    with contextlib.suppress(OSError):
                        conn, _addr = listener.accept()
                    if conn is None:
                        self._restore_reserve()
                if conn is None:
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
                report = self._status(self._count_fds() if open_fds is None else open_fds)
                body = (json.dumps(report, indent=1) + "\n").encode()
            except Exception:
                log.exception("cannot build the status report")
                conn.close()
                self._restore_reserve()
                continue
            task = self._loop.create_task(self._send_status(conn, body))
            self._tasks.status.add(task)
            task.add_done_callback(self._tasks.status.discard)
            if open_fds is not None:
                return  # the reserve is in use: the next query waits for its reopening

    def _resume_status(self) -> None:
        if self._status_listener is not None and self._loop is not None and not self._closed:
            self._loop.add_reader(self._status_listener.fileno(), self._on_status_accept)

    async def _send_status(self, conn: socket.socket, body: bytes) -> None:
        assert self._loop is not None
        try:
            await asyncio.wait_for(self._loop.sock_sendall(conn, body), timeout=10.0)
        except asyncio.TimeoutError:
            log.info("status reader went away: it read nothing for 10 s")
        except OSError as err:
            log.info("status reader went away: %s", err.strerror)
        finally:
            conn.close()
            self._restore_reserve()


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

"""The server's configuration: defaults, :class:`ServerConfig` and its checks, and the
parsing of user and group names given on the command line."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from ..errors import ServerConfigError, UsageError
from ..memory import validate_shm_name
from ..protocol import MAX_PEER_ID, MAX_VECTORS

DEFAULT_SOCKET_PATH = "/tmp/ivshmem_socket"
DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_SIZE = 4 << 20
#: Messages a client may have queued beyond one full handshake before it is disconnected.
#: Generous: a client must fall behind by this many join/leave messages (thousands of peers
#: coming and going) while not reading at all. Each queued message costs about 16 bytes of
#: server memory, and one with an fd may keep a departed peer's eventfd open until it is sent.
DEFAULT_MAX_QUEUE = 16384
#: Handshakes one client process (pid and uid) may have unsent at once before its further
#: connections wait (see :mod:`ivshmem.server.admission`). A handshake is sent at once unless
#: the client does not read it, so only a process holding many unread connections waits.
DEFAULT_MAX_PENDING = 256
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
    #: Handshakes one client process may have unsent before its connections wait.
    max_pending: int = DEFAULT_MAX_PENDING
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
        # User and group ids are 32-bit, and (uid_t)-1 means "no id".
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
        if self.max_pending < 1:
            raise ServerConfigError(f"max pending {self.max_pending} must be at least 1")
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

"""Access control: a client's credentials (SO_PEERCRED, SO_PEERGROUPS) and the
allow-lists of uids and gids."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable

from .config import ServerConfig

#: SO_PEERGROUPS (Linux >= 4.13, include/uapi/asm-generic/socket.h); not in Python's socket.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_CREDS = struct.Struct("3i")


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

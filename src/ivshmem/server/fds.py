"""Fd ownership: :class:`SharedFd` (one eventfd shared by a table entry and the queued
messages that carry it) and the process's open-file limit."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import struct
from collections.abc import Callable

from ..errors import ClosedError

log = logging.getLogger("ivshmem.server")

_FD = struct.Struct("i")


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


def _open_fd_count() -> int:
    """Open fds of this process; raises OSError (EMFILE when there is none to spare)."""
    # The listing's own directory fd is in the listing.
    return len(os.listdir("/proc/self/fd")) - 1

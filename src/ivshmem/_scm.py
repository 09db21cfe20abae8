"""File descriptors passed over Unix sockets (SCM_RIGHTS): the one parser of ``recvmsg``'s
ancillary data, for the host peer, the device's server link and its vfio-user socket."""

from __future__ import annotations

import array
import socket

_FD_SIZE = array.array("i").itemsize


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in ``recvmsg``'s ancillary data (a truncated trailing entry is ignored). The
    caller owns them all, and must close those it does not keep."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % _FD_SIZE]))
    return fds

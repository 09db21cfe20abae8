"""Every client socket of the server watched through one epoll set of its own.

Clients never send anything, so a client socket becomes readable once in its life: when the
client leaves (EOF or a reset) or misbehaves (it sent bytes). Giving each socket its own
``loop.add_reader`` costs a join asyncio's handle and selector key and an ``epoll_ctl`` on the
loop's set, a leave their removal, and each leave a pass through asyncio's per-fd dispatch:
together several times what the kernel's part costs. Here the server owns one
``select.epoll`` set, level-triggered, and the loop watches only that set's fd (an epoll fd is
readable while its set has ready fds). A join is one ``epoll_ctl(ADD)``, a leave one
``epoll_ctl(DEL)``, and when the set is readable one call takes up to ``maxevents`` ready fds
and hands each one's client to the server. Writers (flushing a queued client) stay on the
loop: a socket can be in both sets at once.
"""

from __future__ import annotations

import errno
import logging
import select
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import ServerConfigError, UsageError

log = logging.getLogger("ivshmem.server")

T = TypeVar("T")

#: Ready fds handled per wake-up. Level-triggered, the rest are reported at the next turn of
#: the loop, so a storm of leaves cannot keep the listener, the timers and the status socket
#: waiting for more than one batch.
MAX_EVENTS = 256

# EOF, a reset and bytes sent all make a socket readable; EPOLLHUP and EPOLLERR are reported
# whether asked for or not. EPOLLRDHUP would add nothing: a shutdown(SHUT_WR) is an EOF too.
_WATCHED = select.EPOLLIN


def refusal(err: OSError) -> str:
    """What :meth:`ClientReaders.add`'s OSError means, for a log line."""
    if err.errno == errno.ENOSPC:
        return (
            "the per-user limit of epoll watches is reached: raise the sysctl "
            "fs.epoll.max_user_watches"
        )
    return f"epoll_ctl failed: {err.strerror}"


class ClientReaders(Generic[T]):
    """One epoll set over client sockets, each fd mapped to its client.

    ``on_readable(client)`` is called for each ready client by :meth:`dispatch`; it must
    cope with a socket that has nothing to read (a spurious wake-up), and a client it drops
    must be :meth:`discard`-ed before its socket is closed: the kernel would drop a closed
    socket from the set by itself, but the map from fd numbers to clients would go stale,
    and the number is reused by the next file the process opens."""

    def __init__(self, on_readable: Callable[[T], None], maxevents: int = MAX_EVENTS) -> None:
        if maxevents < 1:
            raise UsageError(f"maxevents must be at least 1, not {maxevents}")
        try:
            self._epoll: select.epoll | None = select.epoll()  # close-on-exec, like every fd
        except OSError as err:
            raise ServerConfigError(
                f"cannot create the epoll set that watches client sockets: {err.strerror}; "
                "raise the open-file limit (ulimit -n) or free memory"
            ) from err
        self._on_readable = on_readable
        self._maxevents = maxevents
        self._clients: dict[int, T] = {}

    def fileno(self) -> int:
        """The epoll set's fd, to watch with ``loop.add_reader``. Raises ValueError once
        closed."""
        if self._epoll is None:
            raise ValueError("the client readers are closed")
        return self._epoll.fileno()

    @property
    def closed(self) -> bool:
        return self._epoll is None

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, fd: int, client: T) -> None:
        """Watch ``fd`` for ``client``. Raises OSError if the kernel refuses (see
        :func:`refusal`): the caller then cannot serve that client."""
        epoll = self._epoll
        if epoll is None:
            raise ValueError("the client readers are closed")
        epoll.register(fd, _WATCHED)
        self._clients[fd] = client

    def discard(self, fd: int, client: T) -> None:
        """Stop watching ``fd`` if it is still ``client``'s; call it before closing the
        socket. Idempotent, and a no-op after :meth:`close`."""
        if self._clients.get(fd) is not client:
            return  # already discarded: the number may be another client's by now
        del self._clients[fd]
        epoll = self._epoll
        if epoll is None:
            return
        try:
            epoll.unregister(fd)
        except OSError:
            pass  # closed already (ENOENT/EBADF): the kernel dropped it from the set itself

    def dispatch(self) -> None:
        """Hand every ready client (at most ``maxevents``) to ``on_readable``: the loop's
        reader callback for :meth:`fileno`."""
        epoll = self._epoll
        if epoll is None:
            return
        ready = epoll.poll(0, self._maxevents)
        clients = self._clients
        on_readable = self._on_readable
        for fd, _events in ready:
            # Looked up now, not when the batch was taken: an earlier client of this batch
            # may have had this one dropped (its entry is gone: skipped) or, by closing its
            # own socket, freed a number that a later open took. Only add() maps a number,
            # and nothing in a batch accepts, so a number is at worst another live client's,
            # whose handler finds nothing to read and returns.
            client = clients.get(fd)
            if client is None:
                continue
            try:
                on_readable(client)
            except Exception:
                # What asyncio did with a reader per client: one client's failure (a bug) is
                # logged and the others of the batch are still served.
                log.exception("unexpected error while handling a client's socket")

    def close(self) -> None:
        """Close the epoll set (after the caller removed its fd from the loop); forget every
        client. Idempotent: nothing touches the set's fd afterwards."""
        epoll, self._epoll = self._epoll, None
        self._clients.clear()
        if epoll is not None:
            epoll.close()

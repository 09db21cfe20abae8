"""Fd shortage: the reserve fd, pausing and resuming accepting with a back-off, clients
parked until their eventfds can be created, and the once-per-episode log lines."""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from .base import ServerBase
from .fds import _open_fd_count

log = logging.getLogger("ivshmem.server")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0


@dataclass
class _Shortage:
    """The server is out of fds since ``started``."""

    started: float
    accept_failures: int = 0
    clients_waited: int = 0


class ShortageMixin(ServerBase):
    """What the server does when it runs out of fds."""

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

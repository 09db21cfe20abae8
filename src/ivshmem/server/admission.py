"""Admission per source: one client credential (a process: its pid and uid) can have at most
``max_pending`` handshakes not yet taken by the kernel. Its further connections wait, each
costing the server one fd and nobody anything else, and join in order as its handshakes go
out; one that closes while it waits never joins, so a connection storm from one process
cannot fill everyone else's queues with announcements. Logged once per episode per source.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from .base import ServerBase
from .queues import _Client

log = logging.getLogger("ivshmem.server")

Source = tuple[int, int]  # (pid, uid)
#: Connections one source may have waiting, in multiples of --max-pending; past it they are
#: refused (closed before any handshake), so waiting cannot exhaust the server's fds.
_WAITING_FACTOR = 16
#: A source is warned about at most once in this many seconds (an episode of waiting may end
#: and begin again many times a second under sustained churn).
_WARN_INTERVAL = 60.0


@dataclass
class _Source:
    """One source's handshakes in flight and its connections waiting to join."""

    pending: int = 0
    waiting: deque[tuple[socket.socket, tuple[int, int, int]]] = field(default_factory=deque)
    #: When its connections started waiting (None: they do not), for the log.
    since: float | None = None
    waited: int = 0
    left_waiting: int = 0
    refused: int = 0
    warned: bool = False
    scheduled: bool = False


class AdmissionMixin(ServerBase):
    """Bounding what one source can have pending."""

    def _admit_bounded(self, conn: socket.socket, creds: tuple[int, int, int]) -> None:
        """Join ``conn`` now, or queue it behind its source's handshakes in flight."""
        key = (creds[0], creds[1])
        source = self._sources.get(key)
        if source is None or (source.pending < self.config.max_pending and not source.waiting):
            self._join(conn, creds)
            return
        if source.since is None:
            source.since = time.monotonic()
            if self._should_warn((key[0], key[1], 0)):
                source.warned = True
                log.warning(
                    "pid %d (uid %d) has %d handshake(s) it has not read: its further connections "
                    "wait, and join in order as it reads them (--max-pending %d; logged at most "
                    "once a minute per process, with a summary when it ends)",
                    creds[0],
                    creds[1],
                    source.pending,
                    self.config.max_pending,
                )
        if len(source.waiting) >= _WAITING_FACTOR * self.config.max_pending:
            if self._should_warn((key[0], key[1], 1)):
                log.warning(
                    "pid %d (uid %d) has %d connections waiting: refusing its further ones "
                    "until it reads (logged at most once a minute per process)",
                    creds[0],
                    creds[1],
                    len(source.waiting),
                )
            source.refused += 1
            self._counters.clients_refused += 1
            conn.close()
            return
        self._wait(source, conn, creds)

    def _should_warn(self, what: tuple[int, int, int]) -> bool:
        now = time.monotonic()
        last = self._source_warned.get(what)
        if last is not None and now - last < _WARN_INTERVAL:
            return False
        if len(self._source_warned) > 1024:
            self._source_warned = {
                k: t for k, t in self._source_warned.items() if now - t < _WARN_INTERVAL
            }
        self._source_warned[what] = now
        return True

    def _wait(self, source: _Source, conn: socket.socket, creds: tuple[int, int, int]) -> None:
        source.waiting.append((conn, creds))
        source.waited += 1
        self._counters.clients_waited += 1

    def _source_started(self, client: _Client) -> None:
        """``client`` joined with its handshake queued: count it against its source."""
        key = (client.pid, client.uid)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source()
        source.pending += 1
        client.pending = True

    def _handshake_sent(self, client: _Client) -> None:
        """``client``'s handshake went out (or it left): its source may admit another."""
        if not client.pending:
            return
        client.pending = False
        key = (client.pid, client.uid)
        source = self._sources.get(key)
        if source is None:
            return
        source.pending -= 1
        if source.waiting:
            if not source.scheduled and self._loop is not None and not self._closed:
                source.scheduled = True
                self._loop.call_soon(self._admit_waiting, key)
        elif source.pending <= 0:
            self._end_source_episode(key, source)

    def _admit_waiting(self, key: Source) -> None:
        source = self._sources.get(key)
        if source is None:
            return
        source.scheduled = False
        while source.waiting and source.pending < self.config.max_pending and not self._closed:
            conn, creds = source.waiting.popleft()
            try:
                data = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                # It left while it waited: it never joined, so nobody hears of it.
                source.left_waiting += 1
                conn.close()
                self._restore_reserve()
                continue
            if not self._join(conn, creds):
                return  # parked for want of fds: joins when they are free
        if not source.waiting and source.pending <= 0:
            self._end_source_episode(key, source)

    def _end_source_episode(self, key: Source, source: _Source) -> None:
        if self._sources.get(key) is source:
            del self._sources[key]
        if source.warned and source.since is not None:
            log.info(
                "pid %d (uid %d) has no connection waiting any more after %.1f s: %d waited, "
                "%d of them left before joining, %d were refused",
                key[0],
                key[1],
                time.monotonic() - source.since,
                source.waited,
                source.left_waiting,
                source.refused,
            )

    def _close_waiting(self) -> None:
        for source in self._sources.values():
            while source.waiting:
                source.waiting.popleft()[0].close()
        self._sources.clear()

"""Per-client queues: each client's messages and the fds they carry, the per-client and
all-clients bounds, and flushing with non-blocking sends."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Iterable

from ..protocol import Send, encode
from .base import ServerBase
from .fds import SharedFd

log = logging.getLogger("ivshmem.server")

_MSG_NOSIGNAL = socket.MSG_NOSIGNAL


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


class QueuesMixin(ServerBase):
    """Queueing messages for clients and sending them."""

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

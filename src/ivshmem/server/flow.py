"""Flow control when the kernel refuses to send (send stalls): ETOOMANYREFS when too many
fds are in flight, ENOBUFS/ENOMEM; counting each client's unread messages (SIOCOUTQ),
retrying with a back-off and disconnecting clients that read none of theirs."""

from __future__ import annotations

import errno
import fcntl
import logging
import resource
import socket
import struct
import time
from dataclasses import dataclass

from ..protocol import encode
from .base import ServerBase
from .queues import _Client

log = logging.getLogger("ivshmem.server")

#: First retry after the kernel refused to pass fds (ETOOMANYREFS) or lacked memory; doubled
#: up to _BACKOFF_MAX while it lasts.
_SEND_RETRY_MIN = 0.01
_BACKOFF_MAX = 1.0
#: A client that read nothing for this long while sends were stalled counts as not reading.
_STALL_GRACE = 1.0
_SIOCOUTQ = 0x5411  # TIOCOUTQ (asm-generic/ioctls.h): bytes sent but not yet read by the peer


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


class FlowMixin(ServerBase):
    """Send stalls and the clients that do not read."""

    def _unread(self, client: _Client) -> int:
        """Messages sent to ``client`` that it has not read yet (from SIOCOUTQ)."""
        if client.closed:
            return 0
        try:
            return _outq(client.fd) // self._truesize
        except OSError:
            return 0

    def _unread_all(self) -> dict[int, tuple[int, int]]:
        return {
            peer: (self._unread(cl), self._sent_to(cl)[0]) for peer, cl in self._clients.items()
        }

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

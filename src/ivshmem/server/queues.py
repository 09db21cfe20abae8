"""Per-client queues: each client's messages and the fds they carry, the per-client and
all-clients bounds, and flushing with non-blocking sends."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..protocol import encode
from .base import ServerBase
from .fds import SharedFd

if TYPE_CHECKING:
    from ._fanout import Wire

log = logging.getLogger("ivshmem.server")

_MSG_NOSIGNAL = socket.MSG_NOSIGNAL
_PACK = struct.Struct("<q").pack


def _no_send(data: bytes, flags: int) -> int:
    raise AssertionError("no client")


def _no_sendmsg(data: list[bytes], anc: list[tuple[int, int, bytes]], flags: int) -> int:
    raise AssertionError("no client")


def _load_fanout() -> _Fanout | None:
    """The C fan-out (``_fanout.send``) if it was built and is not disabled
    (``IVSHMEM_PURE_PYTHON=1``), else None: :meth:`QueuesMixin._dispatch` then sends each
    message from Python, the reference the C path must agree with."""
    if os.environ.get("IVSHMEM_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from ._fanout import send
    except ImportError:
        return None
    return send


def new_wire(vectors: int, shm_fd: int) -> Wire | None:
    """The C fan-out's copy of the peer table (``_fanout.Wire``), or None where the C
    fan-out is not used: joins and leaves are then sent from lists of messages."""
    if _FANOUT is None:
        return None
    try:
        from ._fanout import Wire
    except ImportError:  # an extension built from an older source: its send() still works
        return None
    return Wire(vectors, shm_fd)


#: Whose fd a message the Wire did not send carries, besides a peer's id (``_fanout.c``'s
#: SHM_FD and NO_FD): the region's, or none.
_OWNER_SHM = -1
_OWNER_NONE = -2

#: One message to send: (recipient, value, fd or None) -- what protocol.Send says, as a tuple.
Message = tuple[int, int, "SharedFd | None"]  # protocol.encode, without the call
#: The C fan-out's signature (see _fanout.c).
_Fanout = Callable[
    [list[Message], dict[int, list[int]]], tuple[int, list[int], list[tuple[int, int]]]
]
_FANOUT = _load_fanout()
#: Whether joins and leaves are sent by the C fan-out (benchmarks/bench_join.py prints it).
ACCELERATED = _FANOUT is not None

#: Most queued messages :meth:`QueuesMixin._flush` hands the C fan-out at once.
_FLUSH_BATCH = 256

#: A client whose queue passed its bound is disconnected only once the kernel took none of
#: its messages for this long (it read nothing): a reader is never dropped for its backlog.
_READ_GRACE = 1.0


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
        "handshake_left",
        "held",
        "joins_queued",
        "judging",
        "partial",
        "peer",
        "pending",
        "pid",
        "progress_at",
        "progressed",
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
        #: The C fan-out's copy of the table holds it (sends it nothing directly): set
        #: before anything is queued for it (or a message is taken in part), cleared when
        #: its queue has been flushed empty.
        self.held = False
        #: A check of whether it reads is scheduled (its queue passed the bound).
        self.judging = False
        #: When the kernel last took a message for it (or it connected): a reader's socket
        #: keeps making room, so this stays recent however long its queue is.
        self.progress_at = self.connected_at
        self.progressed = False  # set by direct sends, folded into progress_at
        #: Messages of its handshake still in the queue (they are at its front).
        self.handshake_left = 0
        #: Counted in its source's handshakes in flight (admission.py).
        self.pending = False
        #: Per other peer, how many messages carrying that peer's eventfds are queued here:
        #: when all of a peer's are still queued as it leaves, the join and the leave are
        #: both dropped from this queue (see QueuesMixin._collapse_join).
        self.joins_queued: dict[int, int] = {}

    def describe(self) -> str:
        return f"peer {self.peer} (pid {self.pid}, uid {self.uid})"


class QueuesMixin(ServerBase):
    """Queueing messages for clients and sending them."""

    def _queue_limit(self) -> int:
        assert self._table is not None
        # One full handshake (3 fixed messages, every peer's vectors and its own) always fits.
        return self.config.max_queue + 3 + self.config.vectors * len(self._table)

    def _dispatch(self, sends: list[Message]) -> None:
        """Send or queue ``sends``. A message for a client with nothing queued goes straight
        to its socket (one system call, no queue entry, no wait for the next loop turn); the
        first one the kernel does not take -- a full socket, an error, a stall -- and all
        after it for that client are queued, and flushing deals with them in order (and with
        the error, which is not handled from here: a join or leave is half-way through).

        The C fan-out (``_fanout.c``), when built, makes the direct sends of the whole list
        in one call and hands back where the kernel refused; :meth:`_dispatch_py` is the
        reference, and does the same one message at a time."""
        limit = self._queue_limit()
        fanout = _FANOUT
        if fanout is None:
            queued, direct = self._dispatch_py(sends, limit)
        else:
            queued, direct = self._dispatch_c(fanout, sends, limit)
        self._dispatched(queued, direct)

    def _dispatched(self, queued: int, direct: int) -> None:
        """Account for a fan-out: ``direct`` messages sent, ``queued`` queued; schedule the
        queue budget's check and the flushing."""
        if direct:
            self._counters.messages_sent += direct
        self._queued_total += queued
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

    def _dispatch_py(self, sends: Iterable[Message], limit: int) -> tuple[int, int]:
        """:meth:`_dispatch`'s sends from Python; returns (messages queued, sent)."""
        clients = self._clients
        queued = 0
        direct = 0
        progressed: list[_Client] = []
        pack = _PACK
        last = -1
        client: _Client | None = None
        direct_ok = False
        send_plain: Callable[[bytes, int], int] = _no_send
        send_fd: Callable[[list[bytes], list[tuple[int, int, bytes]], int], int] = _no_sendmsg
        # Runs of messages go to one recipient (a handshake, a join's vectors): look it up
        # once per run. No client closes while this runs (disconnects are not made here).
        for recipient, value, fd in sends:
            if recipient != last:
                last = recipient
                client = clients.get(recipient)
                if client is None or client.closed:
                    client = None
                    continue
                direct_ok = not (client.queue or client.partial or client.writing or client.blocked)
                if direct_ok:
                    send_plain, send_fd = client.sock.send, client.sock.sendmsg
            elif client is None:
                continue
            if direct_ok:
                data = pack(value)
                try:
                    if fd is None:
                        n = send_plain(data, _MSG_NOSIGNAL)
                    else:
                        n = send_fd([data], fd.ancillary(), _MSG_NOSIGNAL)
                except OSError:
                    direct_ok = False  # queued below: flushing meets the condition again
                else:
                    direct += 1
                    client.sent += 1
                    if not client.progressed:  # the kernel took one: it reads
                        client.progressed = True
                        progressed.append(client)
                    if n < 8:  # its fd went with byte 0
                        direct_ok = False
                        self._keep_partial(client, data[n:])
                    if client.handshake_left:
                        client.handshake_left -= 1
                        if not client.handshake_left:
                            self._handshake_sent(client)
                    continue
            self._enqueue(client, value, fd, limit)
            queued += 1
        if progressed:
            now = time.monotonic()
            for client in progressed:
                client.progressed = False
                client.progress_at = now
        return queued, direct

    def _dispatch_c(self, fanout: _Fanout, sends: list[Message], limit: int) -> tuple[int, int]:
        """:meth:`_dispatch`'s sends through the C fan-out; returns (messages queued, sent).

        ``socks`` maps each client that can be sent to directly (nothing queued, no partial
        message, not waiting for the kernel) to [its socket fd, messages sent]. The C loop
        sends everything it can in one call; what it did not send -- for a client with a
        queue, or from the first message the kernel refused for a client on -- is queued
        here, per client in order, as the Python path queues it."""
        clients = self._clients
        socks: dict[int, list[int]] = {
            peer: [c.fd, 0]
            for peer, c in clients.items()
            if not (c.closed or c.queue or c.partial or c.writing or c.blocked)
        }
        index, rest, partials = fanout(sends, socks)
        for at, taken in partials:  # its fd went with byte 0
            recipient, value, _fd = sends[at]
            self._keep_partial(clients[recipient], _PACK(value)[taken:])
        queued = 0
        last = -1
        target: _Client | None = None
        for at in rest:
            recipient, value, fd = sends[at]
            if recipient != last:
                last = recipient
                target = clients.get(recipient)
                if target is not None and target.closed:
                    target = None
            if target is not None:
                self._enqueue(target, value, fd, limit)
                queued += 1
        direct = self._sent_direct(socks)
        if index < len(sends):
            # Something unusual (a closed fd): the reference path deals with the rest, and
            # meets the clients queued above as clients with a queue.
            more_queued, more_sent = self._dispatch_py(sends[index:], limit)
            queued += more_queued
            direct += more_sent
        return queued, direct

    def _send_join(self, wire: Wire, client: _Client) -> None:
        """Send ``client``'s join -- the announcements, then its handshake -- through the C
        fan-out's copy of the table, which sends what it can in one call; queue the rest."""
        direct, mine, rest, partials, gone = wire.join(client.peer)
        if gone:
            self._gone(gone)
        client.handshake_left = max(0, client.handshake_left - mine)
        if client.handshake_left:
            # Part of it is queued: it counts against its source until it goes out (a
            # handshake sent whole never does: admission.py has nothing to bound).
            self._source_started(client)
        self._dispatched(self._queue_rest(rest, partials), direct)

    def _send_leave(self, wire: Wire, peer: int, holders: tuple[SharedFd, ...]) -> None:
        """Tell every other peer that ``peer`` (whose vector fds were ``holders``) left,
        through the C fan-out's copy of the table; where its whole join is still queued for
        a client, the join and the leave cancel out there."""
        direct, rest, partials, gone = wire.leave(peer)
        if gone:
            self._gone(gone)
        if rest:
            clients, collapse = self._clients, self._collapse_join
            kept = []
            for item in rest:
                client = clients.get(item[0])
                if client is not None and client.joins_queued and collapse(peer, holders, client):
                    continue  # it never hears of the peer: no leave for it either
                kept.append(item)
            rest = kept
        self._dispatched(self._queue_rest(rest, partials), direct)

    def _gone(self, peers: list[int]) -> None:
        """The C fan-out found these peers' sockets closed (EPIPE): it sends them nothing
        more and hands nothing back for them. Disconnect them once this join or leave is
        done (not from here: its bookkeeping is half-way through), unless their own leave
        comes first -- when many peers leave at once, their readable events are usually in
        the same batch."""
        loop = self._loop
        if loop is None or self._closed:
            return
        # The clients, not their ids: an id may be given to a newcomer before this runs.
        clients = [c for c in map(self._clients.get, peers) if c is not None]
        loop.call_soon(self._drop_gone, clients)

    def _drop_gone(self, clients: list[_Client]) -> None:
        for client in clients:
            if not client.closed:
                self._disconnect(client, "left (its socket was closed before it read everything)")

    def _queue_rest(
        self, rest: list[tuple[int, int, int, int]], partials: list[tuple[int, int, int]]
    ) -> int:
        """Queue what the C fan-out did not send -- (recipient, value, owner, vector): the fd
        is ``owner``'s eventfd ``vector``, the region's (owner -1) or none (-2) -- after the
        tail of a message it sent in part. Returns how many were queued."""
        clients = self._clients
        for recipient, value, taken in partials:
            partial_client = clients.get(recipient)
            if partial_client is not None:
                self._keep_partial(partial_client, _PACK(value)[taken:])
        if not rest:
            return 0
        table = self._table
        assert table is not None
        limit = self._queue_limit()
        queued = 0
        for recipient, value, owner, vector in rest:
            client = clients.get(recipient)
            if client is None or client.closed:
                continue
            if owner == _OWNER_NONE:
                fd = None
            elif owner == _OWNER_SHM:
                fd = table.shm
            else:
                fd = table.vectors_of(owner)[vector]
            self._enqueue(client, value, fd, limit)
            queued += 1
        return queued

    def _sent_to(self, client: _Client) -> tuple[int, float]:
        """(messages sent to ``client``, when the kernel last took one), counting those
        the C fan-out sent straight from its copy of the table."""
        sent, progress = client.sent, client.progress_at
        wire = self._wire
        if wire is not None and not client.closed and client.peer in wire:
            direct, last = wire.stats(client.peer)
            sent += direct
            progress = max(progress, last)
        return sent, progress

    def _hold(self, client: _Client) -> None:
        """Nothing more goes straight to ``client``'s socket until its queue is flushed."""
        client.held = True
        wire = self._wire
        if wire is not None and not client.closed and client.peer in wire:
            wire.hold(client.peer)

    def _sent_direct(self, socks: dict[int, list[int]]) -> int:
        """Account for what the C fan-out sent: each client's count, its progress and its
        handshake. Returns the messages sent in all."""
        clients = self._clients
        now = time.monotonic()
        direct = 0
        for peer, entry in socks.items():
            count = entry[1]
            if not count:
                continue
            client = clients[peer]
            direct += count
            client.sent += count
            client.progress_at = now  # the kernel took one: it reads
            if client.handshake_left:
                client.handshake_left = max(0, client.handshake_left - count)
                if not client.handshake_left:
                    self._handshake_sent(client)
        return direct

    def _keep_partial(self, client: _Client, tail: bytes) -> None:
        """The kernel took only part of a message (its fd went with byte 0): the rest goes
        when ``client``'s socket has room, before anything else."""
        client.partial = tail
        if not client.held:
            self._hold(client)
        if not client.dirty:
            client.dirty = True
            self._dirty.append(client)

    def _enqueue(self, client: _Client, value: int, fd: SharedFd | None, limit: int) -> None:
        """Queue one message for ``client`` (taking a reference to the fd it carries)."""
        if not client.held:
            self._hold(client)
        client.queue.append(value)
        if fd is None:
            client.fds.append(None)
        else:
            client.fds.append(fd.acquire())
            if value >= 0 and value != client.peer:
                jq = client.joins_queued
                jq[value] = jq.get(value, 0) + 1
        if not client.dirty and not client.writing:
            client.dirty = True
            self._dirty.append(client)
        if len(client.queue) > limit and not client.judging:
            # Not from here (a join or leave is half-way through its bookkeeping), and
            # not by length alone: a client that reads is never dropped for its queue.
            client.judging = True
            if self._loop is not None:
                self._loop.call_soon(self._judge_reader, client)

    def _judge_reader(self, client: _Client) -> None:
        """``client``'s queue passed its bound: disconnect it if it is not reading -- the
        kernel took none of its messages for _READ_GRACE -- and otherwise look again later.
        A client that hung up is logged as having left, not as not reading."""
        client.judging = False
        if client.closed or self._closed:
            return
        limit = self._queue_limit()
        if len(client.queue) <= limit:
            return
        if self._hung_up(client):
            return
        if not client.blocked:
            self._flush(client)  # room it made since the last flush counts as progress
            if client.closed or len(client.queue) <= limit:
                return
        now = time.monotonic()
        idle = now - self._sent_to(client)[1]
        if idle < _READ_GRACE or client.blocked:
            # It read recently (or the kernel is refusing everyone: flow.py judges that).
            client.judging = True
            if self._loop is not None:
                self._loop.call_later(max(_READ_GRACE - idle, 0.05), self._judge_reader, client)
            return
        self._counters.slow_clients_dropped += 1
        self._disconnect(
            client,
            f"disconnected: it is not reading (none of its messages was taken for "
            f"{idle:.1f} s); {len(client.queue)} messages queued for it pass the bound of "
            f"{limit} (one full handshake + --max-queue {self.config.max_queue})",
            logging.WARNING,
        )

    def _hung_up(self, client: _Client) -> bool:
        """If ``client`` closed its end (EOF or a reset), drop it as having left."""
        try:
            data = client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if data:
            return False  # it sent bytes: the readable callback deals with that
        self._disconnect(client, "left")
        return True

    def _collapse_join(self, peer: int, holders: tuple[SharedFd, ...], client: _Client) -> bool:
        """``peer`` (whose vector fds are ``holders``) leaves: if every message announcing it
        is still queued for ``client``, drop them (and their fds) and return True -- the
        client never hears of the peer, so it needs no leave message either."""
        count = len(holders)
        jq = client.joins_queued
        if not count or jq.get(peer, 0) < count:
            return False
        fds = client.fds
        found: list[int] = []
        # A recent join sits near the tail: look from there.
        for index in range(len(fds) - 1, -1, -1):
            holder = fds[index]
            if holder is not None and any(holder is h for h in holders):
                found.append(index)
                if len(found) == count:
                    break
        if len(found) != count:
            return False  # part of it was sent (an id reused since, counted twice)
        queue = client.queue
        for index in found:  # highest first: the lower indexes stay valid
            holder = fds[index]
            del fds[index]
            del queue[index]
            assert holder is not None
            holder.release()
            if index < client.handshake_left:
                client.handshake_left -= 1
        left = jq[peer] - count
        if left:
            jq[peer] = left
        else:
            del jq[peer]
        self._queued_total -= count
        self._counters.joins_collapsed += 1
        if client.handshake_left == 0:
            self._handshake_sent(client)
        return True

    def _enforce_queue_budget(self) -> None:
        """Disconnect the clients with the longest queues until all queues together fit in
        max_queued_total (each one's leave announcement is one more message for the rest)."""
        self._budget_check_scheduled = False
        # What the kernel takes now is not queued: a newcomer's handshake, for one.
        self._flush_dirty()
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
                    try:
                        self._flush(client)
                    except Exception:
                        # A bug must not leave the rest of this round unflushed for good.
                        log.exception("unexpected error while sending to %s", client.describe())
                        self._disconnect(client, "disconnected after an internal error")

    def _flush_c(self, fanout: _Fanout, client: _Client) -> int:
        """Send the head of ``client``'s queue (up to _FLUSH_BATCH messages) through the C
        fan-out; drop what it sent from the queue (releasing the fds' queued references) and
        keep the tail of a message taken in part. Returns how many messages it sent."""
        queue, fds, peer = client.queue, client.fds, client.peer
        count = min(len(queue), _FLUSH_BATCH)
        batch: list[Message] = [(peer, queue[i], fds[i]) for i in range(count)]
        entry = [client.fd, 0]
        _index, _rest, partials = fanout(batch, {peer: entry})
        taken = entry[1]
        jq = client.joins_queued
        value = 0
        for _ in range(taken):
            value = queue.popleft()
            holder = fds.popleft()
            if holder is not None:
                holder.release()
                if value >= 0 and value != peer:
                    left = jq[value] - 1
                    if left:
                        jq[value] = left
                    else:
                        del jq[value]
        if partials:  # the last one it took, in part: its fd went with byte 0
            client.partial = _PACK(value)[partials[0][1] :]
        return taken

    def _on_writable(self, client: _Client) -> None:
        if not client.closed:
            self._flush(client)
        if self._dirty and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_dirty)

    def _flush(self, client: _Client) -> None:
        """Send queued messages until the queue is empty or the socket is full.

        With the C fan-out, runs of queued messages go through it (sendmmsg() batches, each
        message still its own sendmsg() in the kernel, as in :meth:`_dispatch`); a message it
        does not take (a refusal, or something unusual it leaves to Python) is met again by
        the one-message path below, which raises or handles the condition as always."""
        sock = client.sock
        queue = client.queue
        fds = client.fds
        fanout = _FANOUT
        sent = 0
        try:
            while client.partial or queue:
                if client.partial:
                    n = sock.send(client.partial, socket.MSG_NOSIGNAL)
                    client.partial = client.partial[n:]
                    continue
                if fanout is not None and len(queue) > 1:
                    taken = self._flush_c(fanout, client)
                    sent += taken
                    if taken:
                        continue  # the next round shows whether the kernel takes more
                    # Nothing taken: the one-message path meets the refusal (or the
                    # unusual message) and raises or handles it as it always has.
                holder = fds[0]
                data = encode(queue[0])
                if holder is None:
                    n = sock.send(data, _MSG_NOSIGNAL)
                else:
                    # The queued reference keeps the fd open: its number cannot be a closed
                    # or reused one here.
                    n = sock.sendmsg([data], holder.ancillary(), _MSG_NOSIGNAL)
                value = queue.popleft()
                fds.popleft()
                if holder is not None:
                    holder.release()
                    if value >= 0 and value != client.peer:
                        jq = client.joins_queued
                        left = jq[value] - 1
                        if left:
                            jq[value] = left
                        else:
                            del jq[value]
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
            if err.errno in (errno.EPIPE, errno.ECONNRESET):
                # It closed its end (or its process exited) before reading all of it.
                self._disconnect(client, f"left ({len(queue)} queued message(s) undelivered)")
            else:
                self._disconnect(
                    client, f"went away while messages were queued for it ({err.strerror})"
                )
            return
        finally:
            if sent:
                client.sent += sent
                client.progress_at = time.monotonic()
                self._counters.messages_sent += sent
                self._queued_total -= sent
                if client.handshake_left:
                    client.handshake_left = max(0, client.handshake_left - sent)
                    if client.handshake_left == 0:
                        self._handshake_sent(client)
        if client.writing and self._loop is not None:
            client.writing = False
            self._loop.remove_writer(client.fd)
        if client.held and not (client.closed or client.blocked or client.writing):
            # Flushed empty: what comes next may go straight to its socket again.
            client.held = False
            wire = self._wire
            if wire is not None and client.peer in wire:
                wire.release(client.peer)

"""Channels: named, one-way message streams between two peers, over any endpoint.

A channel is identified by ``(name, sender id, receiver id)`` and lives in the receiver's
arena (see ``layout.py``). The receiver creates it (``Receiver(...)``), the sender finds it
(``Sender(...)`` waits until it exists); the same name used in the other direction is another
channel, which is what :class:`Duplex` pairs up.

**Waiting.** Every blocking call first spins for ``spin`` seconds re-reading one shared word
(the lowest latency, costs a core), then blocks:

* on an endpoint with doorbells (a host peer connected to a server, a guest device through
  VFIO), it stores an odd "waiting" number in its own line, fences, re-checks the ring, and
  only then sleeps on its vector's eventfd. The other side, after publishing, fences and
  loads that word; it rings only when the word is odd and new. Both fences are needed (the
  Dekker argument in ``_ordering.py``), and together they guarantee no lost wake-up: either
  the sleeper's re-check sees the new data, or the publisher's load sees the odd word.
  A busy stream therefore costs no system call at all.
* on a plain region (:class:`~ivshmem.RegionEndpoint`, no doorbell) there is nothing to sleep
  on, so it polls: sleeps that double from 50 microseconds up to ``poll_interval``. Its
  waiting word stays even, so the sender never tries to ring it.

While blocked, liveness of the other peer is checked every ``liveness_interval`` seconds -
counted across calls, so that many short waits (a small timeout, or 0) are checked as one
long one is - and, in blocking waits, at once when the ``membership_vector`` is rung: the
region's membership table when a server keeps it, else ``endpoint.peers`` where the endpoint
knows them (a host peer). A peer that left ends the wait with :class:`PeerGoneError`, and
one that closed its end with :class:`ChannelClosedError` (a receiver first gets every
message already in the ring); once found, every later wait says so at once. An end whose
memory may have been handed to someone else - the server restarted, or this peer was
disconnected - raises :class:`ChannelLostError` at its next call and touches nothing more
(see ``layout.py``, "Restarts"). A close rings
the other side, which says so as it wakes. On a plain region with a static table nobody can
tell that a peer left, and waits simply go on until their timeout.

Give each channel that blocks concurrently in one process its own vector when you can:
two threads sleeping on one eventfd can take each other's wake-up (each then only notices
its data at the next liveness check).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import operator
import os
import re
import select
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._eventfd import NOWAIT_READS, try_read
from ..endpoint import Endpoint, poll_ms
from ..errors import (
    ConnectionLostError,
    DoorbellUnavailableError,
    IvshmemError,
    PeersUnknownError,
    UsageError,
)
from ..protocol import MAX_VECTORS
from ._ordering import _acquire, _release, check_platform
from .errors import (
    ChannelClosedError,
    ChannelCorrupted,
    ChannelError,
    ChannelLostError,
    ChannelTimeout,
    PeerGoneError,
)
from .layout import (
    CHANNEL_NAME_MAX,
    ChannelEntry,
    Membership,
    PeerEntry,
    Region,
    _check_peer,
    _encode_name,
    _int_arg,
    _seconds_arg,
    allocate_channel,
    membership_guard,
    read_arena,
)
from .ring import (
    CTRL_SIZE,
    FLAG_CLOSED,
    KIND_ARRAY,
    MIN_CAPACITY,
    NO_VECTOR,
    R_FLAGS,
    R_TAIL,
    R_VECTOR,
    R_WAIT,
    S_FLAGS,
    S_HEAD,
    S_VECTOR,
    S_WAIT,
    RingReceiver,
    RingSender,
    _fast,
    init_area,
    max_payload,
)

__all__ = ["DEFAULT_CAPACITY", "Duplex", "Receiver", "Sender", "max_message"]

DEFAULT_CAPACITY = 1 << 16
MAX_CAPACITY = 1 << 32  # the record length field is 32 bits; payloads are at most half
DEFAULT_SPIN = 50e-6
DEFAULT_LIVENESS_INTERVAL = 0.1
DEFAULT_POLL_INTERVAL = 0.001
_FIRST_POLL_SLEEP = 50e-6
_SPIN_BURST = 256  # spin turns between clock reads

# Open ends in this process, so the same end of a channel cannot be opened twice (two writers
# of one word would break the single-writer argument), and so that no channel is laid over one
# still open here. Keyed by region format id, offset, role and tenancy (the "joined" word of
# the receiver's membership slot when the end was opened: its guard); the value is the area's
# size and the channel's label. An end of an earlier tenancy (opened before a server restart,
# say) is dead - its guard failed - and does not keep a new channel from that memory.
_OpenKey = tuple[int, int, str, int]
_open_ends: dict[_OpenKey, tuple[int, str]] = {}


def _held(fmt: int, tenancy: int) -> Callable[[int, int], str | None]:
    """allocate_channel's ``held``: the label of an end open in this process on region bytes
    ``[offset, offset + size)`` of format ``fmt`` under ``tenancy``, or None."""

    def held(offset: int, size: int) -> str | None:
        for (f, off, _role, t), (length, label) in list(_open_ends.items()):
            if f == fmt and t == tenancy and off < offset + size and offset < off + length:
                return label
        return None

    return held


def max_message(capacity: int) -> int:
    """The largest message a channel of ``capacity`` bytes of ring carries: half the capacity
    minus the 8-byte record header (a record never wraps around the ring's end, so a bigger
    one could wait for ever for room): 32760 bytes for the default 65536. ``Sender`` and
    ``Receiver`` say it as ``max_message``; ``send`` refuses bigger messages with UsageError."""
    if (
        isinstance(capacity, bool)
        or not isinstance(capacity, int)
        or not MIN_CAPACITY <= capacity <= MAX_CAPACITY
        or capacity & (capacity - 1)
    ):
        raise UsageError(
            f"capacity {capacity!r} must be a power of two within {MIN_CAPACITY}..{MAX_CAPACITY}"
        )
    return max_payload(capacity)


def _label(name: str, sender: int, receiver: int) -> str:
    return f"{name} ({sender}->{receiver})"


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    return time.monotonic() + _seconds(timeout, "timeout", zero=True)


#: Most messages one recv_many() may ask for (a list of that many is plenty for any ring).
_MAX_BATCH = 1 << 30

#: Longest liveness or poll interval: poll() takes milliseconds in a C int.
_MAX_INTERVAL = 86400.0


def _seconds(value: Any, what: str, *, zero: bool = False, inf: bool = False) -> float:
    """``value`` as a number of seconds (> 0, or >= 0 with ``zero``; finite unless ``inf``),
    else UsageError naming ``what``."""
    v = _seconds_arg(value, what)  # a real number >= 0, not NaN
    if v == 0 and not zero:
        raise UsageError(f"{what} must be a number of seconds > 0, not {value!r}")
    if v == math.inf and not inf:
        raise UsageError(f"{what} must be a finite number of seconds, not {value!r}")
    return v


def _integer(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int within ``low..high`` (not a bool or float), else UsageError."""
    v = _int_arg(value, what)
    if not low <= v <= high:
        raise UsageError(f"{what} {v} is outside {low}..{high}")
    return v


def _check_end_options(
    endpoint: Endpoint, name: Any, peer: Any, role: str, vector: Any, membership_vector: Any,
    spin: Any, timeout: Any, liveness_interval: Any, poll_interval: Any,
) -> None:  # fmt: skip
    """Every argument of a Sender or Receiver, checked before anything is written."""
    if not isinstance(name, str):
        raise UsageError(f"a channel name is a str, not {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"channel name {name!r} cannot be encoded as UTF-8") from None
    _encode_name(name, CHANNEL_NAME_MAX, "channel")  # length and NUL characters
    _check_peer(peer, f"{role} peer id")
    for v, what in ((vector, "vector"), (membership_vector, "membership_vector")):
        if v is not None:
            _integer(v, what, 0, MAX_VECTORS - 1)
            if endpoint.vectors == 0:
                raise DoorbellUnavailableError(
                    f"{endpoint!r} has no doorbell, so {what}={v} cannot be used: a plain "
                    f"region polls; leave {what} out"
                )
    _seconds(spin, "spin", zero=True, inf=True)
    if timeout is not None:
        _seconds(timeout, "timeout", zero=True)
    for value, what in ((liveness_interval, "liveness_interval"), (poll_interval, "poll_interval")):
        if _seconds(value, what) > _MAX_INTERVAL:
            raise UsageError(f"{what} {value!r} is longer than a day ({_MAX_INTERVAL:g} s)")


class _End:
    """Waiting, doorbells and liveness: what a Sender and a Receiver share.

    ``_q`` (the area's word view) and ``name`` come from the ring class this is mixed with.
    """

    _q: memoryview
    name: str
    capacity: int
    _broken: ChannelCorrupted | None
    _closed: bool
    _on_broken: Callable[[], None]
    _corrupt: Callable[[str, str], ChannelCorrupted]
    set_guard: Callable[[memoryview, int, int], None]
    _spin: Callable[[int, int, int], bool]
    _gq: memoryview
    _gi: int
    _gv: int

    def _setup(
        self,
        endpoint: Endpoint,
        region: Region,
        peer: int,
        vector: int | None,
        membership_vector: int | None,
        spin: float,
        liveness_interval: float,
        poll_interval: float,
        role: str,
        key: _OpenKey,
        my_wait: int,
        run: int,
    ) -> None:
        self.endpoint = endpoint
        self.region = region
        self.peer = peer
        self.spin = spin
        self.liveness_interval = liveness_interval
        self.poll_interval = poll_interval
        self._membership = Membership(region)
        self._role = role
        self._key = key
        # The table writer's run when this end was opened: a guard that fails under another
        # run means the server restarted (see _loss).
        self._run = run
        self._opened_as = endpoint.id
        # Continue from our own word's last value so that every "waiting" number we ever
        # store is new: the other side rings once per new odd number, and a number it has
        # already rung for (left by an earlier object on this end) would be skipped.
        old = self._q[my_wait]
        self._wait_seq = (old & ~1) + 2 if old < 1 << 62 else 0
        self._q[my_wait] = self._wait_seq
        self._closed = False
        # Whether the endpoint can say who is connected when no server keeps the table (a
        # host peer can, from its socket): asked once now, so that an endpoint that cannot
        # (a guest, a plain region: they answer only from a server-kept table) is never asked
        # again - its answer would cost a parse of the region's header at every probe.
        self._ask_endpoint = True
        if not self._membership.snapshot().live:
            try:
                _ = endpoint.peers
            except PeersUnknownError:
                self._ask_endpoint = False
            except IvshmemError:  # not connected just now (a peer reconnecting): ask later
                pass
        # Seen present at least once (peer_alive): a sender found its receiver listed with
        # the channel created; a receiver learns it at a liveness check or from the
        # sender's trace in the channel (_peer_attached).
        self._peer_seen = role == "sending" or bool(self._peer_present())
        self._recheck = False  # a membership ring is waiting for its liveness check
        # When the next liveness probe is due, kept across calls: a caller that waits in
        # many short calls (a timeout below the interval, or 0) is probed as often as one
        # long wait is, and learns that the peer left instead of timing out forever. 0 after
        # a probe found the peer gone or the channel closed: the next wait says so at once.
        self._next_live = time.monotonic() + liveness_interval
        self._quick_spin = spin > 0 and not self._closed
        self._doorbell = endpoint.vectors > 0
        # The first doorbell sleep after opening is capped (see RingSender.flush).
        self._first_sleep = True
        self._poller: Any = None
        self._fds: tuple[int, ...] = ()
        self.vector: int | None = None
        self.membership_vector = membership_vector
        if self._doorbell:
            v = 0 if vector is None else vector
            if not 0 <= v < endpoint.vectors:
                raise UsageError(f"vector {v} is outside this endpoint's 0..{endpoint.vectors - 1}")
            self.vector = v
            fds = [endpoint.fileno(v)]
            if membership_vector is not None and membership_vector != v:
                fds.append(endpoint.fileno(membership_vector))
            # Our own poll object on the eventfds (not endpoint.wait(), which builds one per
            # call): this is the blocking round trip's hot path. A wake-up taken by someone
            # else between poll and read must not hang us: try_read never blocks where the
            # kernel honours RWF_NOWAIT on eventfds (NOWAIT_READS); elsewhere only fds that are
            # non-blocking now get it, though any peer can clear the flag later.
            if NOWAIT_READS or all(not os.get_blocking(fd) for fd in fds):
                self._poller = select.poll()
                for fd in fds:
                    self._poller.register(fd, select.POLLIN)
                self._fds = tuple(fds)

    def _advertised_vector(self) -> int:
        """The vector the other side should ring: none when we never sleep on a doorbell (a
        plain region, or an infinite spin), which also spares the other side its fence."""
        if self.vector is None or self.spin == float("inf"):
            return NO_VECTOR
        return self.vector

    # -- a lost channel ------------------------------------------------------------------

    #: Why this end is lost (its guard failed: see layout.py, "Restarts"), once known.
    _lost_reason: tuple[bool, str] | None = None
    #: The endpoint's id when this end was opened; -1 until _setup (the ring's own checks
    #: in __init__ come before it, with the private guard that cannot fail).
    _opened_as = -1

    def _loss(self) -> PeerGoneError:
        """The error of an end whose guard failed, decided once: ChannelLostError when the
        server restarted or, for a receiver, when this peer was disconnected (its own slot
        changed); PeerGoneError when a sender's receiver left."""
        if self._lost_reason is None:
            me = self.endpoint.id
            if self._membership.run != self._run:
                self._lost_reason = (True, (
                    "the ivshmem server restarted: the new server rebuilt the membership table "
                    "and hands the arenas out again, so this end may not touch the channel's "
                    "memory any more (peers that reconnect get new ids); open a new end with "
                    "the ids the peers have now"
                ))  # fmt: skip
            elif me != self._opened_as:
                self._lost_reason = (True, (
                    f"this peer reconnected (its id changed from {self._opened_as} to {me}), "
                    "and the channel belongs to its old id: open a new end"
                ))  # fmt: skip
            elif self._role == "receiving":
                self._lost_reason = (True, (
                    f"this peer (id {self._opened_as}) is no longer listed in "
                    "the membership slot the channel was opened under (it was disconnected), "
                    "so the arena holding the channel may be given to another peer"
                ))  # fmt: skip
            else:
                self._lost_reason = (False, "")
        lost, reason = self._lost_reason
        if lost:
            return ChannelLostError(self.name, self.peer, reason)
        return PeerGoneError(self.name, self.peer)

    def _fail_lost(self) -> None:
        """Raise the loss, and break this end for good: every later call goes to the slow
        paths (the C core's too), which raise it again through _check_broken."""
        err = self._loss()
        if self._broken is None:
            self._broken = ChannelCorrupted(self.name, "guard", str(err))
            self._on_broken()
        raise err

    def _check_lost(self) -> None:
        """Raise the loss if this end's guard failed or its endpoint reconnected under a new
        id (nothing for an end this process closed: a closed sender's guard is pointed
        elsewhere on purpose). Checked at every liveness probe and before every block: the
        doorbell fds this end holds die with the endpoint's old connection."""
        if self._lost_reason is not None or (
            self._opened_as >= 0
            and not self._closed
            and (self._gq[self._gi] != self._gv or self.endpoint.id != self._opened_as)
        ):
            self._fail_lost()

    # -- liveness ------------------------------------------------------------------------

    def peer_alive(self) -> bool | None:
        """True when the other peer is here, False when it was here and left, None when that
        cannot be known - including a peer not seen yet: a receiver may be created before
        its sender connects, and that peer has not left, it has not come yet."""
        ep = self.endpoint
        if self._doorbell:
            try:
                # Let an endpoint that learns about peers from its server socket read it
                # (EventfdEndpoint services that socket inside wait). A doorbell taken here
                # is harmless: every caller re-checks the ring right after.
                ep.wait(self.vector, timeout=0, spin=0)
            except Exception:  # probing must not mask the real state, checked just below
                pass
        present = self._peer_present()
        if present:
            self._peer_seen = True
            return True
        if present is None:
            return None
        if not self._peer_seen and not self._peer_attached():
            return None  # not here yet (see above): wait on, up to the caller's timeout
        return False

    def _peer_present(self) -> bool | None:
        """Whether the other peer is connected now: the region's membership table if a
        server keeps it, else the endpoint's peers where it knows them (a host peer). The
        table comes first: the server updates it before it rings the membership vector and
        before its message about the peer reaches our socket, so a wait woken by that ring
        must not ask the socket, which may not have heard yet."""
        snap = self._membership.snapshot()
        if snap.live:
            return self.peer in snap.peers
        if not self._ask_endpoint:
            return None
        try:
            return self.peer in self.endpoint.peers
        except PeersUnknownError:
            self._ask_endpoint = False
            return None

    def _peer_attached(self) -> bool:
        """Whether the other peer ever opened its end of this channel (a trace it leaves in
        its own line): tells "left" from "not come yet" for a peer that came and went
        between two liveness checks. A lying peer can only make itself look seen, which
        ends waits on it sooner, never later."""
        return True

    def _check_peer(self) -> None:
        if self.peer_alive() is False:
            raise PeerGoneError(self.name, self.peer)

    def _liveness(self, changed: Callable[[], bool], other_closed: Callable[[], bool]) -> bool:
        """A wait's liveness check: True if the ring changed (deliver that first), else
        raise ChannelClosedError or PeerGoneError if the other side closed it or left.

        Order matters: the peer's state is read *before* the ring is re-checked. A peer
        that publishes its last message and then leaves is seen gone only after that
        message is in the ring, so the re-check finds it; checking the ring first would
        leave a window in which both happen unnoticed and the message is dropped."""
        self._recheck = False
        self._check_lost()  # nothing more is delivered from memory that may be reused
        closed = other_closed()
        alive = self.peer_alive()
        done = closed or alive is False
        self._next_live = 0.0 if done else time.monotonic() + self.liveness_interval
        if changed():  # also: the probe may have consumed a doorbell
            self._recheck = done  # deliver now, say so at the next wait
            return True
        if closed:
            raise ChannelClosedError(f"channel {self.name!r}: peer closed it")
        if alive is False:
            raise PeerGoneError(self.name, self.peer)
        return False

    def _timed_out(self, changed: Callable[[], bool], other_closed: Callable[[], bool]) -> bool:
        """At a wait's deadline: True if the ring changed after all; else raise what the
        due liveness probe finds (the peer gone, the channel closed), or ChannelTimeout."""
        if (self._recheck or time.monotonic() >= self._next_live) and self._liveness(
            changed, other_closed
        ):
            return True
        raise ChannelTimeout(f"channel {self.name!r}: timed out")

    # -- blocking machinery --------------------------------------------------------------

    def _ring_peer(self, vector: int) -> None:
        """Ring the other peer on the vector it advertised (validated: it is its word).

        Whether *we* have a doorbell does not matter: an endpoint that cannot receive
        interrupts (a guest device opened without them) may still be able to ring, and the
        other side sleeps until it is rung. One that cannot ring either raises
        DoorbellUnavailableError, ignored: the sleeper then notices at its liveness check."""
        if vector == NO_VECTOR:
            return
        if vector > 0xFFFF:
            raise self._corrupt("vector", f"peer advertises vector {vector}")
        try:
            self.endpoint.notify(self.peer, vector)
        except DoorbellUnavailableError:
            pass
        except ConnectionLostError:  # our own server connection is gone (see _check_doorbell)
            self._fail_disconnected()
        except UsageError as err:  # unknown peer or vector: it left, or its word lies
            if self.peer_alive() is False:
                raise PeerGoneError(self.name, self.peer) from err
            raise self._corrupt(
                "vector", f"cannot ring peer {self.peer} vector {vector}: {err}"
            ) from err

    def _block(
        self,
        word: int,
        seen: int,
        changed: Callable[[], bool],
        my_wait: int,
        other_closed: Callable[[], bool],
        deadline: float | None,
    ) -> None:
        """Return once the other side moved: shared word ``word`` differs from ``seen``, or
        ``changed()`` (the full test) is true. Raises ChannelTimeout at the (monotonic)
        ``deadline``, PeerGoneError, or ChannelClosedError when ``other_closed()`` says so.
        Callers compute the deadline once per call, so a peer that makes the word flicker
        cannot extend a timeout; every loop here is bounded by the clock."""
        self._check_lost()
        q = self._q
        # 1. Spin: the fastest reaction. A first burst reads only the one word (no clock, no
        # calls: a few tens of ns per turn); then the clock is read every _SPIN_BURST turns.
        spin = self._spin
        if self.spin > 0:
            if spin(word, seen, _SPIN_BURST):
                return
            self._idle()  # not a quick turn-around: do what waiting longer needs
            now = time.monotonic()
            spin_end = now + self.spin
            while True:
                if spin(word, seen, _SPIN_BURST):
                    return
                now = time.monotonic()
                if now >= spin_end:
                    break
                if (
                    deadline is not None
                    and now >= deadline
                    and self._timed_out(changed, other_closed)
                ):
                    return
                # Reached only with a long (or infinite) spin:
                if now >= self._next_live and self._liveness(changed, other_closed):
                    return
        elif (
            deadline is not None
            and time.monotonic() >= deadline
            and self._timed_out(changed, other_closed)
        ):
            return
        # 2. Block (doorbell) or poll (plain region). Liveness is first probed one interval
        # in (probing costs system calls, and most waits end long before), or at once after
        # a membership ring whose check a message pre-empted.
        self._idle()
        next_live = 0.0 if self._recheck else self._next_live
        sleep = _FIRST_POLL_SLEEP
        doorbell = self._doorbell
        try:
            while True:
                if doorbell:
                    # Take any doorbell left from an earlier wake-up *before* announcing: a
                    # ring that comes after the announcement must stay pending for poll().
                    # (Reading it here instead of on wake-up keeps a system call off the
                    # path from wake-up to reply.)
                    self._drain_doorbell()
                    # Announce "about to sleep" (a new odd number), fence, then re-check:
                    # the other side's publish-fence-load pairs with this (_ordering.py, 3).
                    self._wait_seq += 2
                    q[my_wait] = self._wait_seq | 1
                    _acquire()
                    _release()
                if changed():
                    return
                now = time.monotonic()
                if now >= next_live:
                    if self._liveness(changed, other_closed):
                        return
                    now = time.monotonic()
                    next_live = self._next_live
                if deadline is not None and now >= deadline:
                    raise ChannelTimeout(f"channel {self.name!r}: timed out")
                limit = next_live if deadline is None else min(deadline, next_live)
                if doorbell:
                    if self._first_sleep:
                        self._first_sleep = False
                        limit = min(limit, now + 0.001)
                    if self._sleep_on_doorbell(limit - now):
                        # The membership changed: check liveness at once - in this wait, or
                        # in the next one if this one ends with data.
                        self._recheck = True
                        next_live = now
                else:
                    time.sleep(min(sleep, limit - now))
                    sleep = min(sleep * 2, self.poll_interval)
                if changed():  # woken: usually the data is there, no need to re-announce
                    return
                if other_closed():  # woken by the other side's close(): say so now
                    next_live = 0.0
        finally:
            if doorbell:
                self._wait_seq += 2
                q[my_wait] = self._wait_seq  # even: not waiting

    def _idle(self) -> None:
        """Called once a wait outlasts a first quick spin burst, and before blocking: a
        Receiver gives back the space it kept lazily (see Receiver._wait_data)."""

    def _sleep_on_doorbell(self, seconds: float) -> bool:
        """Sleep until our vector (or the membership vector) is rung or ``seconds`` pass;
        True when the membership vector rang. The doorbell's count is left for
        :meth:`_drain_doorbell`; a membership ring is taken at once and only makes the
        caller check liveness now, after re-checking the ring (:meth:`_liveness`): raising
        here would drop a message a peer published just before it left."""
        if self._poller is None:
            self.endpoint.wait(self.vector, timeout=max(0.0, seconds), spin=0)
            return False
        membership = False
        for fd, _ in self._poller.poll(poll_ms(seconds)):
            if fd != self._fds[0]:
                # try_read, not a plain read: the peers hold this fd too, and one that cleared
                # O_NONBLOCK and took the count since poll() would make a read block for good.
                try:
                    try_read(fd)
                except OSError:  # closed under us (see _check_doorbell)
                    self._check_doorbell()
                    raise
                membership = True
        return membership

    def _drain_doorbell(self) -> None:
        if self._poller is not None:
            self._check_doorbell()
            try:
                try_read(self._fds[0])  # never blocks, whatever O_NONBLOCK (ivshmem._eventfd)
            except OSError:  # closed under us since the check, by another thread
                self._check_doorbell()
                raise

    def _check_doorbell(self) -> None:
        """Raise ChannelLostError if the doorbell fds this end polls are no longer the
        endpoint's. They belong to the endpoint's connection: a host peer that loses its
        server closes them (in a liveness probe of this very wait, or in another thread that
        reads the server's end first), and the next fd the process opens - a socket, say -
        may get the same number, which must then be neither polled nor read. Asked before
        every sleep, not per message."""
        vector = self.vector
        if vector is None:  # no doorbell: nothing polled
            return
        try:
            current = self.endpoint.fileno(vector)
        except IvshmemError:  # not connected (reconnecting), or closed
            current = -1
        if current != self._fds[0]:
            self._fail_disconnected()

    def _fail_disconnected(self) -> None:
        """Raise (and break this end for good) because the endpoint lost its server: its
        doorbells are gone, and a reconnected peer is a new peer."""
        if self._lost_reason is None:
            self._lost_reason = (True, (
                "this peer lost its connection to the ivshmem server, and with it its "
                "doorbells: open a new end once the peer has reconnected (reconnect=True), "
                "with the ids the peers have then"
            ))  # fmt: skip
        self._fail_lost()

    async def _block_async(
        self,
        changed: Callable[[], bool],
        my_wait: int,
        other_closed: Callable[[], bool],
        deadline: float | None,
    ) -> None:
        """Asyncio twin of :meth:`_block` (no spinning: that would stall the event loop). It
        sleeps on the channel's own vector only: a leave is seen at the next liveness probe,
        and the membership vector does not speed that up here."""
        self._check_lost()
        q = self._q
        self._idle()
        next_live = 0.0 if self._recheck else self._next_live
        sleep = _FIRST_POLL_SLEEP
        try:
            while True:
                if self._doorbell:
                    self._wait_seq += 2
                    q[my_wait] = self._wait_seq | 1
                    _acquire()
                    _release()
                if changed():
                    return
                now = time.monotonic()
                if now >= next_live:
                    if self._liveness(changed, other_closed):
                        return
                    now = time.monotonic()
                    next_live = self._next_live
                if deadline is not None and now >= deadline:
                    raise ChannelTimeout(f"channel {self.name!r}: timed out")
                limit = next_live if deadline is None else min(deadline, next_live)
                if self._doorbell:
                    if self._first_sleep:
                        self._first_sleep = False
                        limit = min(limit, now + 0.001)
                    await self.endpoint.wait_async(self.vector, timeout=max(0.0, limit - now))
                else:
                    await asyncio.sleep(min(sleep, limit - now))
                    sleep = min(sleep * 2, self.poll_interval)
                if not changed() and other_closed():  # the other side's close(): say so now
                    next_live = 0.0
        finally:
            if self._doorbell:
                self._wait_seq += 2
                q[my_wait] = self._wait_seq

    def _forget(self) -> None:
        _open_ends.pop(self._key, None)

    @property
    def max_message(self) -> int:
        """The largest message this channel carries (:func:`max_message` of its capacity)."""
        return max_payload(self.capacity)


def _batch(messages: Any) -> Sequence[Any]:
    """send_many()'s messages as a sequence; one bytes-like object or str is refused (it
    would be sent one byte or character at a time)."""
    if isinstance(messages, bytes | bytearray | memoryview | str):
        raise UsageError(
            "send_many() takes a sequence of messages (a list of bytes objects); send() sends "
            "one message"
        )
    try:
        return messages if isinstance(messages, Sequence) else list(messages)
    except TypeError:
        raise UsageError(f"send_many() takes a sequence of messages, not {messages!r}") from None


def _note_sent(err: BaseException, tx: Sender, sent: int, total: int) -> None:
    """Say on ``err`` how much of a failed send_many() went out (everything before the call
    that failed: a try_send_many() that raises has written nothing; earlier ones were
    published before each wait for room)."""
    with contextlib.suppress(ChannelError):
        tx.flush()  # what is written goes out, so that the note is true
    add_note = getattr(err, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(
            f"send_many(): the first {sent} of the {total} messages were sent, none after"
            if sent
            else f"send_many(): none of the {total} messages was sent"
        )


#: The guard of a closed Sender: a private word that is never 1.
_CLOSED_GUARD = memoryview(bytearray(8)).cast("Q")


def _claim(key: _OpenKey, size: int, label: str) -> None:
    if key in _open_ends:
        raise UsageError(
            f"the {key[2]} end of channel {label} is already open in this process: share "
            "that object (with your own locking between threads) instead of opening it twice"
        )
    _open_ends[key] = (size, label)


def _own_slot(region: Region, endpoint: Endpoint, deadline: float | None) -> tuple[PeerEntry, int]:
    """This peer's membership entry and the table writer's run, waiting for the server to
    list it."""
    me = endpoint.id
    membership = Membership(region)
    while True:
        snap = membership.snapshot()
        entry = snap.entries.get(me)
        if entry is not None:
            return entry, snap.run
        if deadline is not None and time.monotonic() >= deadline:
            raise ChannelTimeout(
                f"peer {me} is not in the region's membership table: the server lists peers "
                "when they connect (if it formats the region), and a plain region lists the "
                "peers given to format_region(peers=...)"
            )
        time.sleep(0.005)


class Receiver(RingReceiver, _End):
    """The receiving end of channel ``name`` from peer ``sender``; creates it if needed.

    Usage::

        rx = Receiver(endpoint, "frames", sender=1)
        data = rx.recv()                      # bytes, copied out
        view = rx.recv_view(); ...; rx.release()   # zero copy, valid until release()
        arr = rx.recv_array()                 # numpy view, valid until release()
        msg = await rx.recv_async()

    ``capacity`` (a power of two, bytes of ring; the largest message is :attr:`max_message`,
    half of it less the 8-byte record header) only matters when the channel is created.
    ``spin`` seconds of spinning precede blocking (``float('inf')``: spin only, never sleep).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        name: str,
        sender: int,
        *,
        capacity: int = DEFAULT_CAPACITY,
        vector: int | None = None,
        membership_vector: int | None = None,
        spin: float = DEFAULT_SPIN,
        timeout: float | None = 10.0,
        liveness_interval: float = DEFAULT_LIVENESS_INTERVAL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        check_platform()
        _check_end_options(
            endpoint, name, sender, "sender", vector, membership_vector, spin, timeout,
            liveness_interval, poll_interval,
        )  # fmt: skip
        max_message(capacity)  # checks the capacity
        region = Region(endpoint)
        me = endpoint.id
        label = _label(name, sender, me)
        listed, run = _own_slot(region, endpoint, _deadline(timeout))
        slot = listed.slot
        fmt = region.format_id
        # An end open here keeps its channel's space, and no channel is laid over it.
        held = _held(fmt, listed.joined)

        def in_use(e: ChannelEntry) -> bool:
            return held(e.offset, e.size) is not None

        entry = allocate_channel(
            region, slot, me, name, sender, me, CTRL_SIZE + capacity, init_area, in_use,
            held=held,
        )  # fmt: skip
        key = (fmt, entry.offset, "receiving", listed.joined)
        _claim(key, entry.size, label)
        try:
            area = region.memory[entry.offset : entry.offset + entry.size]
            RingReceiver.__init__(self, area, label)
            self.set_guard(*membership_guard(region, listed))
            self._setup(
                endpoint, region, sender, vector, membership_vector, spin,
                liveness_interval, poll_interval, "receiving", key, R_WAIT, run,
            )  # fmt: skip
            q = self._q
            q[R_VECTOR] = self._advertised_vector()
            q[R_FLAGS] = 0
        except BaseException:
            _open_ends.pop(key, None)
            raise
        self.channel = name
        self.sender = sender
        weakref.finalize(self, _open_ends.pop, key, None)

    # -- readiness ------------------------------------------------------------------------

    def _peer_attached(self) -> bool:
        # A Sender stores a non-zero wait number when it opens, and heads only grow.
        q = self._q
        return q[S_WAIT] != 0 or q[S_HEAD] != 0

    def _has_data(self) -> bool:
        return self._tail != self._head or self._q[S_HEAD] != self._tail

    def _sender_closed(self) -> bool:
        return bool(self._q[S_FLAGS] & FLAG_CLOSED) and not self._has_data()

    def _wait_data(self, deadline: float | None) -> None:
        # Space consumed but not yet given back stays ours during the first spin burst (a
        # request/reply partner usually answers within it, and a tail store per message
        # would bounce our line to the sender and back): _block calls _idle, which gives it
        # back, before it waits any longer. The sender cannot be starved meanwhile: it is
        # never kept waiting on a tail we hold beyond that burst.
        if self._closed:
            raise ChannelClosedError(f"channel {self.name!r} is closed")
        self._block(S_HEAD, self._tail, self._has_data, R_WAIT, self._sender_closed, deadline)

    async def _wait_data_async(self, deadline: float | None) -> None:
        if self._closed:
            raise ChannelClosedError(f"channel {self.name!r} is closed")
        await self._block_async(self._has_data, R_WAIT, self._sender_closed, deadline)

    def _idle(self) -> None:
        if self._tail != self._released and not self._views:
            self._publish_tail()

    # -- blocking API -----------------------------------------------------------------------

    def _recv_py(self, timeout: float | None = None) -> bytes:
        """The next message as bytes. Raises ChannelTimeout, PeerGoneError (after the ring
        is drained), ChannelClosedError (the sender closed it and all was received)."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        data = self._take()
        if data is None:
            data = self._recv_wait(timeout)
        return data

    recv = _fast("_c_recv", _recv_py)  # the C twin: the same first attempt, then _recv_wait

    def _recv_wait(self, timeout: float | None) -> bytes:
        """recv() once the ring was found empty."""
        if self._quick_spin and self._spin(S_HEAD, self._tail, _SPIN_BURST):
            # _block's first burst, inlined: the round trip's path
            data = self._take()
            if data is not None:
                return data
        deadline = _deadline(timeout)
        while True:
            self._wait_data(deadline)
            data = self._take()
            if data is not None:
                return data

    def _recv_view_py(self, timeout: float | None = None) -> memoryview:
        """The next message as a read-only view into shared memory (no copy), valid until
        :meth:`release`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        view = self._take_view()
        if view is None:
            view = self._recv_view_wait(timeout)
        return view

    recv_view = _fast("_c_recv_view", _recv_view_py)

    def _recv_view_wait(self, timeout: float | None) -> memoryview:
        """recv_view() once the ring was found empty: _recv_wait with views. Not folded into
        one method taking the take function: that costs an extra call on the round trip's
        path (measured: 1.06 -> 1.10 us for a 64 B spinning round trip)."""
        if self._quick_spin and self._spin(S_HEAD, self._tail, _SPIN_BURST):  # as in recv
            view = self._take_view()
            if view is not None:
                return view
        deadline = _deadline(timeout)
        while True:
            self._wait_data(deadline)
            view = self._take_view()
            if view is not None:
                return view

    def recv_many(self, max_messages: int = 1024, timeout: float | None = None) -> list[bytes]:
        """At least one message (waiting up to ``timeout`` for it), then whatever else is
        already there, up to ``max_messages``, each copied out as bytes: one read of the
        head and at most one tail store for the whole batch (the fast way to stream small
        messages; pair it with :meth:`Sender.send_many`). ``max_messages=0`` returns ``[]``
        at once."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        if type(max_messages) is not int or not 0 < max_messages <= _MAX_BATCH:
            self._batch_size(max_messages)  # raises, or 0: checks the end is open
        out = self.take_many(max_messages)
        if not out and max_messages > 0:
            deadline = _deadline(timeout)
            while not out:
                self._wait_data(deadline)
                out = self.take_many(max_messages)
        return out

    def _batch_size(self, max_messages: Any) -> None:
        """recv_many's max_messages when unusual (the usual case never calls this)."""
        _integer(max_messages, "max_messages", 0, _MAX_BATCH)
        if self._closed:  # take_many(0) reads nothing, so would not notice
            raise ChannelClosedError(f"channel {self.name!r} is closed")

    def recv_array(self, timeout: float | None = None, *, copy: bool = False) -> Any:
        """The next array message as a numpy array over shared memory (read-only, valid until
        :meth:`release`), or a private copy with ``copy=True``. A copied message is given
        back at once, unless views handed out earlier are still held: :meth:`release` frees
        all at once, so it then waits for your next release()."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        held = bool(self._views)
        view = self.try_recv_view(KIND_ARRAY)
        deadline = _deadline(timeout)
        while view is None:
            self._wait_data(deadline)
            view = self.try_recv_view(KIND_ARRAY)
        return self._array_out(view, copy, held)

    def _array_out(self, view: memoryview, copy: bool, held: bool) -> Any:
        array = self._decode(view)
        if copy:
            array = array.copy()
            if self._gq[self._gi] != self._gv:  # after the copy, as recv() does
                self._fail_lost()
            if not held:
                self.release()
        return array

    async def recv_async(self, timeout: float | None = None) -> bytes:
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        data = self.try_recv()
        deadline = _deadline(timeout)
        while data is None:
            await self._wait_data_async(deadline)
            data = self.try_recv()
        return data

    async def recv_many_async(
        self, max_messages: int = 1024, timeout: float | None = None
    ) -> list[bytes]:
        """Asyncio twin of :meth:`recv_many`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        if type(max_messages) is not int or not 0 < max_messages <= _MAX_BATCH:
            self._batch_size(max_messages)  # raises, or 0: checks the end is open
        out = self.take_many(max_messages)
        if not out and max_messages > 0:
            deadline = _deadline(timeout)
            while not out:
                await self._wait_data_async(deadline)
                out = self.take_many(max_messages)
        return out

    async def recv_view_async(self, timeout: float | None = None) -> memoryview:
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        view = self.try_recv_view()
        deadline = _deadline(timeout)
        while view is None:
            await self._wait_data_async(deadline)
            view = self.try_recv_view()
        return view

    async def recv_array_async(self, timeout: float | None = None, *, copy: bool = False) -> Any:
        """Asyncio twin of :meth:`recv_array`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        held = bool(self._views)
        view = self.try_recv_view(KIND_ARRAY)
        deadline = _deadline(timeout)
        while view is None:
            await self._wait_data_async(deadline)
            view = self.try_recv_view(KIND_ARRAY)
        return self._array_out(view, copy, held)

    def _decode(self, view: memoryview) -> Any:
        try:
            return _decode_array(view, self.name)
        except ChannelCorrupted as err:  # a lying array header breaks the channel like any lie
            raise self._corrupt(err.field, err.detail) from None

    def _wake_sender(self, vector: int) -> None:
        # Called while giving space back, from inside a read (take_many, _take, release,
        # _idle) whose messages are already consumed. A sender that asked to be woken and
        # then left (killed asleep on a full ring) cannot be woken, and raising here would
        # lose those messages and end the reads while more remain in the ring: nobody to
        # wake is no error. The next wait probes liveness at once (after delivering every
        # message left) and says PeerGoneError then. A lost end (ChannelLostError) and a
        # lying vector word (ChannelCorrupted) still raise.
        try:
            self._ring_peer(vector)
        except ChannelLostError:
            raise
        except PeerGoneError:
            self._next_live = 0.0

    def _guard_failed(self) -> None:
        # Our own membership slot changed (this peer was disconnected, or the server
        # restarted), and our arena may be given to someone else: read and write nothing
        # more there.
        self._head = self._tail
        self._fail_lost()

    def _corrupt(self, field: str, detail: str) -> ChannelCorrupted:
        err = RingReceiver._corrupt(self, field, detail)
        self._check_lost()  # impossible words in memory given to someone else: say that
        return err

    def _check_broken(self) -> None:
        self._check_lost()
        RingReceiver._check_broken(self)

    def close(self) -> None:
        """Release everything, tell the sender (its blocked sends end), forget the end."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(ChannelError):  # a liar's wake-up word: closing anyway
                self.release()
            if self._gq[self._gi] == self._gv:  # the memory is still ours to write
                with contextlib.suppress(ChannelError):
                    self._publish_tail()
                q = self._q
                q[R_FLAGS] = FLAG_CLOSED
                _acquire()
                _release()
                if q[S_WAIT] & 1:  # wake a sender sleeping on a full ring: it says so now
                    with contextlib.suppress(ChannelError):
                        self._ring_peer(q[S_VECTOR])
        finally:
            self._forget()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Receiver {self.name} capacity={self.capacity}>"


class Sender(RingSender, _End):
    """The sending end of channel ``name`` to peer ``receiver``; waits (up to ``timeout``)
    for the receiver to create it.

    Usage::

        tx = Sender(endpoint, "frames", receiver=2)
        tx.send(b"hello")                      # copy in, publish, ring if the receiver sleeps
        buf = tx.reserve(4096); fill(buf); tx.commit()      # zero copy
        for m in batch: tx.send(m, flush=False)
        tx.flush()                             # one index store, at most one doorbell
        tx.send_array(np.arange(10))
    """

    def __init__(
        self,
        endpoint: Endpoint,
        name: str,
        receiver: int,
        *,
        vector: int | None = None,
        membership_vector: int | None = None,
        spin: float = DEFAULT_SPIN,
        timeout: float | None = 10.0,
        liveness_interval: float = DEFAULT_LIVENESS_INTERVAL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        check_platform()
        _check_end_options(
            endpoint, name, receiver, "receiver", vector, membership_vector, spin, timeout,
            liveness_interval, poll_interval,
        )  # fmt: skip
        region = Region(endpoint)
        me = endpoint.id
        label = _label(name, me, receiver)
        entry, listed, run = _find_remote(
            endpoint, region, name, receiver, _deadline(timeout), label
        )
        key = (region.format_id, entry.offset, "sending", listed.joined)
        _claim(key, entry.size, label)
        try:
            area = region.memory[entry.offset : entry.offset + entry.size]
            RingSender.__init__(self, area, label)
            self.set_guard(*membership_guard(region, listed))
            self._setup(
                endpoint, region, receiver, vector, membership_vector, spin,
                liveness_interval, poll_interval, "sending", key, S_WAIT, run,
            )  # fmt: skip
            q = self._q
            q[S_VECTOR] = self._advertised_vector()
            q[S_FLAGS] = 0
        except BaseException:
            _open_ends.pop(key, None)
            raise
        self.channel = name
        self.receiver = receiver
        weakref.finalize(self, _open_ends.pop, key, None)

    def _tail_moved(self) -> bool:
        return self._q[R_TAIL] != self._tail

    def _receiver_closed(self) -> bool:
        return bool(self._q[R_FLAGS] & FLAG_CLOSED)

    def _wait_room(self, deadline: float | None) -> None:
        if self._closed:
            raise ChannelClosedError(f"channel {self.name!r} is closed")
        self.flush()  # what is committed must be visible, or the receiver cannot make room
        if self._receiver_closed():
            raise ChannelClosedError(f"channel {self.name!r}: the receiver closed it")
        self._block(R_TAIL, self._tail, self._tail_moved, S_WAIT, self._receiver_closed, deadline)

    def _send_py(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None,
        flush: bool = True,
    ) -> None:  # fmt: skip
        """Copy ``data`` in as one message (waiting for room). ``flush=False`` defers
        publishing to :meth:`flush`, for batches."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        if not self.try_send(data, flush):
            self._send_wait(data, timeout, flush)

    send = _fast("_c_send", _send_py)  # the C twin: the same first attempt, then _send_wait

    def _send_wait(
        self, data: bytes | bytearray | memoryview, timeout: float | None, flush: bool
    ) -> None:
        """send() once the ring was found full."""
        deadline = _deadline(timeout)
        self._wait_room(deadline)
        while not self.try_send(data, flush):
            self._wait_room(deadline)

    def send_many(
        self, messages: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> None:
        """Send every message in order, publishing once at the end (and whenever the ring
        fills): one index store, at most one fence and one doorbell per batch. ``timeout``
        bounds the whole call. If it raises (a message that cannot be sent, a timeout, the
        receiver gone), the messages before a point named in the error's note were sent and
        none after it."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        batch = _batch(messages)
        i = 0
        try:
            i = self.try_send_many(batch)
            if i < len(batch):
                deadline = _deadline(timeout)
                while i < len(batch):
                    self._wait_room(deadline)  # publishes what is written first
                    i = self.try_send_many(batch, i)
            self.flush()
        except BaseException as err:
            _note_sent(err, self, i, len(batch))
            raise

    async def _wait_room_async(self, deadline: float | None) -> None:
        """Asyncio twin of :meth:`_wait_room`."""
        if self._closed:
            raise ChannelClosedError(f"channel {self.name!r} is closed")
        self.flush()
        if self._receiver_closed():
            raise ChannelClosedError(f"channel {self.name!r}: the receiver closed it")
        await self._block_async(self._tail_moved, S_WAIT, self._receiver_closed, deadline)

    async def send_async(self, data: bytes | bytearray | memoryview,
                         timeout: float | None = None, flush: bool = True) -> None:  # fmt: skip
        """Asyncio twin of :meth:`send`."""
        deadline = _deadline(timeout)
        while not self.try_send(data, flush):
            await self._wait_room_async(deadline)

    async def send_many_async(
        self, messages: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> None:
        """Asyncio twin of :meth:`send_many`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        batch = _batch(messages)
        i = 0
        try:
            i = self.try_send_many(batch)
            deadline = _deadline(timeout)
            while i < len(batch):
                await self._wait_room_async(deadline)
                i = self.try_send_many(batch, i)
            self.flush()
        except BaseException as err:
            _note_sent(err, self, i, len(batch))
            raise

    async def reserve_async(self, n: int, timeout: float | None = None) -> memoryview:
        """Asyncio twin of :meth:`reserve`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        view = self.try_reserve(n)
        deadline = _deadline(timeout)
        while view is None:
            await self._wait_room_async(deadline)
            view = self.try_reserve(n)
        return view

    async def reserve_array_async(self, shape: int | tuple[int, ...], dtype: Any = "f8",
                                  timeout: float | None = None) -> Any:  # fmt: skip
        """Asyncio twin of :meth:`reserve_array`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        np, dt, dims, header = _array_plan(shape, dtype)
        view = self.try_reserve(len(header) + dt.itemsize * _product(dims), KIND_ARRAY)
        deadline = _deadline(timeout)
        while view is None:
            await self._wait_room_async(deadline)
            view = self.try_reserve(len(header) + dt.itemsize * _product(dims), KIND_ARRAY)
        return _array_in(np, view, header, dt, dims)

    async def send_array_async(self, array: Any, timeout: float | None = None,
                               flush: bool = True) -> None:  # fmt: skip
        """Asyncio twin of :meth:`send_array`."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        a = _numpy().asarray(array)
        self._fill_array(await self.reserve_array_async(a.shape, a.dtype, timeout), a, flush)

    def _reserve_py(self, n: int, timeout: float | None = None) -> memoryview:
        """A writable view of ``n`` bytes inside the ring (zero copy); fill it, then
        :meth:`commit` (or :meth:`cancel`)."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        view = self.try_reserve(n)
        if view is None:
            view = self._reserve_wait(n, timeout)
        return view

    reserve = _fast("_c_reserve", _reserve_py)  # the C twin: the same attempt, then the wait

    def _reserve_wait(self, n: int, timeout: float | None) -> memoryview:
        """reserve() once the ring was found full."""
        deadline = _deadline(timeout)
        while True:
            self._wait_room(deadline)
            view = self.try_reserve(n)
            if view is not None:
                return view

    def reserve_array(self, shape: int | tuple[int, ...], dtype: Any = "f8",
                      timeout: float | None = None) -> Any:  # fmt: skip
        """A numpy array of ``shape``/``dtype`` living in the ring; fill it, then
        :meth:`commit`. The receiver gets it with ``recv_array``."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        np, dt, dims, header = _array_plan(shape, dtype)
        nbytes = dt.itemsize * _product(dims)
        view = self.try_reserve(len(header) + nbytes, KIND_ARRAY)
        deadline = _deadline(timeout)
        while view is None:
            self._wait_room(deadline)
            view = self.try_reserve(len(header) + nbytes, KIND_ARRAY)
        return _array_in(np, view, header, dt, dims)

    def send_array(self, array: Any, timeout: float | None = None, flush: bool = True) -> None:
        """Send a numpy array: one copy, straight into the ring (dtype and shape travel in a
        small header)."""
        if timeout is not None:
            self._timeout(timeout)  # the argument rule, also when no wait is needed
        a = _numpy().asarray(array)
        self._fill_array(self.reserve_array(a.shape, a.dtype, timeout), a, flush)

    def _fill_array(self, out: Any, a: Any, flush: bool) -> None:
        """Copy ``a`` into its reservation ``out`` and commit (cancel if the copy fails)."""
        try:
            if a.size:
                _numpy().copyto(out, a, casting="no")
        except BaseException:
            self.cancel()
            raise
        del out
        self.commit(flush=flush)

    def _wake_receiver(self, vector: int) -> None:
        self._ring_peer(vector)

    def _guard_failed(self) -> None:
        self._limit = -1
        if self._closed:  # close() points the guard at _CLOSED_GUARD: no more writes
            raise ChannelClosedError(f"channel {self.name!r} is closed")
        # The receiver left or the server restarted (its membership slot changed), and its
        # arena may be recycled for a newcomer: not one more byte goes there.
        self._fail_lost()

    def _corrupt(self, field: str, detail: str) -> ChannelCorrupted:
        err = RingSender._corrupt(self, field, detail)
        self._check_lost()  # impossible words in memory given to someone else: say that
        return err

    def _check_broken(self) -> None:
        self._check_lost()
        RingSender._check_broken(self)

    def close(self) -> None:
        """Publish what is committed, mark the channel closed (the receiver gets
        ChannelClosedError once it has read everything), forget the end."""
        if self._closed:
            return
        self._closed = True
        try:
            self.cancel()
            if self._gq[self._gi] != self._gv:
                return  # the receiver left and its memory is someone else's: write nothing
            # A receiver that left or lies makes flush or the wake-up raise: close anyway.
            with contextlib.suppress(ChannelError):
                self.flush()
            q = self._q
            q[S_FLAGS] = FLAG_CLOSED
            _acquire()
            _release()
            wait = q[R_WAIT]
            if wait & 1:  # wake a sleeping receiver so it sees the close now
                with contextlib.suppress(ChannelError):
                    self._ring_peer(q[R_VECTOR])
        finally:
            # Every write path checks the guard first, the C core's too: pointed at a word
            # that never holds 1, it turns any later send, reserve, commit or flush into
            # ChannelClosedError (see _guard_failed) at no cost to the paths themselves.
            self.set_guard(_CLOSED_GUARD, 0, 1)
            self._forget()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sender {self.name} capacity={self.capacity}>"


def _find_remote(
    endpoint: Endpoint,
    region: Region,
    name: str,
    receiver: int,
    deadline: float | None,
    label: str,
) -> tuple[ChannelEntry, PeerEntry, int]:
    """Wait until the receiver is listed and has created the channel; return the channel's
    entry, the receiver's membership entry it was found under and the table writer's run.

    A receiver that was seen present and then leaves ends the wait with PeerGoneError
    (where presence can be known: the endpoint's peers, or a server-kept table); one never
    seen may simply not have joined yet, so that wait lasts until the deadline."""
    me = endpoint.id
    membership = Membership(region)
    seen = False
    sleep = 0.001
    while True:
        snap = membership.snapshot()
        peer = snap.entries.get(receiver)
        if peer is not None:
            arena = read_arena(region, peer.slot)
            if arena.owner == receiver:
                for entry in arena.entries:
                    if (entry.name, entry.sender, entry.receiver) == (name, me, receiver):
                        return entry, peer, snap.run
        try:
            present: bool | None = receiver in endpoint.peers
        except PeersUnknownError:
            present = (peer is not None) if snap.live else None
        if present:
            seen = True
        elif present is False and seen:
            raise PeerGoneError(label, receiver)
        if deadline is not None and time.monotonic() >= deadline:
            where = "is not listed in the membership table" if peer is None else (
                "has not created it (it must open a Receiver)"
            )  # fmt: skip
            raise ChannelTimeout(f"channel {label}: peer {receiver} {where}")
        time.sleep(sleep)
        sleep = min(sleep * 2, 0.05)


class Duplex:
    """Both directions between this endpoint and ``peer`` under one name: a Receiver for
    ``(name, peer -> me)`` and a Sender for ``(name, me -> peer)``. Good for request/reply and
    ping-pong. Keyword arguments go to both ends (``capacity`` to the receiver only)."""

    def __init__(self, endpoint: Endpoint, name: str, peer: int, *,
                 capacity: int = DEFAULT_CAPACITY, timeout: float | None = 10.0,
                 **options: Any) -> None:  # fmt: skip
        self.rx = Receiver(endpoint, name, peer, capacity=capacity, timeout=timeout, **options)
        try:
            self.tx = Sender(endpoint, name, peer, timeout=timeout, **options)
        except BaseException:
            self.rx.close()
            raise

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        self.tx.send(data, timeout)

    def recv(self, timeout: float | None = None) -> bytes:
        return self.rx.recv(timeout)

    def close(self) -> None:
        try:
            self.tx.close()
        finally:
            self.rx.close()

    def __enter__(self) -> Duplex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- arrays -----------------------------------------------------------------------------------
#
# Payload of an array message:  u8 ndim | u8 len(dtype.str) | dtype.str (<= 14 ASCII bytes) |
# ndim x u64 shape | padding to 16 | data (C order). The header comes from shared memory too,
# so the receiver copies it once, checks every field, and only builds plain numeric dtypes
# (never object dtypes: their bytes would be taken as pointers).

_MAX_NDIM = 32
_DTYPE_RE = re.compile(r"^[<>|][biufcmMSUV]\d{1,6}(\[\w{1,8}\])?$")


def _numpy() -> Any:
    try:
        import numpy as np
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UsageError("numpy is not installed: pip install 'ivshmem[numpy]'") from err
    return np


def _product(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _check_dtype(dt: Any) -> Any:
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.itemsize == 0:
        raise UsageError(f"dtype {dt} cannot travel: only plain numeric/bytes dtypes can")
    if not _DTYPE_RE.match(dt.str):
        raise UsageError(f"dtype {dt} ({dt.str!r}) cannot travel over a channel")
    return dt


def _array_plan(
    shape: int | tuple[int, ...], dtype: Any
) -> tuple[Any, Any, tuple[int, ...], bytes]:
    """numpy, the checked dtype, the dimensions and the header of an array message."""
    np = _numpy()
    dt = _check_dtype(np.dtype(dtype))
    dims = _shape(shape)
    return np, dt, dims, _encode_array_header(dt, dims)


def _shape(shape: Any) -> tuple[int, ...]:
    """An array shape (an int or a sequence of ints, each >= 0, numpy ints too), or
    UsageError."""
    dims: tuple[int, ...] | None = None
    if not isinstance(shape, str | bytes):
        try:
            dims = (operator.index(shape),)
        except TypeError:
            with contextlib.suppress(TypeError):
                dims = tuple(operator.index(d) for d in shape)
    if dims is None or len(dims) > _MAX_NDIM or any(d < 0 for d in dims):
        raise UsageError(
            f"shape {shape!r} is not an array shape: an int or a sequence of at most "
            f"{_MAX_NDIM} ints, each >= 0"
        )
    if _product(dims) > 1 << 62:
        raise UsageError(f"shape {shape!r} has more elements than any channel can carry")
    return dims


def _array_in(np: Any, view: memoryview, header: bytes, dt: Any, dims: tuple[int, ...]) -> Any:
    """Write ``header`` at the start of the reserved ``view``; the array after it."""
    view[: len(header)] = header
    if dt.itemsize * _product(dims) == 0:
        return np.empty(dims, dt)
    return np.frombuffer(view, dt, _product(dims), len(header)).reshape(dims)


def _encode_array_header(dt: Any, dims: tuple[int, ...]) -> bytes:
    code: bytes = dt.str.encode("ascii")
    head: bytes = bytes([len(dims), len(code)]) + code.ljust(14, b"\0")
    head += b"".join(d.to_bytes(8, "little") for d in dims)
    return head.ljust((len(head) + 15) & ~15, b"\0")


def _decode_array(view: memoryview, channel: str) -> Any:
    np = _numpy()
    n = len(view)
    if n < 16:
        raise ChannelCorrupted(channel, "array header", f"payload of {n} bytes is too short")
    fixed = bytes(view[:16])
    ndim, code_len = fixed[0], fixed[1]
    if ndim > _MAX_NDIM or not 1 <= code_len <= 14:
        raise ChannelCorrupted(channel, "array header", f"ndim {ndim}, dtype length {code_len}")
    offset = (16 + 8 * ndim + 15) & ~15
    if offset > n:
        raise ChannelCorrupted(channel, "array header", "shape runs past the payload")
    try:
        code = fixed[2 : 2 + code_len].decode("ascii")
    except UnicodeDecodeError:
        code = "?"
    if not _DTYPE_RE.match(code):
        raise ChannelCorrupted(channel, "array dtype", f"{code!r} is not an allowed dtype")
    try:
        dt = np.dtype(code)
    except TypeError as err:
        raise ChannelCorrupted(channel, "array dtype", f"{code!r}: {err}") from err
    if dt.hasobject or dt.fields is not None or dt.itemsize == 0:
        raise ChannelCorrupted(channel, "array dtype", f"{code!r} is not a plain dtype")
    shape_bytes = bytes(view[16 : 16 + 8 * ndim])
    dims = tuple(int.from_bytes(shape_bytes[i : i + 8], "little") for i in range(0, 8 * ndim, 8))
    count = _product(dims)
    if count * dt.itemsize != n - offset:
        raise ChannelCorrupted(
            channel, "array shape", f"{dims} of {code} needs {count * dt.itemsize} bytes, "
            f"the message carries {n - offset}",
        )  # fmt: skip
    try:
        if count == 0:
            return np.empty(dims, dt)
        return np.frombuffer(view, dt, count, offset).reshape(dims)
    except ValueError as err:
        # With a zero dimension the byte count says nothing about the others, and one numpy
        # cannot represent (say 2**63) ends here: whatever numpy refuses is a lie too.
        raise ChannelCorrupted(channel, "array shape", f"{dims} of {code}: {err}") from err

"""A single-producer, single-consumer ring of variable-size records in one channel's area.

This module knows nothing of endpoints, doorbells or names beyond the label it puts in error
messages: it is the memory discipline, kept apart so it can be tested against a hostile writer
in isolation. ``channel.py`` adds waiting, doorbells, liveness and the user API.

Area layout (the area is exactly the channel's allocation; the ring never indexes outside
it, because every view it holds is a slice of that area)::

    0    sender line     head, wait, vector, flags        written by the sender only
    128  receiver line   tail, wait, vector, flags        written by the receiver only
    256  data            capacity bytes (a power of two) written by the sender only

The lines are 128 bytes apart, not 64, because Intel's adjacent-line prefetcher pulls cache
lines in pairs and would otherwise bounce the sender's and receiver's words together.

``head`` and ``tail`` are free-running byte counters (2**64 bytes never wrap in practice); the
position in the data is ``counter & (capacity - 1)``. A record is an 8-byte header word
(``length | kind << 32``) followed by the payload, padded to 8 bytes. A record never wraps
around the end: when it does not fit before the end, the sender writes a WRAP header and
starts again at 0. So a payload is always contiguous and can be handed out as one
memoryview or numpy array.

**The hot window.** A sender does not walk the whole capacity when its receiver keeps up:
once a record would reach past the first ``window`` bytes of the data (:data:`HOT_WINDOW`,
or the capacity if smaller), the sender starts over at 0 with a WRAP marker, exactly as at the
end - provided the receiver's published tail shows that it keeps up: at most one record
(or an eighth of the window) is still unread, and the first ``need`` bytes of this lap are
consumed (the ordinary room check of a record placed at the start of the next lap:
``head + skip + need - tail <= capacity`` is ``tail >= lap start + need``). Otherwise the
record goes on linearly and the ring fills its whole capacity as before; each later record
past the window looks again. So a channel whose receiver keeps up touches a few megabytes
that stay in cache, whatever its capacity, and one whose receiver falls behind or stalls
still has the whole capacity to fill. (Why "nearly empty" and not just "room at 0": after an
early wrap the sender may fill the new lap only up to the receiver's position in the old one,
until the receiver passes the marker; with at most a record unread there, that is at least
the window less a record, and only for as long as that record takes to read.) Nothing
changes in the format: a WRAP marker could always appear at any position but 0, and a
receiver follows it by the same rule whatever the sender's reason; it needs no knowledge of
the window (and an older receiver reads an early-wrapping sender correctly). The receiver
gives space back at least every sixteenth of the window, so the sender sees it keep up.

**Trust.** Each side keeps private copies of the counters it writes (``_head`` for the
sender, ``_tail`` for the receiver) and never reads its own counters back from shared memory
(except once, validated, when it re-attaches). The other side's counter is read once per poll
into a local, checked (8-aligned, within ``capacity`` of our own counter, not moving backward),
and only then used; every record header is read once and checked against the private bounds
before its payload is sliced. Anything impossible raises :class:`ChannelCorrupted` naming the
field, and the ring stays broken. Loops over records are bounded (one WRAP per record).
Payload bytes themselves can change under a reader at any time: ``recv()`` copies them out
once; a zero-copy view shows whatever the sender (or an attacker) writes, so check the data
you rely on after copying it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .._args import flag_arg, int_arg, timeout_arg
from ..errors import UsageError
from ._ordering import _acquire, _release
from .errors import ChannelClosedError, ChannelCorrupted, UnexpectedMessageError

__all__ = [
    "ACCELERATED",
    "CTRL_SIZE",
    "HOT_WINDOW",
    "KIND_ARRAY",
    "KIND_DATA",
    "KIND_WRAP",
    "MIN_CAPACITY",
    "RingReceiver",
    "RingSender",
    "area_size_for",
    "init_area",
    "max_payload",
]

CTRL_SIZE = 256
MIN_CAPACITY = 256
HEADER = 8
#: The part of the data a sender whose receiver keeps up works in (see the module docstring):
#: a few messages of a megabyte, within what a core's caches hold. A sender's own window can be
#: set smaller (``set_window``: the tests and the fuzzer use that to exercise early wraps).
HOT_WINDOW = 4 << 20

# Word indices (8-byte words) into the area.
S_HEAD, S_WAIT, S_VECTOR, S_FLAGS = 0, 1, 2, 3
R_TAIL, R_WAIT, R_VECTOR, R_FLAGS = 16, 17, 18, 19
_DATA_WORD = CTRL_SIZE // 8

KIND_DATA, KIND_ARRAY, KIND_WRAP = 1, 2, 3
_KIND_SHIFT = 32
_LEN_MASK = 0xFFFFFFFF
_DATA_BITS = KIND_DATA << _KIND_SHIFT
_WRAP_WORD = KIND_WRAP << _KIND_SHIFT

FLAG_CLOSED = 1
#: A vector word meaning "I do not block on a doorbell, never ring me".
NO_VECTOR = 0xFFFFFFFFFFFFFFFF


def area_size_for(capacity: int) -> int:
    if capacity < MIN_CAPACITY or capacity & (capacity - 1):
        raise UsageError(f"capacity {capacity} must be a power of two >= {MIN_CAPACITY}")
    return CTRL_SIZE + capacity


def max_payload(capacity: int) -> int:
    """The largest payload that always fits: half the ring (a record never wraps, so a bigger
    one could wait forever for a lucky position), minus its header."""
    return capacity // 2 - HEADER


def _mmap_window(data: memoryview) -> tuple[mmap.mmap | None, int]:
    """The mmap under ``data`` and where ``data`` starts in it, or (None, 0).

    Slicing an mmap returns ``bytes`` straight from the mapping (one allocation, one memcpy),
    about three times cheaper for small messages than ``bytes(view[a:b])``, which first builds
    a memoryview. The offset comes from our own views, never from shared memory; the ring
    validates every index it slices with exactly as for the view."""
    mm = data.obj
    if type(mm) is not mmap.mmap or not data.c_contiguous or data.readonly or mm.closed:
        return None, 0
    ours = ctypes.c_char.from_buffer(data)
    base = ctypes.c_char.from_buffer(mm)
    try:
        offset = ctypes.addressof(ours) - ctypes.addressof(base)
    finally:
        del ours, base  # drop the buffer exports at once (they would pin the mmap open)
    if not 0 <= offset <= len(mm) - len(data):
        return None, 0
    return mm, offset


class _PythonCore:
    """What the C core (``_ringcore.RingCore``) provides, for when it is not there: the state
    lives in ordinary attributes and every method below runs as written."""

    capacity: int
    _mask: int
    _half: int
    _window: int

    def _bind(self, area: memoryview) -> None:
        """Take the sizes from the area (the C core also holds its buffer, and its sizes are
        read-only: its bounds come from the buffer it holds, never from a settable value)."""
        capacity = len(area) - CTRL_SIZE
        self.capacity = capacity
        self._mask = capacity - 1
        self._half = capacity >> 1
        self._window = capacity  # as the C core: a new area starts with its whole capacity

    def _bind_guard(self, words: memoryview, index: int, value: int) -> None:
        """The C core holds the guard word's buffer here; Python needs nothing."""

    def _bind_window(self, window: int) -> None:
        """Set the hot window, clamped to 16..capacity (the C core's fast paths rely on
        ``window <= capacity``, so the clamp lives with the value, not with its callers)."""
        self._window = min(max(int(window), 16), self.capacity)


def _load_core() -> tuple[type, bool]:
    """The C core if it was built and is not disabled (``IVSHMEM_PURE_PYTHON=1``), else the
    Python stand-in. Either way the behaviour is the same (the C core takes only the common
    case and hands everything else to the Python methods); only the speed differs."""
    if os.environ.get("IVSHMEM_PURE_PYTHON", "") not in ("", "0"):
        return _PythonCore, False
    try:
        from ._ringcore import RingCore
    except ImportError:
        return _PythonCore, False
    return RingCore, True


if TYPE_CHECKING:
    _Base = _PythonCore
    ACCELERATED = False
else:
    _Base, ACCELERATED = _load_core()

_F = TypeVar("_F", bound=Callable[..., Any])


def _fast(name: str, python: _F) -> _F:
    """The C twin ``name`` of method ``python`` when the C core is loaded, else ``python``."""
    return cast(_F, getattr(_Base, name)) if ACCELERATED else python


#: Head and tail count bytes from 0 and only grow: an honest ring needs centuries at memory
#: speed to reach 2**63. An end refuses to attach to counters at or beyond it, so that no
#: counter can pass 2**64 (where the unsigned words would wrap) while it is attached.
_COUNTER_LIMIT = 1 << 63


def init_area(area: memoryview) -> None:
    """Zero the control lines of a fresh channel area (done by its creator, before the
    directory entry that publishes it)."""
    area[0:CTRL_SIZE] = bytes(CTRL_SIZE)
    words = area[0:CTRL_SIZE].cast("Q")
    words[S_VECTOR] = NO_VECTOR
    words[R_VECTOR] = NO_VECTOR


class _Ring(_Base):
    """What both ends share: the views, the capacity, the broken state.

    With the C core loaded (``ACCELERATED``), the counters and flags below are its members
    and its methods replace the hot paths marked ``_fast``; the ``*_py`` methods stay the
    reference and the path for everything unusual (see ``_ringcore.c``)."""

    def __init__(self, area: memoryview, name: str) -> None:
        self.name = name
        size = len(area)
        capacity = size - CTRL_SIZE
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise ChannelCorrupted(name, "size", f"area of {size} bytes is not 256 + 2**k")
        self._area = area
        self._bind(area)  # sets capacity, _mask and _half
        self._bind_window(HOT_WINDOW)  # sets _window: min(HOT_WINDOW, capacity)
        self._q = area.cast("Q")
        self._data = area[CTRL_SIZE:]
        self._rodata = self._data.toreadonly()
        self._mm, self._mmoff = _mmap_window(self._data)
        self._broken: ChannelCorrupted | None = None
        # Set when this end is closed (channel.py): a receiver then reads nothing more (the
        # C core sends its reads here, to the *_py twins, which raise). A closed sender is
        # stopped by its guard instead (see channel.py, Sender.close).
        self._closed = False
        # The guard: one shared word that must keep one value while this end may write
        # (channel.py points it at the receiver's membership slot's "joined" word, which the
        # membership writer changes when it gives the arena to another peer). Checked before
        # every write to the area, so an end whose peer left never writes into memory
        # recycled for someone else. A receiver also checks it after copying a message out
        # (and after making a view), before handing it over: the membership writer changes
        # the word before the memory can go to anyone else, and loads are not reordered with
        # loads (_ordering.py), so a message copied while the word still held its value was
        # not yet overwritten - nobody else's bytes are ever delivered (a view still shows
        # whatever is written there later). Without a guard, a private word that never
        # changes.
        self._gq: memoryview = memoryview(bytearray(8)).cast("Q")
        self._gi = 0
        self._gv = 0
        self._bind_guard(self._gq, 0, 0)

    # -- the argument rule (ivshmem._args), for both cores ----------------------------------
    # The C core takes exact ints and True/False itself and sends anything else here (or to
    # the *_py twin, which calls these), so both cores accept and refuse the same values.

    def _flag(self, value: object, what: str = "flush") -> bool:
        return flag_arg(value, f"channel {self.name!r}: {what}")

    def _timeout(self, value: object) -> float | None:
        return timeout_arg(value)

    def _int(self, value: object, what: str) -> int:
        return value if type(value) is int else int_arg(value, f"channel {self.name!r}: {what}")

    def set_window(self, window: int) -> None:
        """Work within the first ``window`` bytes of the data while the receiver keeps up
        (clamped to 16..capacity; see the module docstring). A sender's placement rule; a
        receiver uses it only to pace how often it gives space back."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise UsageError(
                f"channel {self.name!r}: a window is a whole number of bytes >= 0, not {window!r}"
            )
        self._bind_window(window)

    def _corrupt(self, field: str, detail: str) -> ChannelCorrupted:
        err = ChannelCorrupted(self.name, field, detail)
        self._broken = err
        self._on_broken()
        return err

    def _on_broken(self) -> None:
        """Steer the fast paths into the slow ones, which raise."""

    def set_guard(self, words: memoryview, index: int, value: int) -> None:
        """Refuse to write once ``words[index]`` no longer equals ``value`` (see __init__)."""
        self._gq, self._gi, self._gv = words, index, value
        self._bind_guard(words, index, value)

    def _spin_py(self, word: int, seen: int, turns: int) -> bool:
        """Whether control word ``word`` moved away from ``seen`` within ``turns`` polls (the
        C core pauses between polls; Python cannot, and its loop is slow enough anyway)."""
        q = self._q
        for _ in range(turns):
            if q[word] != seen:
                return True
        return q[word] != seen

    _spin = _fast("_c_spin", _spin_py)

    def _guard_failed(self) -> None:
        """The guard word changed: this end must not write any more (channel.py overrides
        this to say which peer left)."""
        raise self._corrupt("guard", "the channel's memory was handed to another user")

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise ChannelCorrupted(self.name, self._broken.field, "channel is broken: see above")


class RingSender(_Ring):
    """The sending end: writes data, the sender line; reads only ``tail`` and the receiver's
    wait/vector words."""

    def __init__(self, area: memoryview, name: str) -> None:
        super().__init__(area, name)
        q = self._q
        head = q[S_HEAD]  # our own word, left by an earlier sender object: validate it
        tail = q[R_TAIL]
        if head & 7 or tail & 7 or not 0 <= head - tail <= self.capacity or head >= _COUNTER_LIMIT:
            raise self._corrupt("head/tail", f"head {head} and tail {tail} are inconsistent")
        self._head = head  # private: the only copy we trust
        self._tail = tail  # last validated tail
        self._published = head
        self._notified = 0  # receiver wait word we last rang for
        # The open reservation: its view (None: no reservation), position, the bytes skipped
        # to get there (a WRAP), its length and kind.
        self._resv_view: memoryview | None = None
        self._rpos = self._rskip = self._rlen = self._rkind = 0
        # Biggest record the fast path takes; -1 while broken or reserving (-> slow path).
        self._limit = self._half

    def _on_broken(self) -> None:
        self._limit = -1

    # -- space ---------------------------------------------------------------------------

    def _read_tail(self) -> int:
        """Read and validate the receiver's tail once."""
        tail = self._q[R_TAIL]
        if tail & 7 or tail < self._tail or tail > self._head:
            raise self._corrupt(
                "tail", f"{tail} (previous {self._tail}, head {self._head}) moved impossibly"
            )
        self._tail = tail
        return tail

    def _place(self, need: int) -> tuple[int, int] | None:
        """Where a record of ``need`` bytes goes: (pos, skip) or None if no room yet.

        At the end of the data it wraps (skip to 0). Past the hot window it wraps early when
        the receiver keeps up - the freshly read tail leaves at most ``need`` bytes or an
        eighth of the window unread, and is at least ``need`` into this lap (so the record at
        0 has room) - and otherwise goes on linearly (the receiver is behind or stalled: use
        the capacity). The tail load is one load of the receiver's line, which the sender
        reads at every flush anyway."""
        head = self._head
        pos = head & self._mask
        cap = self.capacity
        skip = 0
        if pos + need > cap:
            skip = cap - pos
        elif pos + need > self._window and pos:
            tail = self._read_tail()
            if tail >= head - pos + need and head - tail <= max(need, self._window >> 3):
                skip = cap - pos  # early wrap: the receiver keeps up, the start is free
        total = skip + need
        if head + total - self._tail > cap and head + total - self._read_tail() > cap:
            return None
        return (0, skip) if skip else (pos, 0)

    def _as_message(self, data: Any) -> memoryview:
        """A message other than bytes as flat bytes, or UsageError saying why it cannot
        travel (the C core sends what it cannot take directly here too)."""
        try:
            view = memoryview(data)
        except TypeError:
            raise UsageError(
                f"channel {self.name!r}: a message is bytes or another bytes-like object "
                f"(bytearray, memoryview; numpy arrays go with send_array), not "
                f"{type(data).__name__}"
            ) from None
        if "O" in view.format:
            raise UsageError(
                f"channel {self.name!r}: a buffer of Python objects (format {view.format!r}) "
                "cannot travel: its bytes are addresses inside this process"
            )
        if not view.c_contiguous:
            raise UsageError(
                f"channel {self.name!r}: the message's memory is not contiguous: send "
                "bytes(...) of it (or send_array() for a numpy array)"
            )
        try:
            return view.cast("B")
        except (TypeError, ValueError):  # a format cast() does not take (e.g. big-endian)
            return memoryview(view.tobytes())

    def _check_size(self, n: int) -> int:
        if n < 0 or n > (self.capacity >> 1) - HEADER:
            raise UsageError(
                f"channel {self.name!r}: a {n}-byte message does not fit; the most is "
                f"{(self.capacity >> 1) - HEADER} bytes (half the capacity of {self.capacity}, "
                f"less the {HEADER}-byte record header: the end's max_message)"
            )
        return (n + 15) & ~7

    # -- writing -------------------------------------------------------------------------

    def _try_send_py(self, data: bytes | bytearray | memoryview, flush: bool = True) -> bool:
        """Copy ``data`` in as one message if there is room now; False otherwise.

        This is the hot path: locals instead of attributes, one slice copy, one header store,
        and (with ``flush``) one index store, one fence and one load of the receiver's wait
        word. Everything unusual (wrap, full ring, too big, broken, reservation open) goes to
        ``_slow_place``, reached because ``_limit`` is -1 in those states."""
        if flush is not True and flush is not False:
            flush = self._flag(flush)
        if self._gq[self._gi] != self._gv:
            self._guard_failed()
        if type(data) is not bytes:
            data = self._as_message(data)
        n = len(data)
        need = (n + 15) & -8
        head = self._head
        pos = head & self._mask
        cap = self.capacity
        if need > self._limit or pos + need > self._window or head + need - self._tail > cap:
            placed = self._slow_place(n)
            if placed is None:
                return False
            head, pos = placed
        q = self._q
        self._data[pos + HEADER : pos + HEADER + n] = data
        q[_DATA_WORD + (pos >> 3)] = n | _DATA_BITS
        head += need
        self._head = head
        if flush:  # flush(), inlined (see there)
            q[S_HEAD] = head  # publish: the payload and header stores above come first (TSO)
            self._published = head
            if q[R_VECTOR] != NO_VECTOR:
                _acquire()  # StoreLoad fence before reading the receiver's wait word
                _release()
                wait = q[R_WAIT]
                if wait & 1 and wait != self._notified:
                    self._notified = wait
                    self._wake_receiver(q[R_VECTOR])
        return True

    try_send = _fast("_c_try_send", _try_send_py)

    def _try_send_many_py(
        self, messages: Sequence[bytes | bytearray | memoryview], start: int = 0
    ) -> int:
        """Copy ``messages[start:]`` in, as many as fit now, *without* publishing them (call
        :meth:`flush`); returns the index of the first message not written. A message that
        cannot be sent (wrong type, too big) raises, and then this call has written none.

        The batch path: one guard check per call, then per message only the size checks on
        private values, one slice copy and one header store; one index store and at most one
        fence and doorbell for the whole batch at the flush. (The guard is the same check a
        single send makes once before its one copy; a batch writes no longer than one big
        message does.)"""
        if self._gq[self._gi] != self._gv:
            self._guard_failed()
        start = self._int(start, "try_send_many() start")
        if start < 0:
            raise UsageError(f"channel {self.name!r}: try_send_many() start {start} is negative")
        if type(messages) is not list and type(messages) is not tuple:
            try:
                messages = list(messages)  # any iterable, as the C core takes it
            except TypeError:
                raise UsageError(
                    f"channel {self.name!r}: try_send_many() takes a sequence of messages, not "
                    f"{type(messages).__name__}"
                ) from None
        if not 0 <= start <= len(messages):
            raise UsageError(
                f"channel {self.name!r}: try_send_many() start {start} is outside "
                f"0..{len(messages)} (the number of messages)"
            )
        q = self._q
        data_view = self._data
        mask = self._mask
        cap = self.capacity
        window = self._window
        first = head = self._head
        tail = self._tail
        limit = self._limit
        i = start
        end = len(messages)
        try:
            while i < end:
                m = messages[i]
                if type(m) is not bytes:
                    m = self._as_message(m)
                n = len(m)
                need = (n + 15) & -8
                pos = head & mask
                if need > limit or pos + need > window or head + need - tail > cap:
                    self._head = head
                    placed = self._slow_place(n)
                    if placed is None:
                        break
                    head, pos = placed
                    tail = self._tail
                data_view[pos + HEADER : pos + HEADER + n] = m
                q[_DATA_WORD + (pos >> 3)] = n | _DATA_BITS
                head += need
                i += 1
        except BaseException:
            self._head = first  # unpublished: as if this call had written nothing
            raise
        self._head = head
        return i

    try_send_many = _fast("_c_try_send_many", _try_send_many_py)

    def _slow_place(self, n: int) -> tuple[int, int] | None:
        """For try_send: check the state and size, and find room (writing a WRAP marker if
        the record goes to the start); returns (head after any wrap, position) or None."""
        self._check_broken()
        if self._resv_view is not None:
            raise UsageError(f"channel {self.name!r}: commit() the reservation first")
        need = self._check_size(n)
        place = self._place(need)
        if place is None:
            return None
        pos, skip = place
        head = self._head
        if skip:
            self._q[_DATA_WORD + ((head & self._mask) >> 3)] = _WRAP_WORD
            head += skip
            self._head = head
        return head, pos

    def _try_reserve_py(self, n: int, kind: int = KIND_DATA) -> memoryview | None:
        """A writable view of ``n`` bytes in the ring, or None if there is no room now."""
        if self._gq[self._gi] != self._gv:
            self._guard_failed()
        if type(kind) is not int or (kind != KIND_DATA and kind != KIND_ARRAY):
            kind = self._int(kind, "record kind")
            if kind != KIND_DATA and kind != KIND_ARRAY:
                raise UsageError(
                    f"channel {self.name!r}: record kind {kind!r} is neither KIND_DATA nor "
                    "KIND_ARRAY"
                )
        if type(n) is not int:
            n = self._int(n, "a size (a whole number of bytes)")
        need = (n + 15) & -8
        head = self._head
        pos = head & self._mask
        cap = self.capacity
        skip = 0
        if (
            need > self._limit
            or pos + need > self._window
            or head + need - self._tail > cap
            or n < 0
        ):
            self._check_broken()
            if self._resv_view is not None:
                raise UsageError(f"channel {self.name!r}: commit() the reservation first")
            need = self._check_size(n)
            place = self._place(need)
            if place is None:
                return None
            pos, skip = place
        view = self._data[pos + HEADER : pos + HEADER + n]
        self._rpos, self._rskip, self._rlen, self._rkind = pos, skip, n, kind
        self._limit = -1
        self._resv_view = view
        return view

    try_reserve = _fast("_c_try_reserve", _try_reserve_py)

    def _commit_py(self, n: int | None = None, *, flush: bool = True) -> None:
        """Make the reserved bytes (or their first ``n``) one message; with ``flush=False``
        it is published by a later :meth:`flush` (batching: one index store, one check)."""
        if flush is not True and flush is not False:
            flush = self._flag(flush)
        if self._gq[self._gi] != self._gv:
            if self._resv_view is not None:
                self.cancel()
            self._guard_failed()
        if self._resv_view is None:
            raise UsageError(f"channel {self.name!r}: nothing reserved to commit")
        pos, skip, length, kind = self._rpos, self._rskip, self._rlen, self._rkind
        if n is not None:
            if type(n) is not int:
                try:
                    n = int_arg(n, "commit() size")
                except UsageError:
                    raise UsageError(
                        f"commit({n!r}) is outside the reserved 0..{length} bytes (a size is an "
                        "int, not a bool or a float)"
                    ) from None
            if not 0 <= n <= length:
                raise UsageError(f"commit({n!r}) is outside the reserved 0..{length} bytes")
            length = n
        q = self._q
        head = self._head
        if skip:
            q[_DATA_WORD + ((head & self._mask) >> 3)] = _WRAP_WORD
        q[_DATA_WORD + (pos >> 3)] = length | (kind << _KIND_SHIFT)
        head += skip + ((length + 15) & -8)
        self._head = head
        self._limit = self._half
        view, self._resv_view = self._resv_view, None
        try:
            view.release()  # later writes through it now fail
        except BufferError:
            pass  # exported (e.g. to numpy): cannot be revoked
        if flush:
            # flush(), inlined: this is the zero-copy hot path.
            q[S_HEAD] = head
            self._published = head
            if q[R_VECTOR] != NO_VECTOR:
                _acquire()
                _release()
                wait = q[R_WAIT]
                if wait & 1 and wait != self._notified:
                    self._notified = wait
                    self._wake_receiver(q[R_VECTOR])

    commit = _fast("_c_commit", _commit_py)

    def cancel(self) -> None:
        """Drop the current reservation; nothing is sent."""
        if self._broken is None:
            self._limit = self.capacity >> 1
        view, self._resv_view = self._resv_view, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass

    def _flush_py(self) -> None:
        """Publish every committed message with one index store, then ring the receiver if
        (and only if) it is blocked.

        The fence sits between our head store and our load of the receiver's wait word
        (_ordering.py, point 3). It is skipped when the receiver advertises no vector: it
        then never sleeps on a doorbell (a plain region, or an infinite spin), so there is
        nobody to wake. A receiver that (re)opens with a vector while we flush could be
        missed by a flush that still read the old "no vector"; its first sleep after
        opening is therefore capped at a millisecond (channel.py), which bounds that."""
        head = self._head
        if head == self._published:
            return
        if self._gq[self._gi] != self._gv:
            self._guard_failed()
        q = self._q
        q[S_HEAD] = head  # the publishing store: payloads and headers were stored before it
        self._published = head
        if q[R_VECTOR] != NO_VECTOR:
            _acquire()
            _release()
            wait = q[R_WAIT]
            if wait & 1 and wait != self._notified:
                self._notified = wait
                self._wake_receiver(q[R_VECTOR])

    flush = _fast("_c_flush", _flush_py)

    def _wake_receiver(self, vector: int) -> None:
        """Ring the receiver's doorbell; the ring itself has none (channel.py overrides)."""

    @property
    def pending(self) -> int:
        """Bytes committed but not yet published by flush()."""
        return self._head - self._published


class RingReceiver(_Ring):
    """The receiving end: writes the receiver line; reads head, records and payloads."""

    def __init__(self, area: memoryview, name: str) -> None:
        super().__init__(area, name)
        q = self._q
        tail = q[R_TAIL]  # our own word from an earlier receiver object: validate it
        head = q[S_HEAD]
        if head & 7 or tail & 7 or not 0 <= head - tail <= self.capacity or head >= _COUNTER_LIMIT:
            raise self._corrupt("head/tail", f"head {head} and tail {tail} are inconsistent")
        self._tail = tail  # consumed (private, trusted)
        self._released = tail  # published to the sender
        self._head = tail  # last validated head: records in [_tail, _head) are known to exist
        self._views: list[memoryview] = []
        self._notified = 0
        # recv() gives space back lazily (see _release_pace) and whenever the ring is found
        # empty: fewer fences and fewer cache-line transfers of the tail to the sender.
        self._release_every = self._release_pace()

    def _on_broken(self) -> None:
        self._head = getattr(self, "_tail", 0)  # fast path now goes to _read_head, which raises

    def set_window(self, window: int) -> None:
        super().set_window(window)
        self._release_every = self._release_pace()

    def _release_pace(self) -> int:
        """Every eighth of the ring; with a hot window smaller than the ring, at most every
        sixteenth of the window, so that the sender sees in time that this end keeps up (a
        ring without one keeps the coarser pace: fewer tail stores for small messages)."""
        cap = self.capacity
        return cap >> 3 if self._window >= cap else min(cap >> 3, self._window >> 4)

    def _read_head(self) -> int:
        """Read and validate the sender's head once; returns it (maybe == tail: empty)."""
        if self._broken is not None:
            self._check_broken()
        head = self._q[S_HEAD]
        if head != self._head:
            if head & 7 or head < self._head or head - self._released > self.capacity:
                raise self._corrupt(
                    "head", f"{head} (previous {self._head}, tail {self._released}) is impossible"
                )
            self._head = head
        return head

    def _next(self) -> tuple[int, int, int] | None:
        """The next record as (kind, payload offset in data, length), or None if the ring is
        empty. Does not consume it. Validates everything it uses."""
        if self._broken is not None:
            self._check_broken()
        tail = self._tail
        if tail == self._head and self._read_head() == tail:
            return None
        q = self._q
        pos = tail & self._mask
        word = q[_DATA_WORD + (pos >> 3)]
        kind = word >> _KIND_SHIFT
        if kind == KIND_WRAP:
            # Bounded: at most one WRAP per record, and it must be followed by one at 0.
            skip = self.capacity - pos
            if pos == 0 or skip >= self._head - tail:
                raise self._corrupt("record", f"WRAP at {pos} with {self._head - tail} available")
            tail += skip
            self._tail = tail
            pos = 0
            word = q[_DATA_WORD]
            kind = word >> _KIND_SHIFT
        n = word & _LEN_MASK
        need = (n + 15) & ~7
        if (
            (kind != KIND_DATA and kind != KIND_ARRAY)
            or need > self._head - tail
            or pos + need > self.capacity
            or need > self.capacity >> 1  # no honest sender writes a record this big
        ):
            raise self._corrupt(
                "record",
                f"header {word:#x} at {pos}: kind {kind}, length {n}, "
                f"{self._head - tail} bytes available",
            )
        return kind, pos + HEADER, n

    def try_recv(self) -> bytes | None:
        """The next message's bytes (copied out once), or None if the ring is empty (then
        everything consumed is given back to the sender first)."""
        data = self._take()
        if data is None and self._tail != self._released and not self._views:
            self._publish_tail()
        return data

    def _take_py(self) -> bytes | None:
        """try_recv() without giving space back on empty (blocking callers do that only
        before they wait long: see channel.py, _idle).

        The hot path: one load of the head (only when the known records are used up), one
        load of the record header, checks on private values, one copy. Anything unusual
        (WRAP, array, corrupt, broken) goes through :meth:`_next`."""
        if self._closed:
            self._refuse_closed()
        tail = self._tail
        if tail == self._head and self._read_head() == tail:
            return None
        pos = tail & self._mask
        word = self._q[_DATA_WORD + (pos >> 3)]
        n = word & _LEN_MASK
        need = (n + 15) & -8
        if (
            word >> _KIND_SHIFT != KIND_DATA
            or need > self._head - tail
            or pos + need > self.capacity
            or need > self.capacity >> 1
        ):
            rec = self._next()  # re-reads and validates, raising on corruption
            if rec is None:  # pragma: no cover - _head only grows, so a record is there
                return None
            kind, start, n = rec
            if kind != KIND_DATA:
                self._unexpected(kind, KIND_DATA)
            tail = self._tail
            need = (n + 15) & -8
            pos = start - HEADER
        mm = self._mm
        if mm is not None:
            start = self._mmoff + pos + HEADER
            data = mm[start : start + n]
        else:
            data = bytes(self._data[pos + HEADER : pos + HEADER + n])
        if self._gq[self._gi] != self._gv:  # after the copy: see _Ring.__init__, the guard
            self._guard_failed()
        tail += need
        self._tail = tail
        if tail - self._released >= self._release_every and not self._views:
            self._publish_tail()
        return data

    _take = _fast("_c_take", _take_py)

    def _take_many_py(self, max_messages: int) -> list[bytes]:
        """Up to ``max_messages`` messages already in the ring, copied out, consumed with one
        read of the head and at most one tail store (the batch path of recv_many).

        Each record is checked exactly as in :meth:`_take`, against private copies: the head
        read once and validated, and ``tail``, which only this loop advances. A record that
        is not plain (WRAP, array, corrupt) ends the batch, so an error never swallows the
        messages already copied; a call that starts at such a record hands it to
        :meth:`_take`, which handles a WRAP and reports anything else."""
        if type(max_messages) is not int:
            max_messages = self._int(max_messages, "max_messages")
        if max_messages < 0:
            raise UsageError(
                f"channel {self.name!r}: max_messages {max_messages} is negative (0 or more)"
            )
        if self._closed:
            self._refuse_closed()
        out: list[bytes] = []
        if max_messages == 0:
            return out
        q = self._q
        mask = self._mask
        cap = self.capacity
        half = cap >> 1
        mm = self._mm
        base = self._mmoff + HEADER
        data_view = self._data
        append = out.append
        tail = self._tail
        head = self._head
        while len(out) < max_messages:
            if tail == head:  # the known records are used up: look for more (once each)
                if out:
                    # With messages in hand, an impossible head ends the batch instead of
                    # raising (the next call reports it): they are delivered, not lost.
                    head = q[S_HEAD]
                    if head & 7 or head < self._head or head - self._released > cap:
                        head = tail
                        break
                    self._head = head
                else:
                    head = self._read_head()
                if tail == head:
                    break
            pos = tail & mask
            word = q[_DATA_WORD + (pos >> 3)]
            n = word & _LEN_MASK
            need = (n + 15) & -8
            if (
                word >> _KIND_SHIFT != KIND_DATA
                or need > head - tail
                or pos + need > cap
                or need > half
            ):
                if out:
                    break  # hand out what we have; the next call deals with this record
                self._tail = tail
                data = self._take()  # a WRAP (handled) or a liar (raises): the careful path
                if data is None:  # pragma: no cover - a record is known to be there
                    break
                append(data)
                tail = self._tail
                head = self._head
                continue
            if mm is not None:
                start = base + pos
                append(mm[start : start + n])
            else:
                append(bytes(data_view[pos + HEADER : pos + HEADER + n]))
            tail += need
        if out and self._gq[self._gi] != self._gv:  # after the copies (see _Ring.__init__)
            self._guard_failed()
        self._tail = tail
        if tail - self._released >= self._release_every and not self._views:
            self._publish_tail()
        return out

    take_many = _fast("_c_take_many", _take_many_py)

    def try_recv_view(self, kind: int = KIND_DATA) -> memoryview | None:
        """The next message as a read-only view into the ring (zero copy), or None. The view
        stays valid until :meth:`release`, which frees every view handed out so far."""
        if type(kind) is not int:
            kind = self._int(kind, "record kind")
        if kind != KIND_DATA and kind != KIND_ARRAY:
            raise UsageError(
                f"channel {self.name!r}: record kind {kind!r} is neither KIND_DATA nor KIND_ARRAY"
            )
        view = self._take_view(kind)
        if view is None and self._tail != self._released and not self._views:
            self._publish_tail()
        return view

    def _take_view_py(self, kind: int = KIND_DATA) -> memoryview | None:
        """try_recv_view() without giving space back on empty (see :meth:`_take`)."""
        if self._closed:
            self._refuse_closed()
        tail = self._tail
        if tail == self._head and self._read_head() == tail:
            return None
        pos = tail & self._mask
        word = self._q[_DATA_WORD + (pos >> 3)]
        n = word & _LEN_MASK
        need = (n + 15) & -8
        if (
            word >> _KIND_SHIFT != kind
            or need > self._head - tail
            or pos + need > self.capacity
            or need > self.capacity >> 1
        ):
            rec = self._next()  # re-reads and validates, raising on corruption
            if rec is None:  # pragma: no cover - _head only grows, so a record is there
                return None
            got, start, n = rec
            if got != kind:
                self._unexpected(got, kind)
            tail = self._tail
            need = (n + 15) & -8
            pos = start - HEADER
        view = self._rodata[pos + HEADER : pos + HEADER + n]
        if self._gq[self._gi] != self._gv:  # see _Ring.__init__, the guard
            view.release()
            self._guard_failed()
        self._views.append(view)
        self._tail = tail + need
        return view

    _take_view = _fast("_c_take_view", _take_view_py)

    def _refuse_closed(self) -> None:
        raise ChannelClosedError(f"channel {self.name!r} is closed")

    def _unexpected(self, got: int, wanted: int) -> None:
        names = {KIND_DATA: "bytes", KIND_ARRAY: "array"}
        raise UnexpectedMessageError(
            f"channel {self.name!r}: the next message is {names.get(got, got)}, not "
            f"{names.get(wanted, wanted)}; receive it with the matching call"
        )

    def _release_py(self) -> None:
        """Give back every message received so far: views handed out are revoked now, and the
        space returns to the sender in batches (every eighth of the ring, whenever the ring
        is found empty, and before this end waits), which saves a fence and a cache-line
        transfer per message. The sender can never be starved by it: a full ring means at
        most an eighth of it is consumed-but-unpublished, the rest is unread data."""
        views = self._views
        if views:
            for view in views:
                try:
                    view.release()
                except BufferError:
                    pass  # exported (numpy array): cannot be revoked; the caller promised
            views.clear()
        if self._tail - self._released >= self._release_every:
            self._publish_tail()

    release = _fast("_c_release", _release_py)

    def _publish_tail_py(self) -> None:
        """Store the tail, then ring the sender if it sleeps waiting for space."""
        tail = self._tail
        if tail == self._released or self._views:
            return
        if self._gq[self._gi] != self._gv:
            self._guard_failed()
        q = self._q
        q[R_TAIL] = tail
        self._released = tail
        if q[S_VECTOR] != NO_VECTOR:  # a sender that never sleeps needs no wake-up (flush)
            _acquire()  # StoreLoad fence: tail store before the load of the sender's wait word
            _release()
            wait = q[S_WAIT]
            if wait & 1 and wait != self._notified:
                self._notified = wait
                self._wake_sender(q[S_VECTOR])

    _publish_tail = _fast("_c_publish_tail", _publish_tail_py)

    def _wake_sender(self, vector: int) -> None:
        """Ring the sender's doorbell (channel.py overrides)."""

    @property
    def available(self) -> int:
        """Bytes published by the sender and not yet received (reads head once)."""
        self._check_broken()
        return self._read_head() - self._tail

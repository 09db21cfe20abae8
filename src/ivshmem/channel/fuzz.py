"""Shared-memory fuzzing of channels: a hostile peer scribbles while honest peers talk.

Every peer of an ivshmem region can write every byte of it, so the channel layer promises
only what it can keep against such a peer: a channel whose memory is garbage raises
:class:`~ivshmem.channel.ChannelCorrupted` naming the channel and the field, and nothing
worse happens - no crash, no hang, no access outside that channel's memory, no effect on
other channels. This module checks that promise with real processes on real shared memory,
and is what ``tests/test_channel_fuzz.py`` and ``benchmarks/soak_channel.py`` run::

    python -m ivshmem.channel.fuzz --seconds 60              # plain region (memfd)
    python -m ivshmem.channel.fuzz --seconds 60 --server S   # host peers of a running server
                                                             # (started with --format -n 2)

**One round** (forked processes, about ``round_seconds`` long):

* a *receiver* process opens two channels from a *sender* process: ``fz``, which is
  attacked, and ``ctl``, which is not; the sender streams self-verifying messages on both
  (bytes, zero-copy views or numpy arrays, chosen per round; random sizes, bursts, pauses;
  a hot window per round, the whole ring or a small part of it, so that early WRAP markers
  and the tail reads deciding them are under attack too: :attr:`FuzzConfig.windows`);
* a *hostile* process (an ordinary peer: a plain-region user, or a host peer connected to
  the server) writes into ``fz``'s area only: random bytes, "interesting" values of the
  control words (indices moved by a record, rewound, odd wait words, absurd vectors),
  mutated record headers at the reader's position, flipped payload bytes. Some rounds are
  left unattacked, as controls.

**What is checked** (any violation is a *failure*; see :attr:`FuzzReport.failures`):

* every exception from a channel call is one the API documents for it (ChannelTimeout,
  ChannelClosedError, ChannelCorrupted naming *this* channel, UnexpectedMessageError);
  anything else, or a process killed by a signal, is a *crash*; a call that overruns its
  timeout by seconds, or a process that never reports, is a *hang*;
* ``ctl``, and ``fz`` in unattacked rounds, deliver every message in order and intact;
* every message accepted by the application was really sent (a BLAKE2 digest, a per-round
  channel tag and a sequence number: payload bytes are not the channel's to vouch for - a
  peer that can write the ring can change them - so corruption there is *detected by the
  application*, and counted as such);
* **memory outside the channel.** Writes: the parent copies every byte of the region outside
  the two channel areas once all channels are open, and compares after the round; only the
  channel ends and the hostile process run meanwhile, and the hostile process writes only
  inside ``fz``, so a difference is an honest process writing outside its channels. Reads
  *and* writes: after opening its channels, each honest process ``mprotect``-s its own
  mapping of the region to ``PROT_NONE`` everywhere except the pages of its channel areas
  (read-write) and the membership table (read-only: liveness, and the check before every
  write that the peer still holds its slot, read it); an access anywhere else kills that
  process with SIGSEGV, reported as an out-of-area access with the Python traceback
  (``faulthandler``). Zero-copy views and arrays handed to the application are also checked
  to lie inside the channel's data area;
* a channel that raised ChannelCorrupted stays broken: the next call on that end must raise
  it again.

**What this cannot prove.** Page granularity: the rest of the last page of a channel's
area (padding, unused by anybody) is not protected. Only code paths the fuzzer reaches are
checked; a bug that needs a peculiar interleaving may stay hidden (the soak mode runs
longer). The hostile process's own accesses are not checked (it is the attacker), and
memory of the *hostile* writes landing outside ``fz`` is ruled out by construction, not by
measurement. Nothing here shows the payload was not changed after the application copied
it, which is the application's business (copy, then verify).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import hashlib
import json
import mmap
import multiprocessing
import os
import random
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ..endpoint import Endpoint, open_region
from ..errors import UsageError
from ..memory import SharedMemory
from .channel import Receiver, Sender
from .errors import (
    ChannelClosedError,
    ChannelCorrupted,
    ChannelError,
    ChannelTimeout,
    UnexpectedMessageError,
)
from .layout import Membership, Region, find_channel, format_region
from .ring import (
    CTRL_SIZE,
    KIND_ARRAY,
    KIND_DATA,
    KIND_WRAP,
    NO_VECTOR,
    R_FLAGS,
    R_TAIL,
    R_VECTOR,
    R_WAIT,
    S_FLAGS,
    S_HEAD,
    S_VECTOR,
    S_WAIT,
    max_payload,
)

__all__ = [
    "FuzzConfig",
    "FuzzReport",
    "HostileWriter",
    "MessageCodec",
    "confine",
    "main",
    "run_fuzz",
]

#: Channel roles of one round: ``fz`` is attacked, ``ctl`` never is.
ATTACKED, CONTROL = "fz", "ctl"
KINDS = ("bytes", "views", "arrays")
STYLES = ("single", "burst", "storm")
#: Hang catchers: a channel call may overrun its own timeout by this much before it is a hang,
#: and a child may report this long after the round's end.
HANG_SLACK = 5.0
REPORT_SLACK = 15.0
RECV_TIMEOUT = 0.25
SEND_TIMEOUT = 0.5

_PROT_NONE, _PROT_READ, _PROT_RW = 0, mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE
_FORK = multiprocessing.get_context("fork")


# -- self-verifying messages -----------------------------------------------------------------


class MessageCodec:
    """Messages that prove themselves: ``seq | body length | tag | body | BLAKE2b-128``.

    ``tag`` is random per channel per round, so a stale message (left in the ring's memory by
    an earlier round, or from another channel) is told apart from a current one."""

    HEAD = struct.Struct("<QII")
    DIGEST = 16
    MIN = HEAD.size + DIGEST

    def __init__(self, tag: int) -> None:
        self.tag = tag

    def encode(self, seq: int, size: int) -> bytes:
        body_len = max(size, self.MIN) - self.MIN
        head = self.HEAD.pack(seq, body_len, self.tag)
        body = (seq.to_bytes(8, "little") * (body_len // 8 + 1))[:body_len]
        return head + body + hashlib.blake2b(head + body, digest_size=self.DIGEST).digest()

    def check(self, data: bytes) -> tuple[str, int]:
        """(verdict, seq): verdict ``ok``, or what is wrong: ``length``, ``digest``, ``tag``."""
        if len(data) < self.MIN:
            return "length", -1
        seq, body_len, tag = self.HEAD.unpack_from(data)
        if body_len != len(data) - self.MIN:
            return "length", -1
        digest = hashlib.blake2b(data[: -self.DIGEST], digest_size=self.DIGEST).digest()
        if digest != data[-self.DIGEST :]:
            return "digest", -1
        if tag != self.tag:
            return "tag", seq
        return "ok", seq


# -- confinement: an out-of-area access becomes SIGSEGV --------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mprotect.restype = ctypes.c_int


def base_address(memory: memoryview) -> int:
    """The address of a writable buffer's first byte in this process."""
    probe = ctypes.c_char.from_buffer(memory)  # a buffer export: dropped at once below
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def view_address(view: Any) -> int:
    """The address of any buffer's first byte (read-only views too; needs numpy)."""
    import numpy as np

    return int(np.frombuffer(view, np.uint8).ctypes.data)


def _pages(extent: tuple[int, int]) -> tuple[int, int]:
    off, length = extent
    start = off // mmap.PAGESIZE * mmap.PAGESIZE
    end = -(-(off + length) // mmap.PAGESIZE) * mmap.PAGESIZE
    return start, end


def _mprotect(base: int, start: int, end: int, prot: int) -> None:
    if end > start and _libc.mprotect(base + start, end - start, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect({start:#x}..{end:#x}, {prot}): {os.strerror(err)}")


@contextlib.contextmanager
def confine(
    memory: memoryview,
    writable: Sequence[tuple[int, int]],
    readable: Sequence[tuple[int, int]] = (),
) -> Iterator[None]:
    """Make this process's mapping of the region inaccessible except ``writable`` extents
    (region ``(offset, length)``, rounded out to pages) and read-only ``readable`` ones; put
    everything back to read-write afterwards. Any access outside kills the process with
    SIGSEGV (enable :mod:`faulthandler` to see where)."""
    size = len(memory)
    base = base_address(memory)
    if base % mmap.PAGESIZE:
        raise UsageError("confine() needs the start of a page-aligned mapping")
    prot = bytearray([_PROT_NONE]) * (size // mmap.PAGESIZE)
    for level, extents in ((_PROT_READ, readable), (_PROT_RW, writable)):
        for extent in extents:
            start, end = _pages(extent)
            for page in range(start // mmap.PAGESIZE, min(end, size) // mmap.PAGESIZE):
                prot[page] = max(prot[page], level)
    runs: list[tuple[int, int, int]] = []
    for page, level in enumerate(prot):
        if runs and runs[-1][2] == level and runs[-1][1] == page * mmap.PAGESIZE:
            runs[-1] = (runs[-1][0], (page + 1) * mmap.PAGESIZE, level)
        else:
            runs.append((page * mmap.PAGESIZE, (page + 1) * mmap.PAGESIZE, level))
    try:
        for start, end, level in runs:
            _mprotect(base, start, end, level)
        yield
    finally:
        _mprotect(base, 0, size - size % mmap.PAGESIZE, _PROT_RW)


# -- the hostile writer ----------------------------------------------------------------------

_CONTROL_WORDS = {
    "head": S_HEAD, "sender wait": S_WAIT, "sender vector": S_VECTOR, "sender flags": S_FLAGS,
    "tail": R_TAIL, "receiver wait": R_WAIT, "receiver vector": R_VECTOR,
    "receiver flags": R_FLAGS,
}  # fmt: skip
MODES = ("word", "record", "bytes", "payload")
_MODE_WEIGHTS = (40, 25, 20, 15)


class HostileWriter:
    """Writes garbage into one channel area of a region, the way a hostile peer could.

    ``memory`` is the hostile peer's own mapping of the region; ``offset``/``size`` the
    channel's area. Every write is logged (the last ``log_size``) so a failure can be
    replayed by hand. :meth:`strike` makes one write of a random :data:`MODES` kind."""

    def __init__(
        self, memory: memoryview, offset: int, size: int, rng: random.Random, log_size: int = 64
    ) -> None:
        self.area = memory[offset : offset + size]
        self.offset = offset
        self.q = self.area[: size - size % 8].cast("Q")
        self.capacity = size - CTRL_SIZE
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self.log: deque[str] = deque(maxlen=log_size)

    def _write(self, mode: str, at: int, data: bytes) -> None:
        self.area[at : at + len(data)] = data
        self.counts[mode] += 1
        self.log.append(f"{mode} +{at:#x} {data.hex()}")

    def _store_word(self, mode: str, index: int, value: int) -> None:
        # One aligned 8-byte store, as an index update would be: the victim sees old or new.
        self.q[index] = value & 0xFFFFFFFFFFFFFFFF
        self.counts[mode] += 1
        self.log.append(f"{mode} word[{index}] = {value & 0xFFFFFFFFFFFFFFFF:#x}")

    def _interesting(self, current: int, name: str) -> int:
        rng, cap = self.rng, self.capacity
        choices = [
            current + 8 * rng.randint(1, 64), current - 8 * rng.randint(1, 64),
            current + cap, current - cap, current + 1, current ^ (1 << rng.randrange(64)),
            0, (1 << 64) - 1, 1 << 63, rng.getrandbits(64), current | 1,
        ]  # fmt: skip
        if "vector" in name:
            choices += [0, 1, 3, 0xFFFF, 0x10000, NO_VECTOR, rng.randrange(1 << 16)]
        if "flags" in name:
            choices += [1, 2, 0xFF]
        if "wait" in name:
            choices += [current + 2 | 1, current + 1000 | 1]
        return int(rng.choice(choices))

    def _records(self) -> list[int]:
        """Positions (in data) of records between the reader's tail and the head, walked
        best-effort from the headers as they are now (bounded)."""
        mask = self.capacity - 1
        tail, head = self.q[R_TAIL], self.q[S_HEAD]
        positions: list[int] = []
        cursor = tail
        for _ in range(32):
            if not 0 <= head - cursor <= self.capacity or cursor == head:
                break
            pos = cursor & mask
            positions.append(pos)
            word = self.q[CTRL_SIZE // 8 + pos // 8]
            if word >> 32 == KIND_WRAP:
                cursor += self.capacity - pos
                continue
            length = word & 0xFFFFFFFF
            step = (length + 15) & ~7
            if step > self.capacity:
                break
            cursor += step
        return positions or [tail & mask]

    def strike(self, mode: str | None = None) -> str:
        """One hostile write; returns its mode."""
        rng = self.rng
        mode = mode or rng.choices(MODES, _MODE_WEIGHTS)[0]
        size = len(self.area)
        if mode == "word":
            name = rng.choice(list(_CONTROL_WORDS))
            index = _CONTROL_WORDS[name]
            self._store_word(f"word:{name}", index, self._interesting(self.q[index], name))
            return mode
        if mode == "record":
            pos = rng.choice(self._records())
            index = CTRL_SIZE // 8 + pos // 8
            word = self.q[index]
            length, kind = word & 0xFFFFFFFF, word >> 32
            if kind == KIND_ARRAY and rng.random() < 0.5 and pos + 24 <= self.capacity:
                # The array header (ndim, dtype length, dtype code, shape) of the payload.
                at = CTRL_SIZE + pos + 8 + rng.randrange(16)
                garbage = bytes(rng.choice([0, 1, 2, 31, 32, 33, 255, rng.randrange(256)])
                                for _ in range(rng.randint(1, 8)))  # fmt: skip
                self._write("record:array header", at, garbage[: size - at])
                return mode
            which = rng.randrange(3)
            if which == 0:
                kind = rng.choice([0, KIND_DATA, KIND_ARRAY, KIND_WRAP, 4, 0xFFFFFFFF])
            elif which == 1:
                length = rng.choice([
                    0, length + 8, length - 8, length + 1, self.capacity, self.capacity // 2,
                    0xFFFFFFFF, rng.getrandbits(32), rng.randrange(self.capacity),
                ]) & 0xFFFFFFFF  # fmt: skip
            else:
                length, kind = rng.getrandbits(32), rng.getrandbits(32)
            self._store_word("record:header", index, length | kind << 32)
            return mode
        if mode == "payload":
            pos = rng.choice(self._records())
            at = CTRL_SIZE + pos + 8 + rng.randrange(64)
            if at >= size:
                at = CTRL_SIZE + rng.randrange(self.capacity)
            data = rng.randbytes(rng.randint(1, 16))
            self._write("payload", at, data[: size - at])
            return mode
        at = rng.randrange(size)
        data = rng.randbytes(rng.randint(1, 64))
        self._write("bytes", at, data[: size - at])
        return mode


# -- configuration and report ----------------------------------------------------------------


@dataclass
class FuzzConfig:
    """What :func:`run_fuzz` does. ``seconds`` of rounds of ``round_seconds`` each."""

    seconds: float = 10.0
    round_seconds: float = 1.0
    #: Run exactly this many rounds instead (``seconds`` is then ignored).
    rounds: int | None = None
    seed: int | None = None
    #: Ring capacity of both channels (small: wrap-around and full rings happen often).
    capacity: int = 4096
    #: Hot windows to draw from per round (ring.py, set_window): ``None`` is the default (the
    #: whole 4 KiB ring), a smaller one makes the sender start over at 0 early whenever the
    #: receiver keeps up, so early WRAP markers and the tail reads that decide them are under
    #: attack too.
    windows: Sequence[int | None] = (None, 1024, 512)
    #: Message kinds to draw from per round.
    kinds: Sequence[str] = KINDS
    #: Share of rounds with no attack at all (controls: ``fz`` must then be perfect).
    unattacked: float = 0.15
    #: Attack styles to draw from: one write, a burst of 2..20, or a storm (a write every few
    #: milliseconds for most of the round).
    styles: Sequence[str] = ("single", "burst", "burst", "storm")
    #: ``None``: a plain region (a memfd the driver creates). Else the socket of a running
    #: ivshmem-server started with ``--format`` and at least 2 vectors (``-n 2``).
    server: str | None = None
    vectors: int = 2
    region_size: int = 1 << 20
    #: Confine the honest processes with mprotect (see the module docstring).
    confine: bool = True
    #: Print one line per round to stderr.
    verbose: bool = False


@dataclass
class FuzzReport:
    """Counts over all rounds. ``failures`` lists every violation with what to replay."""

    backend: str = "plain"
    seed: int = 0
    rounds: int = 0
    attacked_rounds: int = 0
    seconds: float = 0.0
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    verified: Counter[str] = field(default_factory=Counter)
    hostile_writes: Counter[str] = field(default_factory=Counter)
    #: Corruption noticed, by who and how: ``receiver ChannelCorrupted/<field>``,
    #: ``sender ChannelCorrupted/<field>``, ``application <what>``, ``receiver
    #: UnexpectedMessageError`` ...
    detected: Counter[str] = field(default_factory=Counter)
    #: How the receiving end of the attacked channel finished its rounds.
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    out_of_area_writes: int = 0
    out_of_area_views: int = 0
    #: ChannelCorrupted raised, yet the next call on that end did not raise it again.
    not_sticky: int = 0
    control_failures: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, kind: str, text: str) -> None:
        if kind == "crash":
            self.crashes += 1
        elif kind == "hang":
            self.hangs += 1
        elif kind == "write":
            self.out_of_area_writes += 1
        elif kind == "view":
            self.out_of_area_views += 1
        elif kind == "sticky":
            self.not_sticky += 1
        else:
            self.control_failures += 1
        self.failures.append(text)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = dict(sorted(value.items())) if isinstance(value, Counter) else value
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        """A human-readable summary."""
        lines = [
            f"channel fuzz ({self.backend}, seed {self.seed}): {self.rounds} rounds "
            f"({self.attacked_rounds} attacked) in {self.seconds:.1f} s",
        ]
        for ch in (ATTACKED, CONTROL):
            lines.append(
                f"  {ch:>3}: sent {self.sent[ch]:>9}  received {self.received[ch]:>9}  "
                f"verified {self.verified[ch]:>9}"
            )
        lines.append(f"  hostile writes: {sum(self.hostile_writes.values())}")
        for key, n in sorted(self.hostile_writes.items()):
            lines.append(f"    {key:<40} {n:>9}")
        lines.append(f"  corruption detected: {sum(self.detected.values())}")
        for key, n in sorted(self.detected.items()):
            lines.append(f"    {key:<56} {n:>7}")
        lines.append("  attacked receiver outcomes: " + ", ".join(
            f"{k} {n}" for k, n in sorted(self.outcomes.items())))  # fmt: skip
        lines.append(f"  crashes                 {self.crashes:>6}  (must be 0)")
        lines.append(f"  hangs                   {self.hangs:>6}  (must be 0)")
        lines.append(f"  out-of-area writes      {self.out_of_area_writes:>6}  (must be 0)")
        lines.append(f"  out-of-area views       {self.out_of_area_views:>6}  (must be 0)")
        lines.append(f"  broken, then not broken {self.not_sticky:>6}  (must be 0)")
        lines.append(f"  other failures          {self.control_failures:>6}  (must be 0)")
        for text in self.failures[:20]:
            lines.append("  FAILURE: " + text.replace("\n", "\n    "))
        return "\n".join(lines)


# -- the processes of one round --------------------------------------------------------------


@dataclass
class _Plan:
    """What the parent decided for one round (sent to every child)."""

    round: int
    seed: int
    kind: str
    attacked: bool
    style: str  # "single", "burst", "storm"
    tags: dict[str, int]
    capacity: int
    window: int | None = None
    start: float = 0.0  # monotonic (CLOCK_MONOTONIC is system-wide on Linux)
    end: float = 0.0
    ids: dict[str, int] = field(default_factory=dict)
    areas: dict[str, tuple[int, int]] = field(default_factory=dict)
    readonly: list[tuple[int, int]] = field(default_factory=list)
    confine: bool = True


def _open_endpoint(spec: tuple[Any, ...], role: str) -> Endpoint:
    if spec[0] == "plain":
        _, fd, ids = spec
        return open_region(fd, id=ids[role])
    from ..peer import connect

    _, path, vectors = spec
    return connect(path, vectors=vectors)


def _label_of(err: BaseException) -> str:
    if isinstance(err, ChannelCorrupted):
        return f"ChannelCorrupted/{err.field}"
    return type(err).__name__


def _crash_text(who: str, err: BaseException) -> str:
    tb = "".join(traceback.format_exception(err))
    return f"{who}: {type(err).__name__}: {err}\n{tb}"


class _End:
    """Results of one channel end (one thread)."""

    def __init__(self) -> None:
        self.count = 0
        self.verified = 0
        self.detected: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.outcome = "running"
        self.failures: list[tuple[str, str]] = []
        self.max_overrun = 0.0

    def timed(self, started: float, timeout: float) -> None:
        overrun = time.monotonic() - started - timeout
        self.max_overrun = max(self.max_overrun, overrun)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "verified": self.verified, "detected": dict(self.detected),
            "errors": dict(self.errors), "outcome": self.outcome, "failures": self.failures,
            "max_overrun": self.max_overrun,
        }  # fmt: skip


def _receive(rx: Receiver, plan: _Plan, channel: str, bounds: tuple[int, int] | None,
             rng: random.Random) -> _End:  # fmt: skip
    """The receiving loop of one channel, until the sender closes it, the channel breaks,
    or the round is long over. Never raises."""
    res = _End()
    codec = MessageCodec(plan.tags[channel])
    expected = 0
    hard_end = plan.end + 2.0
    slow = rng.random() < 0.3  # some rounds the receiver lags, so the ring fills up
    while True:
        if time.monotonic() > hard_end:
            res.outcome = "stalled"
            return res
        started = time.monotonic()
        try:
            if plan.kind == "bytes":
                data = rx.recv(timeout=RECV_TIMEOUT)
            elif plan.kind == "views":
                view = rx.recv_view(timeout=RECV_TIMEOUT)
                _check_bounds(res, bounds, view, len(view), "view")
                data = bytes(view)  # copy once, then verify the copy
                del view
                rx.release()
            else:
                arr = rx.recv_array(timeout=RECV_TIMEOUT)
                _check_bounds(res, bounds, arr, arr.nbytes, "array")
                if arr.dtype.str != "<u4" or arr.ndim != 1:
                    res.detected[f"application array {arr.dtype.str} {arr.shape}"] += 1
                data = arr.tobytes()
                del arr
                rx.release()
        except ChannelTimeout:
            res.timed(started, RECV_TIMEOUT)
            continue
        except ChannelClosedError:
            res.outcome = "closed"
            return res
        except ChannelCorrupted as err:
            res.errors[_label_of(err)] += 1
            res.outcome = "corrupted"
            if err.channel != rx.name:
                res.failures.append(("control", f"receiver of {rx.name!r} raised {err}"))
            _check_sticky(res, err, lambda: rx.try_recv_view(KIND_ARRAY if plan.kind ==
                                                              "arrays" else KIND_DATA))  # fmt: skip
            return res
        except UnexpectedMessageError as err:
            res.errors[_label_of(err)] += 1
            res.outcome = "unexpected kind"
            return res
        except Exception as err:
            res.errors[_label_of(err)] += 1
            res.outcome = "crashed"
            res.failures.append(("crash", _crash_text(f"receiver of {rx.name!r}", err)))
            return res
        res.timed(started, RECV_TIMEOUT)
        res.count += 1
        verdict, seq = codec.check(data)
        if verdict != "ok":
            res.detected[f"application {verdict}"] += 1
        elif seq == expected:
            res.verified += 1
            expected += 1
        elif seq < expected:
            res.detected["application replayed sequence"] += 1
        else:
            res.detected["application sequence gap"] += 1
            res.verified += 1
            expected = seq + 1
        if slow and rng.random() < 0.05:
            time.sleep(rng.random() * 0.005)


def _check_sticky(res: _End, err: ChannelCorrupted, call: Any) -> None:
    """ChannelCorrupted promises the channel stays broken: the next call must raise it again
    (and not, say, carry on with the next message as if nothing had happened)."""
    try:
        result = call()
    except ChannelCorrupted:
        return
    except ChannelError as again:
        result = again
    except Exception as again:
        res.failures.append(("crash", _crash_text("the call after ChannelCorrupted", again)))
        return
    res.failures.append((
        "sticky", f"after {err} the next call gave {result!r:.80} instead of raising "
        "ChannelCorrupted again (the channel was not left broken)",
    ))  # fmt: skip


def _check_bounds(res: _End, bounds: tuple[int, int] | None, buf: Any, n: int, what: str) -> None:
    if bounds is None or n == 0:
        return
    start = view_address(buf)
    if not (bounds[0] <= start and start + n <= bounds[1]):
        res.failures.append((
            "view", f"{what} of {n} bytes at {start:#x} is outside the channel's data "
            f"{bounds[0]:#x}..{bounds[1]:#x}",
        ))  # fmt: skip


def _send(tx: Sender, plan: _Plan, channel: str, rng: random.Random) -> _End:
    """The sending loop of one channel until the round ends; then close. Never raises."""
    res = _End()
    codec = MessageCodec(plan.tags[channel])
    limit = max_payload(plan.capacity)
    seq = 0
    np: Any = None
    if plan.kind == "arrays":
        import numpy

        np = numpy
    try:
        while time.monotonic() < plan.end:
            size = rng.choice([MessageCodec.MIN, rng.randint(MessageCodec.MIN, limit - 64)])
            if plan.kind == "arrays":
                size = size // 4 * 4
                array = np.frombuffer(codec.encode(seq, size), "<u4")
            else:
                message = codec.encode(seq, size)
            started = time.monotonic()
            try:
                if plan.kind == "arrays":
                    tx.send_array(array, timeout=SEND_TIMEOUT)
                else:
                    batch = rng.random() < 0.2
                    tx.send(message, timeout=SEND_TIMEOUT, flush=not batch)
                    if batch and rng.random() < 0.5:
                        tx.flush()
            except ChannelTimeout:
                res.timed(started, SEND_TIMEOUT)
                res.errors["ChannelTimeout"] += 1
                continue
            res.timed(started, SEND_TIMEOUT)
            seq += 1
            res.count = seq
            if rng.random() < 0.02:
                time.sleep(rng.random() * 0.003)
        res.outcome = "finished"
    except ChannelClosedError as err:
        res.errors[_label_of(err)] += 1
        res.outcome = "closed by receiver"
    except ChannelCorrupted as err:
        res.errors[_label_of(err)] += 1
        res.outcome = "corrupted"
        if err.channel != tx.name:
            res.failures.append(("control", f"sender of {tx.name!r} raised {err}"))
        _check_sticky(res, err, lambda: tx.try_send(b"after corruption"))
    except Exception as err:
        res.errors[_label_of(err)] += 1
        res.outcome = "crashed"
        res.failures.append(("crash", _crash_text(f"sender of {tx.name!r}", err)))
    try:
        tx.close()
    except ChannelCorrupted as err:  # close() rings a sleeping receiver on its own vector word
        res.errors[f"close {_label_of(err)}"] += 1
        if err.channel != tx.name:
            res.failures.append(("control", f"sender of {tx.name!r} raised {err}"))
    except Exception as err:
        res.failures.append(("crash", _crash_text(f"closing sender of {tx.name!r}", err)))
    return res


def _child(role: str, conn: Connection, spec: tuple[Any, ...], crash_log: str) -> None:
    """Body of one forked process: ``receiver``, ``sender`` or ``hostile``."""
    with open(crash_log, "w") as log:
        faulthandler.enable(log, all_threads=True)
        try:
            ep = _open_endpoint(spec, role)
        except BaseException as err:
            conn.send(("error", _crash_text(f"{role} connecting", err)))
            return
        try:
            conn.send(("id", ep.id))
            _play(role, conn, ep)
        except BaseException as err:
            with contextlib.suppress(Exception):
                conn.send(("error", _crash_text(role, err)))
        finally:
            with contextlib.suppress(Exception):
                ep.close()


def _play(role: str, conn: Connection, ep: Endpoint) -> None:
    plan: _Plan = conn.recv()
    rng = random.Random(f"{plan.seed}-{plan.round}-{role}")
    doorbell = ep.vectors > 0
    names = (ATTACKED, CONTROL)

    def vector(i: int) -> int | None:
        return i if doorbell else None

    if role == "receiver":
        rxs = {
            ch: Receiver(ep, ch, plan.ids["sender"], capacity=plan.capacity, vector=vector(i))
            for i, ch in enumerate(names)
        }
        if plan.window is not None:
            for rx in rxs.values():
                rx.set_window(plan.window)
        region = Region(ep)
        slot = Membership(region).snapshot().entries[ep.id].slot
        areas: dict[str, tuple[int, int]] = {}
        for ch in names:
            entry = find_channel(region, slot, ch, plan.ids["sender"], ep.id)
            assert entry is not None
            areas[ch] = (entry.offset, entry.size)
        conn.send(("areas", areas))
        plan = conn.recv()
        base = base_address(ep.memory)
        bounds = {
            ch: (base + off + CTRL_SIZE, base + off + size) for ch, (off, size) in areas.items()
        }
        results = _run_threads(
            ep, plan, lambda ch: _receive(rxs[ch], plan, ch, bounds[ch], _rng(plan, role, ch))
        )
        for rx in rxs.values():
            with contextlib.suppress(Exception):
                rx.close()  # may ring a garbage vector: counted by the checks above already
        conn.send(("report", results))
    elif role == "sender":
        txs = {
            ch: Sender(ep, ch, plan.ids["receiver"], vector=vector(i)) for i, ch in enumerate(names)
        }
        if plan.window is not None:
            for tx in txs.values():
                tx.set_window(plan.window)
        conn.send(("ready", None))
        plan = conn.recv()
        results = _run_threads(ep, plan, lambda ch: _send(txs[ch], plan, ch, _rng(plan, role, ch)))
        conn.send(("report", results))
    else:
        plan = conn.recv()
        off, size = plan.areas[ATTACKED]
        writer = HostileWriter(ep.memory, off, size, rng)
        _attack(writer, plan, rng)
        conn.send(("report", {"writes": dict(writer.counts), "log": list(writer.log)}))
    conn.recv()  # "bye": the parent has compared the memory


def _rng(plan: _Plan, role: str, channel: str) -> random.Random:
    return random.Random(f"{plan.seed}-{plan.round}-{role}-{channel}")


def _run_threads(ep: Endpoint, plan: _Plan, body: Any) -> dict[str, Any]:
    """Run ``body(channel)`` for both channels in threads, confined to the channel areas."""
    results: dict[str, Any] = {}

    def run(ch: str) -> None:
        try:
            results[ch] = body(ch).as_dict()
        except BaseException as err:  # pragma: no cover - the loops catch everything
            results[ch] = {"failures": [("crash", _crash_text(ch, err))]}

    while time.monotonic() < plan.start:
        time.sleep(0.001)
    threads = [threading.Thread(target=run, args=(ch,)) for ch in (ATTACKED, CONTROL)]
    guard = (
        confine(ep.memory, list(plan.areas.values()), plan.readonly)
        if plan.confine
        else contextlib.nullcontext()
    )
    with guard:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def _attack(writer: HostileWriter, plan: _Plan, rng: random.Random) -> None:
    if not plan.attacked:
        return
    span = plan.end - plan.start
    first = plan.start + span * rng.uniform(0.02, 0.6)
    last = plan.start + span * 0.75
    while time.monotonic() < first:
        time.sleep(0.001)
    if plan.style == "single":
        writer.strike()
        return
    strikes = rng.randint(2, 20) if plan.style == "burst" else 1 << 30
    for _ in range(strikes):
        if time.monotonic() >= last:
            break
        writer.strike()
        pause = rng.random() * (0.002 if plan.style == "burst" else 0.01)
        if pause > 0.0005:
            time.sleep(pause)


# -- the parent ------------------------------------------------------------------------------


class _Round:
    """One round's processes and the parent's side of their conversation."""

    def __init__(self, spec: tuple[Any, ...], workdir: str, number: int) -> None:
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Connection] = {}
        self.logs: dict[str, str] = {}
        for role in ("receiver", "sender", "hostile"):
            mine, theirs = _FORK.Pipe()
            log = os.path.join(workdir, f"round{number}-{role}.log")
            proc = _FORK.Process(target=_child, args=(role, theirs, spec, log), daemon=True)
            proc.start()
            theirs.close()
            self.procs[role], self.conns[role], self.logs[role] = proc, mine, log

    def expect(self, role: str, what: str, deadline: float) -> Any:
        conn = self.conns[role]
        proc = self.procs[role]
        while not conn.poll(0.05):
            if not proc.is_alive():
                proc.join()
                raise _ChildDied(role, self._death(role))
            if time.monotonic() > deadline:
                raise _ChildHung(role, f"{role} sent no {what!r} in time")
        try:
            kind, value = conn.recv()
        except EOFError:
            proc.join(5)
            raise _ChildDied(role, self._death(role)) from None
        if kind == "error":
            raise _ChildDied(role, value)
        if kind != what:
            raise _ChildDied(role, f"{role} sent {kind!r}, expected {what!r}")
        return value

    def _death(self, role: str) -> str:
        proc = self.procs[role]
        code = proc.exitcode
        try:
            with open(self.logs[role]) as f:
                log = f.read()
        except OSError:
            log = ""
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        if code is not None and -code == 11:
            how += " (SIGSEGV: an access outside the channel areas while confined)"
        return f"{role} process died ({how})\n{log}"

    def send_all(self, value: Any) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.send(value)

    def finish(self) -> None:
        self.send_all("bye")
        for role, proc in self.procs.items():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            self.conns[role].close()
            with contextlib.suppress(OSError):
                os.unlink(self.logs[role])


class _ChildDied(Exception):
    def __init__(self, role: str, text: str) -> None:
        self.role = role
        super().__init__(text)


class _ChildHung(_ChildDied):
    pass


def _outside(memory: memoryview, excluded: Sequence[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """Copies of every byte of the region outside the excluded extents: (offset, bytes)."""
    out = []
    cursor = 0
    for off, length in sorted(excluded):
        if off > cursor:
            out.append((cursor, bytes(memory[cursor:off])))
        cursor = max(cursor, off + length)
    if cursor < len(memory):
        out.append((cursor, bytes(memory[cursor:])))
    return out


def _compare(memory: memoryview, before: list[tuple[int, bytes]]) -> list[str]:
    changed = []
    for off, old in before:
        new = bytes(memory[off : off + len(old)])
        if new != old:
            first = next(i for i in range(len(old)) if old[i] != new[i])
            last = max(i for i in range(len(old)) if old[i] != new[i])
            changed.append(
                f"bytes {off + first:#x}..{off + last:#x} changed (e.g. at {off + first:#x}: "
                f"{old[first : first + 8].hex()} -> {new[first : first + 8].hex()})"
            )
    return changed


def run_fuzz(config: FuzzConfig) -> FuzzReport:
    """Run rounds as :class:`FuzzConfig` says and return the counts (module docstring)."""
    seed = config.seed if config.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(seed)
    report = FuzzReport(backend="server" if config.server else "plain", seed=seed)
    for kind in config.kinds:
        if kind not in KINDS:
            raise UsageError(f"message kind {kind!r} is not one of {KINDS}")
    for style in config.styles:
        if style not in STYLES:
            raise UsageError(f"attack style {style!r} is not one of {STYLES}")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ivshmem-fuzz-"))
        observer: Endpoint
        if config.server is None:
            shm = SharedMemory.memfd(config.region_size, "ivshmem-fuzz")
            observer = stack.enter_context(open_region(shm, id=0))
            spec: tuple[Any, ...] = ("plain", shm.fd, _PLAIN_IDS)
        else:
            from ..peer import connect

            observer = stack.enter_context(connect(config.server, vectors=config.vectors))
            spec = ("server", config.server, config.vectors)
        number = 0
        while True:
            if config.rounds is not None:
                if number >= config.rounds:
                    break
            elif time.monotonic() - started >= config.seconds:
                break
            _one_round(config, spec, observer, workdir, number, rng, seed, report)
            number += 1
            if config.verbose:
                print(
                    f"round {number}: fz {report.verified[ATTACKED]} verified, "
                    f"{sum(report.detected.values())} detections, "
                    f"{len(report.failures)} failures",
                    file=sys.stderr,
                )
    report.seconds = time.monotonic() - started
    return report


_PLAIN_IDS = {"receiver": 2, "sender": 1, "hostile": 3}


def _one_round(
    config: FuzzConfig, spec: tuple[Any, ...], observer: Endpoint, workdir: str, number: int,
    rng: random.Random, seed: int, report: FuzzReport,
) -> None:  # fmt: skip
    attacked = rng.random() >= config.unattacked
    plan = _Plan(
        round=number, seed=seed, kind=rng.choice(list(config.kinds)), attacked=attacked,
        style=rng.choice(list(config.styles)),
        tags={ATTACKED: rng.getrandbits(32), CONTROL: rng.getrandbits(32)},
        capacity=config.capacity, window=rng.choice(list(config.windows)),
    )  # fmt: skip
    where = (
        f"round {number} (seed {seed}, {report.backend}, kind {plan.kind}, "
        f"{plan.style if attacked else 'unattacked'}, window {plan.window or 'full'})"
    )
    memory = observer.memory
    if spec[0] == "plain":
        format_region(memory, max_peers=4, peers=sorted(_PLAIN_IDS.values()))
    deadline = time.monotonic() + 20.0
    rnd = _Round(spec, workdir, number)
    results: dict[str, Any] = {}
    try:
        for role in rnd.conns:
            plan.ids[role] = rnd.expect(role, "id", deadline)
        if spec[0] == "server":
            # The table must list exactly this round's peers (earlier rounds' leaves
            # processed) before memory is compared: the server writes it on every change.
            want = {observer.id, *plan.ids.values()}
            membership = Membership(memory)
            while membership.peers() != want:
                if time.monotonic() > deadline:
                    raise _ChildHung("server", f"membership never became {sorted(want)}")
                _ = observer.peers  # reads the server's announcements
                time.sleep(0.005)
        rnd.send_all(plan)  # set-up: the receiver creates the channels, the sender finds them
        plan.areas = rnd.expect("receiver", "areas", deadline)
        rnd.expect("sender", "ready", deadline)
        region = Region(memory)
        header = region._header
        plan.readonly = [(header.membership_offset, header.membership_size)]
        plan.confine = config.confine
        before = _outside(memory, list(plan.areas.values()))
        plan.start = time.monotonic() + 0.02
        plan.end = plan.start + config.round_seconds
        rnd.send_all(plan)
        report_deadline = plan.end + 2.0 + REPORT_SLACK
        for role in ("hostile", "sender", "receiver"):
            results[role] = rnd.expect(role, "report", report_deadline)
        for text in _compare(memory, before):
            report.fail("write", f"{where}: an honest process wrote outside its channels: {text}")
    except _ChildHung as err:
        report.fail("hang", f"{where}: {err}")
    except _ChildDied as err:
        report.fail("crash", f"{where}: {err}")
    finally:
        rnd.finish()
    report.rounds += 1
    report.attacked_rounds += attacked
    if len(results) == 3:
        _account(report, plan, results, where)


def _account(report: FuzzReport, plan: _Plan, results: dict[str, Any], where: str) -> None:
    hostile = results["hostile"]
    report.hostile_writes.update(hostile["writes"])
    replay = "\n    ".join(hostile["log"][-16:])
    for ch in (ATTACKED, CONTROL):
        tx, rx = results["sender"][ch], results["receiver"][ch]
        report.sent[ch] += tx.get("count", 0)
        report.received[ch] += rx.get("count", 0)
        report.verified[ch] += rx.get("verified", 0)
        for side, res in (("sender", tx), ("receiver", rx)):
            for kind, text in res.get("failures", []):
                report.fail(kind, f"{where}: {ch}: {text}\n  last hostile writes:\n    {replay}")
            if res.get("max_overrun", 0.0) > HANG_SLACK:
                report.fail("hang", f"{where}: {ch}: a {side} call overran its timeout by "
                            f"{res['max_overrun']:.1f} s")  # fmt: skip
        clean = ch == CONTROL or not plan.attacked
        if clean:
            problems = []
            if rx.get("outcome") != "closed" or tx.get("outcome") != "finished":
                problems.append(f"ended {tx.get('outcome')}/{rx.get('outcome')}")
            if rx.get("verified") != tx.get("count") or rx.get("count") != tx.get("count"):
                problems.append(
                    f"sent {tx.get('count')}, received {rx.get('count')}, verified "
                    f"{rx.get('verified')}"
                )
            if (
                rx.get("detected")
                or rx.get("errors")
                or tx.get("errors", {}).keys() - {"ChannelTimeout"}
            ):
                problems.append(f"errors {tx.get('errors')} / {rx.get('errors')} / "
                                f"{rx.get('detected')}")  # fmt: skip
            if problems:
                what = "the control channel" if ch == CONTROL else "an unattacked channel"
                report.fail("control", f"{where}: {what} misbehaved: {'; '.join(problems)}")
            continue
        outcome = rx.get("outcome", "?")
        if outcome == "closed" and rx.get("verified", 0) < tx.get("count", 0):
            # Payloads changed, records skipped, or a forged close flag, which looks like the
            # sender's own close: the receiver stops early, the sender learns it later.
            outcome = "closed with fewer verified than sent"
        report.outcomes[outcome] += 1
        # A send that raised ChannelCorrupted may still have published its message (the
        # receiver's vector word is read after publishing, to ring it): one extra is allowed.
        extra = 1 if tx.get("outcome") == "corrupted" else 0
        if rx.get("verified", 0) > tx.get("count", 0) + extra:
            report.fail("control", f"{where}: more messages verified than were sent")
        for key, n in rx.get("errors", {}).items():
            report.detected[f"receiver {key}"] += n
        for key, n in rx.get("detected", {}).items():
            report.detected[key] += n
        for key, n in tx.get("errors", {}).items():
            if key != "ChannelTimeout":
                report.detected[f"sender {key}"] += n
        if rx.get("outcome") == "stalled":
            report.detected["receiver stalled (the attack stopped the stream; timeouts held)"] += 1


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivshmem.channel.fuzz",
        description="Fuzz channels: a hostile process scribbles over a channel's shared "
        "memory while honest processes send and receive; prints what was detected and "
        "fails (exit 1) on any crash, hang or access outside the channel.",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    parser.add_argument(
        "--server", metavar="SOCKET", default=None,
        help="use host peers of this running server (started with --format -n 2 or more)",
    )  # fmt: skip
    parser.add_argument("--vectors", type=int, default=2, help="the server's -n (default 2)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    config = FuzzConfig(
        seconds=args.seconds, round_seconds=args.round_seconds, seed=args.seed,
        server=args.server, vectors=args.vectors, verbose=args.verbose,
    )  # fmt: skip
    report = run_fuzz(config)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

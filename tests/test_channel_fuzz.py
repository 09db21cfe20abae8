"""A hostile peer writes garbage over a channel's shared memory: receivers and senders never
crash, never touch memory outside their channel, and report the corruption.

Three layers, from the most exact to the most realistic:

* a table of single, known corruptions, each of which must raise ChannelCorrupted naming the
  channel and the field, leave the channel broken, and leave a neighbour channel working;
* a Hypothesis state machine in one process: sends, receives (bytes, views, arrays) and
  hostile writes interleaved in any order Hypothesis likes, checked against a model of the
  ring (exact while nobody has scribbled, "only documented errors and in-bounds results"
  after); it shrinks a failure to the shortest sequence of steps;
* the fuzz driver (:mod:`ivshmem.channel.fuzz`) with real processes on real shared memory -
  a plain region and host peers of a real ``ivshmem-server`` - where the honest processes
  are ``mprotect``-confined to their channel areas (see that module's docstring for exactly
  what this proves about reads and writes outside the channel, and what it cannot).

The fuzz seed is random per run and printed on failure; replay with
``python -m ivshmem.channel.fuzz --seed N`` (``benchmarks/soak_channel.py`` for long runs).
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import random
import signal
import struct
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import (
    ChannelClosedError,
    ChannelCorrupted,
    ChannelTimeout,
    Receiver,
    Sender,
    UnexpectedMessageError,
    format_region,
)
from ivshmem.channel.fuzz import (
    ATTACKED,
    CONTROL,
    FuzzConfig,
    HostileWriter,
    MessageCodec,
    confine,
    run_fuzz,
    view_address,
)
from ivshmem.channel.layout import Membership, Region, find_channel
from ivshmem.channel.ring import (
    CTRL_SIZE,
    KIND_WRAP,
    R_TAIL,
    R_VECTOR,
    R_WAIT,
    S_HEAD,
    S_VECTOR,
    S_WAIT,
    max_payload,
)
from ivshmem.endpoint import EventfdEndpoint
from ivshmem.errors import PeersUnknownError, UnknownPeerError, UnknownVectorError
from ivshmem.memory import SharedMemory

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")
CAP = 1024  # small rings: wrap-around and full rings within a few messages


def _seed() -> int:
    return int(os.environ.get("IVSHMEM_FUZZ_SEED") or random.SystemRandom().getrandbits(32))


# -- the detectors themselves work -----------------------------------------------------------


def _confined_child(memory: memoryview, action: Callable[[], object]) -> int:
    """Run ``action`` in a forked child confined to pages 2..3 (read-write) and page 1
    (read-only); return its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        faulthandler.disable()  # the SIGSEGV is expected: no dump into the test's output
        try:
            with confine(memory, [(2 * 4096, 2 * 4096)], [(4096, 4096)]):
                action()
            memory[0] = 1  # put back: usable again
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_confinement_turns_an_access_outside_the_channel_into_sigsegv() -> None:
    with ivshmem.open_region(SharedMemory.memfd(1 << 16)) as ep:
        mem = ep.memory

        def inside() -> None:
            mem[2 * 4096 : 4 * 4096] = bytes(2 * 4096)
            assert bytes(mem[4096:4104]) == bytes(8)

        def store(offset: int) -> Callable[[], object]:
            def do() -> None:
                mem[offset] = 1

            return do

        assert _confined_child(mem, inside) == 0
        assert _confined_child(mem, lambda: bytes(mem[0:8])) == -signal.SIGSEGV  # read
        assert _confined_child(mem, lambda: bytes(mem[4 * 4096 : 4 * 4096 + 1])) == -signal.SIGSEGV
        assert _confined_child(mem, store(4096)) == -signal.SIGSEGV  # read-only page
        assert _confined_child(mem, store(5 * 4096)) == -signal.SIGSEGV


def test_message_codec_notices_any_change() -> None:
    codec = MessageCodec(tag=7)
    message = codec.encode(41, 100)
    assert codec.check(message) == ("ok", 41)
    assert MessageCodec(tag=8).check(message) == ("tag", 41)
    for i in range(len(message)):
        bad = bytearray(message)
        bad[i] ^= 0x40
        assert codec.check(bytes(bad))[0] != "ok", i
    assert codec.check(message[:-1])[0] == "length"


# -- known corruptions: named, sticky, contained ---------------------------------------------


class DoorbellEndpoint(EventfdEndpoint):
    """A region plus real eventfd doorbells, one vector per peer (``doorbells[peer]``), so
    the channels' wake-up paths run - they read the other side's wait and vector words,
    which a hostile peer can write. Like a guest, it cannot know who is connected."""

    def __init__(self, fd: int, id: int, doorbells: dict[int, int]) -> None:
        self._region = ivshmem.open_region(fd, id=id)
        self._doorbells = doorbells
        self._id = id

    @property
    def id(self) -> int:
        return self._id

    @property
    def size(self) -> int:
        return self._region.size

    @property
    def memory(self) -> memoryview:
        return self._region.memory

    @property
    def vectors(self) -> int:
        return 1

    @property
    def peers(self) -> frozenset[int]:
        raise PeersUnknownError("a guest-like endpoint: liveness comes from the table")

    def notify(self, peer: int, vector: int = 0) -> None:
        if peer not in self._doorbells:
            raise UnknownPeerError(peer, frozenset(self._doorbells))
        if vector != 0:
            raise UnknownVectorError(vector, 1, peer)
        os.eventfd_write(self._doorbells[peer], 1)

    def _own_fds(self) -> list[int]:
        return [self._doorbells[self._id]]

    @property
    def closed(self) -> bool:
        return self._region.closed

    def close(self) -> None:
        self._region.close()


class Pair:
    """Peers 1 (sender) and 2 (receiver) of a region with eventfd doorbells, channels ``fz``
    and ``ctl``, and the region as peer 3 (the hostile one) sees it."""

    def __init__(self) -> None:
        shm = SharedMemory.memfd(256 << 10)
        fd = shm.fd
        self.doorbells = {p: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for p in (1, 2)}
        self.hostile = ivshmem.open_region(shm, id=3)
        format_region(self.hostile, max_peers=3, peers=[1, 2, 3])
        self.a = DoorbellEndpoint(fd, 1, self.doorbells)
        self.b = DoorbellEndpoint(fd, 2, self.doorbells)
        # Two ends of one process block on one eventfd here, so keep waits short.
        opts: dict[str, Any] = {"timeout": 2, "liveness_interval": 0.02}
        self.rx = Receiver(self.b, "fz", sender=1, capacity=CAP, **opts)
        self.tx = Sender(self.a, "fz", receiver=2, **opts)
        self.ctl_rx = Receiver(self.b, "ctl", sender=1, capacity=CAP, **opts)
        self.ctl_tx = Sender(self.a, "ctl", receiver=2, **opts)
        region = Region(self.hostile)
        slot = Membership(region).snapshot().entries[2].slot
        entry = find_channel(region, slot, "fz", 1, 2)
        assert entry is not None
        self.offset, self.size = entry.offset, entry.size
        self.q = self.hostile.memory[self.offset : self.offset + self.size].cast("Q")
        self.data = self.hostile.memory[self.offset + CTRL_SIZE : self.offset + self.size]

    def record_word(self, pos: int) -> int:
        return int(self.q[CTRL_SIZE // 8 + pos // 8])

    def set_record_word(self, pos: int, value: int) -> None:
        self.q[CTRL_SIZE // 8 + pos // 8] = value

    def close(self) -> None:
        for end in (self.rx, self.tx, self.ctl_rx, self.ctl_tx):
            with contextlib.suppress(Exception):
                end.close()
        for ep in (self.a, self.b, self.hostile):
            ep.close()
        for fd in self.doorbells.values():
            os.close(fd)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def _fill(tx: Sender, size: int = 8) -> int:
    """Fill the ring to the last byte (16-byte records divide it)."""
    n = 0
    while tx.try_send(bytes(size)):
        n += 1
    return n


def _rewind_head(p: Pair) -> str:
    p.tx.send(b"one")
    p.tx.send(b"two")
    assert p.rx.recv() == b"one"  # the receiver has now seen the head past both
    assert p.rx.recv() == b"two"
    p.q[S_HEAD] -= 8
    p.rx.recv()
    return "unreachable"


def _misaligned_head(p: Pair) -> str:
    p.tx.send(b"one")
    p.q[S_HEAD] += 4
    p.rx.recv()
    return "unreachable"


def _head_beyond_capacity(p: Pair) -> str:
    p.q[S_HEAD] = CAP + 8
    p.rx.recv()
    return "unreachable"


def _bad_record_kind(p: Pair) -> str:
    p.tx.send(b"hello")
    p.set_record_word(0, p.record_word(0) & 0xFFFFFFFF | 7 << 32)
    p.rx.recv()
    return "unreachable"


def _record_longer_than_published(p: Pair) -> str:
    p.tx.send(b"hello")
    p.set_record_word(0, 1 << 31 | 1 << 32)
    p.rx.recv()
    return "unreachable"


def _wrap_at_zero(p: Pair) -> str:
    p.tx.send(b"hello")
    p.set_record_word(0, KIND_WRAP << 32)
    p.rx.recv()
    return "unreachable"


def _tail_beyond_head(p: Pair) -> str:
    _fill(p.tx)
    p.q[R_TAIL] = p.q[S_HEAD] + 8
    p.tx.send(b"x", timeout=1)
    return "unreachable"


def _tail_backwards(p: Pair) -> str:
    _fill(p.tx)
    while p.rx.try_recv() is not None:
        pass  # the receiver gives the space back once the ring is empty
    assert p.q[R_TAIL] > 0
    _fill(p.tx)
    p.q[R_TAIL] -= 8
    p.tx.send(b"x", timeout=1)
    return "unreachable"


def _array_ndim(p: Pair) -> str:
    p.tx.send_array(np.arange(4, dtype="<u4"))
    p.data[8] = 200  # ndim
    p.rx.recv_array()
    return "unreachable"


def _array_object_dtype(p: Pair) -> str:
    p.tx.send_array(np.arange(4, dtype="<u8"))
    p.data[8 + 2 : 8 + 5] = b"|O8"
    p.rx.recv_array()
    return "unreachable"


def _array_shape(p: Pair) -> str:
    p.tx.send_array(np.arange(4, dtype="<u4"))
    p.data[8 + 16 : 8 + 24] = struct.pack("<Q", 1 << 40)
    p.rx.recv_array()
    return "unreachable"


def _sender_vector(p: Pair) -> str:
    for i in range(3):
        p.tx.send(bytes([i]) * 300)
    p.q[S_VECTOR] = 7  # the sender "sleeps" on a vector it does not have
    p.q[S_WAIT] = 101
    for _ in range(3):
        p.rx.recv()  # the receiver gives space back and rings the sender
    return "unreachable"


def _receiver_vector(p: Pair) -> str:
    p.q[R_VECTOR] = 1 << 20  # the receiver "sleeps" on an impossible vector
    p.q[R_WAIT] = 101
    p.tx.send(b"ring me")
    return "unreachable"


CORRUPTIONS: dict[str, tuple[Callable[[Pair], str], str, str]] = {
    # name: (what to do, which end notices, the field it names)
    "head rewound": (_rewind_head, "rx", "head"),
    "head misaligned": (_misaligned_head, "rx", "head"),
    "head beyond the ring": (_head_beyond_capacity, "rx", "head"),
    "record kind": (_bad_record_kind, "rx", "record"),
    "record length": (_record_longer_than_published, "rx", "record"),
    "wrap at zero": (_wrap_at_zero, "rx", "record"),
    "tail beyond head": (_tail_beyond_head, "tx", "tail"),
    "tail backwards": (_tail_backwards, "tx", "tail"),
    "array ndim": (_array_ndim, "rx", "array header"),
    "array object dtype": (_array_object_dtype, "rx", "array dtype"),
    "array shape": (_array_shape, "rx", "array shape"),
    "sender's vector word": (_sender_vector, "rx", "vector"),
    "receiver's vector word": (_receiver_vector, "tx", "vector"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_known_corruption_is_named_sticky_and_contained(pair: Pair, case: str) -> None:
    action, end_name, field = CORRUPTIONS[case]
    end: Any = pair.rx if end_name == "rx" else pair.tx
    with pytest.raises(ChannelCorrupted) as info:
        action(pair)
    assert info.value.channel == end.name == "fz (1->2)"
    assert info.value.field == field
    assert "fz (1->2)" in str(info.value) and repr(field) in str(info.value)
    # Broken for good: every later call says so again, at once.
    with pytest.raises(ChannelCorrupted):
        if end_name == "rx":
            pair.rx.recv(timeout=5)
        else:
            pair.tx.send(b"again", timeout=5)
    # The neighbour channel between the same two peers is untouched.
    for i in range(50):
        pair.ctl_tx.send(i.to_bytes(4, "little") * 20)
        assert pair.ctl_rx.recv(timeout=5) == i.to_bytes(4, "little") * 20


# -- Hypothesis: any interleaving of honest calls and hostile writes -------------------------

_WORDS = {"head": S_HEAD, "tail": R_TAIL, **{f"word{i}": i for i in (1, 2, 3, 17, 18, 19)}}
_RX_ERRORS = (ChannelCorrupted, UnexpectedMessageError, ChannelTimeout, ChannelClosedError)
_TX_ERRORS = (ChannelCorrupted, ChannelTimeout, ChannelClosedError)


class ChannelUnderAttack(RuleBasedStateMachine):
    """Peers 1 -> 2 with doorbells, peer 3 scribbling. The model (``pending``) is exact
    until the first hostile write; after it, only documented errors, results that fit the
    ring, views inside the data area, and sticky breakage are required. Memory outside the
    channel's area never changes (the honest ends are the only other writers)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = Pair()
        self.codec = MessageCodec(tag=0xF00D)
        self.pending: deque[tuple[str, bytes]] = deque()  # published, not yet received
        self.unpublished: list[tuple[str, bytes]] = []
        self.seq = 0
        self.touched = False
        self.rx_broken = self.tx_broken = False
        self.rx_gone = False  # closed, and a new one could not be opened
        mem = self.p.hostile.memory
        self.outside = (
            bytes(mem[: self.p.offset]),
            bytes(mem[self.p.offset + self.p.size :]),
        )
        base = view_address(self.p.b.memory)
        self.bounds = (base + self.p.offset + CTRL_SIZE, base + self.p.offset + self.p.size)

    def teardown(self) -> None:
        self.p.close()

    # -- honest calls ------------------------------------------------------------------

    def _tx_call(self, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except _TX_ERRORS as err:
            assert self.touched or isinstance(err, ChannelTimeout), f"clean channel: {err!r}"
            if isinstance(err, ChannelCorrupted):
                assert err.channel == self.p.tx.name
                self.tx_broken = True
            return None
        assert not self.tx_broken, "a broken sender accepted a call"
        return result

    @rule(size=st.integers(0, max_payload(CAP)), flush=st.booleans())
    def send(self, size: int, flush: bool) -> None:
        message = self.codec.encode(self.seq, size)
        if len(message) > max_payload(CAP):
            message = self.codec.encode(self.seq, max_payload(CAP))
        if self._tx_call(lambda: self.p.tx.try_send(message, flush)):
            self.seq += 1
            self.unpublished.append(("bytes", message))
            if flush:
                self._published()

    @rule(words=st.integers(0, 60))
    def send_array(self, words: int) -> None:
        array = np.arange(self.seq, self.seq + words, dtype="<u4")

        def call() -> bool:
            self.p.tx.send_array(array, timeout=0)
            return True

        sent = self._tx_call(call)
        if sent:
            self.seq += 1
            self.unpublished.append(("array", array.tobytes()))
        self._published()  # sent, or it waited for room: both publish what was committed

    @rule()
    def flush(self) -> None:
        # Not held to "broken stays broken": flush() only publishes what was committed
        # before (nothing, once a send has failed). It may ring the receiver, and so find a
        # scribbled vector word.
        try:
            self.p.tx.flush()
        except ChannelCorrupted as err:
            assert self.touched and err.channel == self.p.tx.name, repr(err)
            self.tx_broken = True
        self._published()

    def _published(self) -> None:
        self.pending.extend(self.unpublished)
        self.unpublished.clear()

    def _rx_call(self, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except _RX_ERRORS as err:
            if not self.touched:
                assert isinstance(err, ChannelTimeout) and not self.pending, repr(err)
            if isinstance(err, ChannelCorrupted):
                assert err.channel == self.p.rx.name
                self.rx_broken = True
            else:
                assert not self.rx_broken, f"broken receiver raised {err!r}"
            return None
        assert not self.rx_broken, f"a broken receiver returned {result!r}"
        return result

    def _release(self) -> None:
        """Give the space back; this may ring the sender, so it may find its vector word
        scribbled (ChannelCorrupted). Not held to "broken stays broken": it only stores our
        own tail."""
        try:
            self.p.rx.release()
        except ChannelCorrupted as err:
            assert self.touched and err.channel == self.p.rx.name, repr(err)
            self.rx_broken = True

    def _expect(self, kind: str, got: bytes | None) -> None:
        if self.touched:
            if got is not None:
                assert len(got) <= max_payload(CAP)
            return
        if not self.pending:
            assert got is None
            return
        want_kind, want = self.pending[0]
        assert want_kind == kind
        assert got == want
        self.pending.popleft()

    def _next_kind(self, data: st.DataObject) -> str:
        if self.pending and not self.touched:
            return self.pending[0][0]
        return data.draw(st.sampled_from(["bytes", "array"]))

    @precondition(lambda self: not self.rx_gone)
    @rule(data=st.data(), zero_copy=st.booleans())
    def receive(self, data: st.DataObject, zero_copy: bool) -> None:
        if self._next_kind(data) == "array":
            arr = self._rx_call(lambda: self.p.rx.recv_array(timeout=0))
            if arr is None:
                self._expect("array", None)
                return
            self._in_bounds(arr, arr.nbytes)
            got = arr.tobytes()
            del arr
            self._release()
            self._expect("array", got)
        elif zero_copy:
            view = self._rx_call(self.p.rx.try_recv_view)
            if view is not None:
                self._in_bounds(view, len(view))
                got = bytes(view)
                self._release()
                with pytest.raises(ValueError):
                    bytes(view)  # released views are revoked
                self._expect("bytes", got)
            elif not self.rx_broken:
                self._expect("bytes", None)
        else:
            got = self._rx_call(self.p.rx.try_recv)
            if got is not None or not self.rx_broken:
                self._expect("bytes", got)

    def _in_bounds(self, buf: Any, n: int) -> None:
        if n:
            start = view_address(buf)
            assert self.bounds[0] <= start and start + n <= self.bounds[1]

    # -- hostile writes ----------------------------------------------------------------

    @rule(word=st.sampled_from(sorted(_WORDS)), delta=st.integers(-2 * CAP, 2 * CAP),
          absolute=st.none() | st.integers(0, 2**64 - 1))  # fmt: skip
    def scribble_word(self, word: str, delta: int, absolute: int | None) -> None:
        index = _WORDS[word]
        value = absolute if absolute is not None else (self.p.q[index] + delta) % 2**64
        self.p.q[index] = value
        self.touched = True

    @rule(which=st.integers(0, 7), word=st.integers(0, 2**64 - 1))
    def scribble_record(self, which: int, word: int) -> None:
        writer = HostileWriter(self.p.hostile.memory, self.p.offset, self.p.size, random.Random())
        records = writer._records()
        self.p.set_record_word(records[which % len(records)], word)
        self.touched = True

    @rule(offset=st.integers(0, CAP + CTRL_SIZE - 1), data=st.binary(min_size=1, max_size=32))
    def scribble_bytes(self, offset: int, data: bytes) -> None:
        area = self.p.hostile.memory[self.p.offset : self.p.offset + self.p.size]
        chunk = data[: self.p.size - offset]
        area[offset : offset + len(chunk)] = chunk
        self.touched = True

    @precondition(lambda self: self.touched)
    @rule()
    def reopen_receiver(self) -> None:
        """A new receiver object on the scribbled channel validates what it finds."""
        if not self.rx_gone:
            self.p.rx.close()
        try:
            self.p.rx = Receiver(self.p.b, "fz", sender=1, capacity=CAP, timeout=2)
            self.rx_broken = self.rx_gone = False
        except ChannelCorrupted as err:
            assert err.channel == "fz (1->2)"
            self.rx_gone = True

    @invariant()
    def nothing_outside_the_channel_changed(self) -> None:
        mem = self.p.hostile.memory
        assert bytes(mem[: self.p.offset]) == self.outside[0]
        assert bytes(mem[self.p.offset + self.p.size :]) == self.outside[1]


ChannelUnderAttack.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChannelUnderAttack = ChannelUnderAttack.TestCase


# -- real processes: the fuzz driver ---------------------------------------------------------


def _check(config: FuzzConfig) -> None:
    report = run_fuzz(config)
    text = report.format()
    assert report.ok, f"replay with --seed {report.seed}\n{text}"
    # Not vacuous: honest traffic flowed on both channels, the attack happened and was seen.
    assert report.verified[CONTROL] > 100 and report.verified[ATTACKED] > 100, text
    assert report.attacked_rounds > 0 and sum(report.hostile_writes.values()) > 10, text
    assert sum(report.detected.values()) > 0, text
    assert report.crashes == report.hangs == report.out_of_area_writes == 0


def test_fuzz_plain_region() -> None:
    _check(FuzzConfig(rounds=10, round_seconds=0.5, seed=_seed(), styles=("burst", "storm")))


def test_fuzz_host_peers_of_a_real_server(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=2, extra_args=["--format"]) as server:
        _check(
            FuzzConfig(
                rounds=8,
                round_seconds=0.5,
                seed=_seed(),
                server=server.socket_path,
                styles=("burst", "storm"),
            )
        )

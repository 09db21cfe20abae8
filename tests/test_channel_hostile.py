"""Shared memory is untrusted: a peer scribbling over a channel can only ever cause
ChannelCorrupted, never a crash of another kind, a hang, or an access outside the channel.

Property tests drive both ends of a ring over a buffer with canary zones around the channel's
area while a "hostile writer" overwrites random control words and data; a cross-process test
does the same with a real second process scribbling concurrently.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivshmem
from ivshmem.channel import (
    ChannelClosedError,
    ChannelCorrupted,
    ChannelTimeout,
    Receiver,
    RegionCorrupted,
    Sender,
    UnexpectedMessageError,
    format_region,
    layout,
)
from ivshmem.channel import ring as ringmod
from ivshmem.channel.channel import _decode_array, _encode_array_header
from ivshmem.channel.ring import RingReceiver, RingSender, init_area

CAPACITY = 1024
AREA = ringmod.CTRL_SIZE + CAPACITY
GUARD = 4096
CANARY = 0xA5

# Interesting values for a liar: around the real counters, aligned and not, huge.
_WORDS = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 4 * CAPACITY),
    st.sampled_from([2**63, 2**64 - 8, 2**32 - 1, 2**32, CAPACITY, CAPACITY - 8]),
)
# Record headers: real kinds with arbitrary lengths, and anything at all.
_HEADERS = st.one_of(
    st.builds(lambda kind, n: n | kind << 32, st.integers(0, 5), st.integers(0, 2 * CAPACITY)),
    st.integers(0, 2**64 - 1),
)

_honest_op = st.one_of(
    st.tuples(st.just("send"), st.integers(0, CAPACITY // 2 - 8)),
    st.tuples(st.just("send_array"), st.integers(0, 40)),
    st.tuples(st.just("send_many"), st.lists(st.integers(0, CAPACITY // 4), max_size=12)),
    st.tuples(st.just("recv"), st.sampled_from(["bytes", "view", "array", "release", "many"])),
)
_op = st.one_of(
    _honest_op,
    st.tuples(st.just("word"), st.integers(0, AREA // 8 - 1), _WORDS),
    st.tuples(st.just("control"), st.sampled_from([0, 1, 2, 3, 16, 17, 18, 19]), _WORDS),
    st.tuples(st.just("header"), st.integers(0, CAPACITY // 8 - 1), _HEADERS),
    st.tuples(st.just("bytes"), st.integers(0, AREA - 1), st.binary(min_size=1, max_size=32)),
)


class _Harness:
    """A ring in the middle of a guarded buffer; both ends see only the area's slice."""

    def __init__(self, window: int | None = None) -> None:
        self.buf = bytearray([CANARY]) * (GUARD + AREA + GUARD)
        self.mem = memoryview(self.buf)
        self.area = self.mem[GUARD : GUARD + AREA]
        init_area(self.area)
        self.words = self.area.cast("Q")
        self.tx = RingSender(self.area, "victim")
        self.rx = RingReceiver(self.area, "victim")
        if window is not None:  # a hot window smaller than the ring: early WRAPs happen
            self.tx.set_window(window)
            self.rx.set_window(window)
        base = np.frombuffer(self.area, np.uint8).__array_interface__["data"][0]
        self.lo, self.hi = base, base + AREA

    def guards_intact(self) -> bool:
        return (
            self.buf[:GUARD] == bytes([CANARY]) * GUARD
            and self.buf[GUARD + AREA :] == bytes([CANARY]) * GUARD
        )

    def inside(self, view: Any) -> bool:
        """True when the view's memory lies within the channel's area."""
        if len(view) == 0:
            return True
        addr = int(np.frombuffer(view, np.uint8).__array_interface__["data"][0])
        return bool(self.lo <= addr and addr + len(view) <= self.hi)


def _run(h: _Harness, ops: list[tuple[Any, ...]]) -> None:
    sent: list[bytes] = []
    got: list[bytes] = []
    tampered = False
    broken: set[str] = set()
    for op in ops:
        kind = op[0]
        try:
            if kind == "send":
                msg = bytes([len(sent) % 251]) * op[1]
                if h.tx.try_send(msg):
                    sent.append(msg)
            elif kind == "send_many":  # the batch path: many records, one publish
                batch = [bytes([(len(sent) + i) % 251]) * n for i, n in enumerate(op[1])]
                done = h.tx.try_send_many(batch)
                h.tx.flush()
                sent.extend(batch[:done])
            elif kind == "send_array":
                arr = np.arange(op[1], dtype="<i4")
                header = _encode_array_header(arr.dtype, arr.shape)
                view = h.tx.try_reserve(len(header) + arr.nbytes, ringmod.KIND_ARRAY)
                if view is not None:
                    view[: len(header)] = header
                    view[len(header) :] = arr.tobytes()
                    h.tx.commit()
                    sent.append(header + arr.tobytes())
            elif kind == "recv":
                if op[1] == "bytes":
                    m = h.rx.try_recv()
                    if m is not None:
                        assert len(m) <= CAPACITY // 2
                        got.append(m)
                elif op[1] == "view":
                    v = h.rx.try_recv_view()
                    if v is not None:
                        assert h.inside(v)
                        got.append(bytes(v))
                elif op[1] == "array":
                    v = h.rx.try_recv_view(ringmod.KIND_ARRAY)
                    if v is not None:
                        assert h.inside(v)
                        got.append(bytes(v))
                        try:  # the array header is payload: its lies break no ring state
                            a = _decode_array(v, "victim")
                        except ChannelCorrupted as err:
                            assert err.channel == "victim" and "array" in err.field
                        else:
                            if a.size:
                                assert h.inside(memoryview(a.view(np.uint8).reshape(-1)))
                            del a
                elif op[1] == "many":  # the batch path: one head read, one tail store
                    for m in h.rx.take_many(5):
                        assert len(m) <= CAPACITY // 2
                        got.append(m)
                else:
                    h.rx.release()
            else:
                tampered = True
                if kind in ("word", "control"):
                    h.words[op[1]] = op[2]
                elif kind == "header":
                    h.words[ringmod.CTRL_SIZE // 8 + op[1]] = op[2]
                else:
                    data = op[2][: AREA - op[1]]
                    h.area[op[1] : op[1] + len(data)] = data
        except ChannelCorrupted as err:
            assert err.channel == "victim" and err.field
            broken.add("rx" if kind == "recv" else "tx")
        except UnexpectedMessageError:
            pass  # a well-formed record of the other kind: left in place, a clear error
        assert h.guards_intact()
    # Broken stays broken: every later call raises ChannelCorrupted again.
    if "rx" in broken:
        with pytest.raises(ChannelCorrupted):
            h.rx.try_recv()
    if "tx" in broken:
        with pytest.raises(ChannelCorrupted):
            h.tx.try_send(b"x")
    if not tampered:
        # Without a liar, the ring is exact: everything received, in order, intact.
        assert not broken
        while True:
            try:
                m = h.rx.try_recv()
            except UnexpectedMessageError:
                v = h.rx.try_recv_view(ringmod.KIND_ARRAY)
                assert v is not None
                m = bytes(v)
            if m is None:
                break
            got.append(m)
        assert got == sent


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(_op, max_size=60))
@pytest.mark.parametrize("window", [None, 256, 100])
def test_hostile_writer_only_causes_channel_corrupted(
    window: int | None, ops: list[tuple[Any, ...]]
) -> None:
    _run(_Harness(window), ops)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(_honest_op, max_size=80))
@pytest.mark.parametrize("window", [None, 256, 100])
def test_honest_peers_get_everything_in_order(
    window: int | None, ops: list[tuple[Any, ...]]
) -> None:
    _run(_Harness(window), ops)


@settings(max_examples=500, deadline=None)
@given(payload=st.binary(max_size=200), ndim=st.integers(0, 40), code=st.binary(max_size=14))
def test_array_headers_from_a_liar(payload: bytes, ndim: int, code: bytes) -> None:
    head = bytes([ndim, len(code)]) + code.ljust(14, b"\0")
    for data in (payload, head + payload):
        try:
            arr = _decode_array(memoryview(data), "victim")
        except ChannelCorrupted:
            continue
        assert not arr.dtype.hasobject
        assert arr.nbytes <= len(data)


def test_object_dtypes_never_come_out() -> None:
    for code in (b"|O8", b"|O", b"<O8"):
        head = bytes([1, len(code)]) + code.ljust(14, b"\0") + (1).to_bytes(8, "little")
        data = head.ljust(32, b"\0") + bytes(8)
        with pytest.raises(ChannelCorrupted, match="dtype"):
            _decode_array(memoryview(data), "victim")


def test_wrap_marker_loops_are_bounded() -> None:
    h = _Harness()
    h.tx.try_send(bytes(100))
    h.rx.try_recv()
    # Claim a record exists, and make every position a WRAP marker: a reader that follows
    # markers without a bound would loop forever.
    for i in range(CAPACITY // 8):
        h.words[ringmod.CTRL_SIZE // 8 + i] = ringmod.KIND_WRAP << 32
    h.words[ringmod.S_HEAD] = h.rx._released + CAPACITY
    with pytest.raises(ChannelCorrupted, match="record"):
        h.rx.try_recv()


# -- a real second process scribbling -----------------------------------------------------------


def _scribble(path: str, offset: int, size: int, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    with ivshmem.open_region(path, id=9) as ep:
        area = ep.memory[offset : offset + size]
        words = area.cast("Q")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(200):
                r = rng.random()
                if r < 0.4:  # control words, with plausible lies
                    i = rng.choice([0, 1, 2, 3, 16, 17, 18, 19])
                    lie = rng.choice(
                        [rng.getrandbits(64), words[i] + 8 * rng.randrange(-4, 200), 0]
                    )
                    words[i] = lie % 2**64
                elif r < 0.7:  # record headers
                    i = ringmod.CTRL_SIZE // 8 + rng.randrange((size - ringmod.CTRL_SIZE) // 8)
                    words[i] = rng.randrange(6) << 32 | rng.randrange(size)
                else:  # payload bytes
                    j = rng.randrange(size - 16)
                    area[j : j + 16] = rng.randbytes(16)
            time.sleep(0.0005)


def test_receiver_survives_a_concurrent_scribbler(short_tmp: Path) -> None:
    path = str(short_tmp / "region")
    size = 1 << 20
    with ivshmem.open_region(path, id=1, size=size) as a, ivshmem.open_region(path, id=2) as b:
        region = format_region(a, max_peers=4, peers=[1, 2])
        canary = bytes(region.memory[0:4096])
        rx = Receiver(b, "target", sender=1, capacity=4096, spin=0, poll_interval=0.001)
        tx = Sender(a, "target", receiver=2)
        slot = layout.Membership(region).snapshot().entries[2].slot
        entry = layout.find_channel(region, slot, "target", 1, 2)
        assert entry is not None
        before = bytes(region.memory[entry.offset + entry.size : entry.offset + entry.size + 4096])
        child = multiprocessing.get_context("fork").Process(
            target=_scribble, args=(path, entry.offset, entry.size, 1.5, 3)
        )
        child.start()
        outcomes = {"message": 0, "corrupt": 0, "timeout": 0, "closed": 0, "reopen_refused": 0}

        def reopen(end: Callable[[], Any]) -> Any:
            """A new end for the channel (a closed one refuses every call), or None while
            the scribbled area makes opening it fail."""
            try:
                return end()
            except ChannelCorrupted:
                outcomes["reopen_refused"] += 1
                return None

        sender: Sender | None = tx
        receiver: Receiver | None = rx
        end = time.monotonic() + 1.5
        try:
            while time.monotonic() < end:
                if sender is None:
                    sender = reopen(lambda: Sender(a, "target", receiver=2))
                if sender is not None:
                    try:
                        sender.try_send(b"m" * random.randrange(300))
                    except ChannelCorrupted:
                        sender.close()
                        sender = reopen(lambda: Sender(a, "target", receiver=2))
                if receiver is None:
                    receiver = reopen(lambda: Receiver(b, "target", sender=1, spin=0))
                if receiver is None:
                    continue
                try:
                    try:
                        m = receiver.recv(timeout=0.005)
                        assert len(m) <= 2048
                        outcomes["message"] += 1
                    except UnexpectedMessageError:
                        # Consume the forged kind - which the scribbler may have changed
                        # again meanwhile, into something corrupt.
                        receiver.try_recv_view(ringmod.KIND_ARRAY)
                except ChannelTimeout:
                    outcomes["timeout"] += 1
                except ChannelClosedError:  # a scribbled "closed" flag: a clear error too
                    outcomes["closed"] += 1
                except ChannelCorrupted:
                    outcomes["corrupt"] += 1
                    receiver.close()
                    receiver = reopen(lambda: Receiver(b, "target", sender=1, spin=0))
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
        assert child.exitcode == 0
        assert outcomes["corrupt"] > 0, outcomes  # the liar was noticed
        # Nothing outside the channel's area was written by the victims.
        assert bytes(region.memory[0:4096]) == canary
        after = region.memory[entry.offset + entry.size : entry.offset + entry.size + 4096]
        assert bytes(after) == before


def test_array_header_with_a_zero_and_an_impossible_dimension() -> None:
    """The byte count passes (0 elements), but numpy cannot make the shape: still only
    ChannelCorrupted - and an honest empty array with a large dimension still decodes."""
    code = b"<f8"
    dims = (0, 2**63)
    head = bytes([len(dims), len(code)]) + code.ljust(14, b"\0")
    head += b"".join(d.to_bytes(8, "little") for d in dims)
    with pytest.raises(ChannelCorrupted, match="array shape"):
        _decode_array(memoryview(head), "victim")
    honest = _encode_array_header(np.dtype("<f8"), (0, 1000))
    assert _decode_array(memoryview(honest), "victim").shape == (0, 1000)


@pytest.mark.parametrize("reopened", ["same channel", "new channel"])
def test_a_forged_free_entry_is_never_laid_over_a_live_channel(
    short_tmp: Path, reopened: str
) -> None:
    """One 8-byte word marks a live directory entry FREE: the owner's next Receiver must not
    initialise a channel over the live one (its message in flight would be lost), and says
    which entry was forged instead."""
    path = str(short_tmp / "region")
    with ivshmem.open_region(path, id=1, size=1 << 20) as a, ivshmem.open_region(path, id=2) as b:
        region = format_region(a, max_peers=4, peers=[1, 2])
        rx = Receiver(b, "live", sender=1, capacity=4096, spin=0)
        tx = Sender(a, "live", receiver=2)
        tx.send(b"in flight")
        slot = layout.Membership(region).snapshot().entries[2].slot
        entry = layout.find_channel(region, slot, "live", 1, 2)
        assert entry is not None
        state = region.arena_offset(slot) + layout._A_ENTRIES + entry.index * 64
        state += layout._ENTRY_STATE
        region.memory[state : state + 8].cast("Q")[0] = layout._STATE_FREE  # the forgery
        area = bytes(region.memory[entry.offset : entry.offset + entry.size])
        name = "live" if reopened == "same channel" else "newcomer"
        with pytest.raises(RegionCorrupted, match=r"entry\[0\]") as info:
            Receiver(b, name, sender=1, capacity=4096, spin=0)
        assert info.value.where == f"arena {slot}"
        assert "live (1->2) is open" in str(info.value)
        assert bytes(region.memory[entry.offset : entry.offset + entry.size]) == area
        assert rx.recv(timeout=1) == b"in flight"  # still there, still ours
        tx.send(b"and the next")
        assert rx.recv(timeout=1) == b"and the next"
        rx.close()
        tx.close()

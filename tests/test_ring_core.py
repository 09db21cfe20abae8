"""The ring's optional C core (_ringcore.c) against its Python twins in ring.py.

The C core takes only the common case and hands everything else to the Python methods, so the
two must be indistinguishable: the same results, the same errors, the same bytes in shared
memory, under any sequence of honest calls and hostile writes. The differential property test
runs one op sequence on two rings - one with the C methods, one with the Python ones forced -
and compares after every step. (Both rings have the same C base when it is built; forcing the
Python methods on a subclass is exactly what ``IVSHMEM_PURE_PYTHON=1`` does for the whole
module, which scripts/test.sh also exercises by running the channel tests again that way.)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import require
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ringtwins import PyReceiver as _PyReceiver
from ringtwins import PySender as _PySender
from test_channel_hostile import AREA, CAPACITY, _op

from ivshmem.channel import ChannelCorrupted, UnexpectedMessageError
from ivshmem.channel import ring as ringmod
from ivshmem.channel.ring import RingReceiver, RingSender, init_area
from ivshmem.errors import UsageError

pytestmark = pytest.mark.skipif(
    not ringmod.ACCELERATED and not os.environ.get("CI"),
    reason="the C core is not built here (no compiler or Python headers at install time); "
    "the Python ring is tested by the other channel tests",
)


def test_the_c_core_is_built_and_used() -> None:
    require(
        ringmod.ACCELERATED,
        "the ring's C core did not build (pip install needs gcc and the Python headers)",
    )
    assert RingSender.try_send is not RingSender._try_send_py
    assert RingReceiver._take is not RingReceiver._take_py


def test_pure_python_can_be_forced() -> None:
    code = "import ivshmem.channel.ring as r; print(r.ACCELERATED, r.RingSender.try_send)"
    env = {**os.environ, "IVSHMEM_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("False <function RingSender._try_send_py")


class _Side:
    """One ring over an anonymous mapping (page-aligned, like a real region)."""

    def __init__(self, python: bool, window: int | None = None) -> None:
        self.mm = mmap.mmap(-1, AREA)
        self.area = memoryview(self.mm)
        init_area(self.area)
        self.words = self.area.cast("Q")
        self.tx: RingSender = (_PySender if python else RingSender)(self.area, "victim")
        self.rx: RingReceiver = (_PyReceiver if python else RingReceiver)(self.area, "victim")
        if window is not None:  # a hot window smaller than the ring: early WRAPs happen
            self.tx.set_window(window)
            self.rx.set_window(window)
        self.views: list[memoryview] = []

    def apply(self, op: tuple[Any, ...], step: int) -> Any:
        """Do ``op``; return what a caller could observe (values, or the error's kind)."""
        kind = op[0]
        try:
            if kind == "send":
                return self.tx.try_send(bytes([step % 251]) * op[1])
            if kind == "send_many":
                batch = [bytes([(step + i) % 251]) * n for i, n in enumerate(op[1])]
                done = self.tx.try_send_many(batch)
                self.tx.flush()
                return done
            if kind == "send_array":
                view = self.tx.try_reserve(op[1] * 4 + 16, ringmod.KIND_ARRAY)
                if view is None:
                    return None
                n = len(view)
                view[:] = bytes([step % 7]) * n
                self.tx.commit(n // 2 if op[1] % 3 == 0 else None)
                return n
            if kind == "recv":
                if op[1] == "bytes":
                    return self.rx.try_recv()
                if op[1] in ("view", "array"):
                    kind_ = ringmod.KIND_DATA if op[1] == "view" else ringmod.KIND_ARRAY
                    v = self.rx.try_recv_view(kind_)
                    return None if v is None else bytes(v)
                if op[1] == "many":
                    return self.rx.take_many(5)
                self.rx.release()
                return "released"
            if kind in ("word", "control"):
                self.words[op[1]] = op[2]
            elif kind == "header":
                self.words[ringmod.CTRL_SIZE // 8 + op[1]] = op[2]
            else:
                data = op[2][: AREA - op[1]]
                self.area[op[1] : op[1] + len(data)] = data
            return "written"
        except ChannelCorrupted as err:
            return ("corrupt", err.field)
        except UnexpectedMessageError:
            return "unexpected"

    def state(self) -> tuple[Any, ...]:
        tx, rx = self.tx, self.rx
        return (
            bytes(self.mm),
            (tx._head, tx._tail, tx._published, tx._notified, tx._limit, tx._window),
            (rx._head, rx._tail, rx._released, rx._notified, len(rx._views), rx._release_every),
            tx._broken is not None,
            rx._broken is not None,
        )


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(_op, max_size=60))
# Found by this test: the head lowered under a batch that already holds a message. Both twins
# deliver that message, and the next call reports the lie.
@example(ops=[("send", 0), ("send", 0), ("recv", "bytes"), ("word", 0, 0), ("recv", "many")])
# Early wraps (with the small windows): by send, by a reservation, each read by every receive
# call, and a tail that lies when the sender reads it at the window.
@example(
    ops=[
        *[("send", 100), ("send", 100), ("recv", "bytes"), ("recv", "bytes")] * 2,
        ("send_array", 20), ("recv", "array"), ("recv", "release"), ("send", 100),
        ("recv", "many"), ("send_many", [90, 90, 90]), ("recv", "view"), ("recv", "view"),
        ("recv", "release"), ("recv", "bytes"), ("send", 100), ("control", 16, 2**20),
        ("send", 200), ("send", 200),
    ]
)  # fmt: skip
@pytest.mark.parametrize("window", [None, 256, 100])
def test_c_core_and_python_twins_agree(window: int | None, ops: list[tuple[Any, ...]]) -> None:
    require(ringmod.ACCELERATED, "the ring's C core did not build")
    c, py = _Side(python=False, window=window), _Side(python=True, window=window)
    for step, op in enumerate(ops):
        assert c.apply(op, step) == py.apply(op, step), (step, op)
        assert c.state() == py.state(), (step, op)


def test_release_revokes_views_and_sizes_match_capacity() -> None:
    require(ringmod.ACCELERATED, "the ring's C core did not build")
    side = _Side(python=False)
    assert side.tx.capacity == CAPACITY
    assert side.tx.try_send(b"abc")
    view = side.rx.try_recv_view()
    assert view is not None and bytes(view) == b"abc"
    side.rx.release()
    with pytest.raises(ValueError):
        bytes(view)  # revoked: the space may be rewritten from now on
    reserved = side.tx.try_reserve(10)
    assert reserved is not None
    side.tx.commit(4)
    with pytest.raises(ValueError):
        reserved[0] = 1  # the reservation's view is revoked by commit()
    assert side.rx.try_recv() == bytes(4)


def test_the_c_core_takes_its_bounds_from_its_buffer_not_from_settable_values() -> None:
    """Private attributes are not an interface, but poking them must not make C write
    outside the ring: the sizes are read-only, and everything else is checked or falls back
    to the Python twin."""
    require(ringmod.ACCELERATED, "the ring's C core did not build")
    side = _Side(python=False)
    for name in ("capacity", "_mask", "_half"):
        with pytest.raises(AttributeError):
            setattr(side.tx, name, 1 << 20)
    view = side.tx.try_reserve(16)
    assert view is not None
    del side.tx._resv_view  # commit() must not follow a NULL
    with pytest.raises(UsageError, match="nothing reserved"):
        side.tx.commit()
    side.tx.cancel()
    side.tx._rpos = AREA  # a reservation that would end outside the ring
    side.tx._resv_view = memoryview(bytearray(16))
    side.tx._rlen = 16
    with pytest.raises(IndexError):  # handed to the Python twin, whose views are bounded
        side.tx.commit()
    with pytest.raises(ValueError, match="outside its buffer"):
        side.rx.set_guard(side.words, 2**63 - 1, 0)
    other = _Side(python=False)
    assert other.tx.try_send(b"abc")
    del other.rx._views
    with pytest.raises(AttributeError):  # a clear error from Python, not a crash in C
        other.rx.try_recv_view()


# -- private state set from Python never takes the C core outside the area --------------------
# The fields below are members of the C core that Python code can set (the Python twins keep
# them as attributes). Misusing them may raise anything, but must never make the C core
# write or read outside the ring's area.

PAD = mmap.PAGESIZE
CANARY = 0x5A


class _Sandwich:
    """A ring area with canary bytes on both sides, inside one mapping."""

    def __init__(self, capacity: int = 4096) -> None:
        self.size = ringmod.CTRL_SIZE + capacity
        self.mm = mmap.mmap(-1, PAD + self.size + PAD)
        self.mm[:] = bytes([CANARY]) * len(self.mm)
        self.area = memoryview(self.mm)[PAD : PAD + self.size]
        init_area(self.area)

    def outside_untouched(self) -> bool:
        end = PAD + self.size
        return self.mm[:PAD] == bytes([CANARY]) * PAD and self.mm[end:] == bytes([CANARY]) * PAD


@pytest.mark.parametrize("rpos", [(1 << 64) - 2048, (1 << 64) - 8, 1 << 40, 4096 - 8])
def test_commit_never_stores_outside_for_any_reservation_position(rpos: int) -> None:
    s = _Sandwich()
    tx = RingSender(s.area, "victim")
    tx.try_reserve(8)
    tx._rpos, tx._rlen = rpos, 2040
    with contextlib.suppress(Exception):  # an error or a (lying) record inside the ring
        tx.commit()
    assert s.outside_untouched()


def test_commit_uses_the_reservation_as_checked_even_if_index_moves_it() -> None:
    s = _Sandwich()
    tx = RingSender(s.area, "victim")
    tx.try_reserve(8)

    class Sly:
        def __index__(self) -> int:
            tx._rpos = 1 << 40  # moved while commit converts its argument
            return 0

    # The argument rule takes __index__ types (ivshmem._args), so the commit may go through
    # or fail: either way only with the reservation as it was checked, never at the moved
    # position.
    with contextlib.suppress(Exception):
        tx.commit(Sly())  # type: ignore[arg-type]
    assert s.outside_untouched()


def test_an_unaligned_private_tail_is_reported_not_read_past() -> None:
    s = _Sandwich()
    rx = RingReceiver(s.area, "victim")
    rx._tail, rx._head = 4095, 8192
    for read in (rx.try_recv, rx.try_recv_view, lambda: rx.take_many(4)):
        with pytest.raises(ChannelCorrupted):
            read()


def test_a_placement_that_wraps_around_2_64_is_refused() -> None:
    s = _Sandwich()

    class Liar(RingSender):
        def _slow_place(self, n: int) -> tuple[int, int] | None:
            return self._tail, (1 << 64) - ((n + 15) & ~7)

    tx = Liar(s.area, "victim")
    tx._limit = -1
    with pytest.raises(RuntimeError, match="would leave its ring"):
        tx.try_send(b"\xaa" * 2000)
    assert s.outside_untouched()


def test_send_many_takes_the_bounds_afresh_after_python_code_ran() -> None:
    big, small = _Sandwich(65536), _Sandwich(256)

    class Rebinder(RingSender):
        calls = 0

        def _slow_place(self, n: int) -> tuple[int, int] | None:
            Rebinder.calls += 1
            if Rebinder.calls == 1:
                self._bind(small.area)
                self._bind_guard(self._gq, 0, 0)
                self._limit, self._head = 1 << 40, 0
                return 0, 0
            return super()._slow_place(n)

    tx = Rebinder(big.area, "victim")
    tx._limit = -1
    with pytest.raises(UsageError, match="does not fit"):
        tx.try_send_many([b"a" * 8, b"b" * 4000])
    assert small.outside_untouched() and big.outside_untouched()


@pytest.mark.parametrize("counter", [1 << 63, (1 << 64) - 8])
def test_ends_refuse_counters_near_the_top_of_the_word(counter: int) -> None:
    """No counter may reach 2**64 while attached: a lying peer's start values are refused."""
    s = _Sandwich()
    words = s.area.cast("Q")
    words[ringmod.S_HEAD] = words[ringmod.R_TAIL] = counter
    for end in (RingSender, RingReceiver):
        with pytest.raises(ChannelCorrupted, match="head/tail"):
            end(s.area, "victim")


@pytest.mark.parametrize("kind", [0, ringmod.KIND_WRAP, 5, 1 << 32, -1])
def test_only_data_and_array_records_can_be_reserved(kind: int) -> None:
    """Any other kind would break the channel for its receiver (a WRAP marker mid-ring, a
    kind it cannot decode): refused by both twins, before anything is written."""
    s = _Sandwich()
    for tx in (RingSender(s.area, "victim"), _PySender(s.area, "victim")):
        with pytest.raises(UsageError, match="neither KIND_DATA nor KIND_ARRAY"):
            tx.try_reserve(3, kind)
        assert tx._head == 0 and tx.try_reserve(3) is not None
        tx.cancel()
    rx = RingReceiver(s.area, "victim")
    with pytest.raises(UsageError, match="neither KIND_DATA nor KIND_ARRAY"):
        rx.try_recv_view(kind)

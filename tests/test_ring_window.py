"""The hot window (ring.py, module docstring): a sender whose receiver keeps up starts over
at the start of the data instead of walking the whole capacity, and still uses the whole
capacity when the receiver falls behind. Run against both cores (the C methods and the Python
twins forced), over anonymous mappings like a real region's."""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ringtwins import PyReceiver as _PyReceiver
from ringtwins import PySender as _PySender

import ivshmem
from ivshmem.channel import ChannelCorrupted, Receiver, Sender, format_region
from ivshmem.channel import ring as ringmod
from ivshmem.channel.fuzz import view_address
from ivshmem.channel.ring import HEADER, RingReceiver, RingSender, init_area
from ivshmem.errors import UsageError

CORES = ["c", "python"] if ringmod.ACCELERATED else ["python"]
PAD = mmap.PAGESIZE
CANARY = 0x5A


class _Ring:
    """Both ends of one ring in a mapping with canary pages on both sides."""

    def __init__(self, core: str, capacity: int, window: int | None) -> None:
        self.size = ringmod.CTRL_SIZE + capacity
        self.mm = mmap.mmap(-1, PAD + self.size + PAD)
        self.mm[:] = bytes([CANARY]) * len(self.mm)
        self.area = memoryview(self.mm)[PAD : PAD + self.size]
        init_area(self.area)
        self.words = self.area.cast("Q")
        py = core == "python"
        self.tx: RingSender = (_PySender if py else RingSender)(self.area, "w")
        self.rx: RingReceiver = (_PyReceiver if py else RingReceiver)(self.area, "w")
        if window is not None:
            self.tx.set_window(window)
            self.rx.set_window(window)

    def last_record(self, n: int) -> tuple[int, int]:
        """(position, end) in the data of the record of ``n`` bytes just sent."""
        need = (n + 15) & ~7
        pos = (self.tx._head - need) & self.tx._mask
        return pos, pos + need

    def outside_untouched(self) -> bool:
        end = PAD + self.size
        return self.mm[:PAD] == bytes([CANARY]) * PAD and self.mm[end:] == bytes([CANARY]) * PAD


@pytest.fixture(params=CORES)
def core(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(core: str) -> Iterator[Any]:
    rings: list[_Ring] = []

    def new(capacity: int, window: int | None = None) -> _Ring:
        rings.append(_Ring(core, capacity, window))
        return rings[-1]

    yield new
    for r in rings:  # (anonymous mappings: freed with their last view)
        assert r.outside_untouched()


def _msg(i: int, n: int) -> bytes:
    return bytes([i % 251]) * n


@pytest.mark.parametrize("recv", ["bytes", "view"])
def test_a_receiver_that_keeps_up_keeps_the_sender_in_its_window(make: Any, recv: str) -> None:
    r = make(1 << 16, 4096)
    n = 1000
    for i in range(300):  # 300 KB through a 64 KiB ring: several laps' worth
        assert r.tx.try_send(_msg(i, n))
        pos, end = r.last_record(n)
        assert end <= 4096, (i, pos)
        if recv == "bytes":
            assert r.rx.try_recv() == _msg(i, n)
        else:
            v = r.rx.try_recv_view()
            assert v is not None and bytes(v) == _msg(i, n)
            r.rx.release()


def test_the_default_window_bounds_a_large_ring(make: Any) -> None:
    """1 MiB messages through a 32 MiB ring stay within the first HOT_WINDOW bytes (the same
    working set as a 4 MiB ring), for the copy and the zero-copy paths alike."""
    r = make(32 << 20)
    n = 1 << 20
    assert r.tx._window == ringmod.HOT_WINDOW
    for i in range(40):
        if i % 2:
            assert r.tx.try_send(_msg(i, n))
        else:
            view = r.tx.try_reserve(n)
            assert view is not None
            view[:] = _msg(i, n)
            r.tx.commit()
        assert r.last_record(n)[1] <= ringmod.HOT_WINDOW, i
        v = r.rx.try_recv_view()
        assert v is not None and bytes(v[:8]) == _msg(i, 8) and len(v) == n
        r.rx.release()


def test_a_receiver_that_falls_behind_gets_the_whole_capacity(make: Any) -> None:
    cap, n = 1 << 16, 1000
    need = (n + 15) & ~7
    r = make(cap, 4096)
    sent = 0
    while r.tx.try_send(_msg(sent, n)):
        sent += 1
    assert sent == cap // need  # as many as a ring without a window holds
    for i in range(sent):
        assert r.rx.try_recv() == _msg(i, n)
    assert r.rx.try_recv() is None  # found empty: the tail is given back


@pytest.mark.parametrize("kept_up", [0, 1, 2, 3, 5, 7])
def test_a_receiver_that_stalls_after_keeping_up_leaves_the_whole_capacity(
    make: Any, kept_up: int
) -> None:
    """The receiver keeps up (every message read at once), then stops reading, at any point
    of the window: the sender can still fill the ring's capacity. One case is weaker, by
    design (ring.py, the hot window): a stall that begins while the receiver still has the
    one record before an early wrap marker to read leaves the sender the window less that
    record (it may fill the new lap only up to the receiver), and the whole capacity again
    once the receiver has read that record and the first after the marker."""
    cap, n = 1 << 16, 1000
    need = (n + 15) & ~7
    r = make(cap, 4096)
    sent = 0
    for _ in range(20 + kept_up):  # several laps of the window, ending anywhere in it
        assert r.tx.try_send(_msg(sent, n))
        assert r.rx.try_recv() == _msg(sent, n)
        sent += 1
    got = sent
    while r.tx.try_send(_msg(sent, n)):  # the receiver has stalled
        sent += 1
    if (sent - got) * need <= cap - 2 * 4096:  # stalled just before an early wrap marker
        assert (sent - got) * need >= 4096 - 2 * need
        for _ in range(2):  # the record before the marker and the first after it
            assert r.rx.try_recv() == _msg(got, n)
            got += 1
        while r.tx.try_send(_msg(sent, n)):
            sent += 1
    assert (sent - got) * need > cap - 2 * 4096  # the capacity, less at most the window
    while (m := r.rx.try_recv()) is not None:
        assert m == _msg(got, n)
        got += 1
    assert got == sent


def test_after_falling_behind_the_sender_returns_to_its_window(make: Any) -> None:
    r = make(1 << 16, 4096)
    n = 1000
    sent = got = 0
    for _ in range(20):  # fall behind: 20 KB written, past the window
        assert r.tx.try_send(_msg(sent, n))
        sent += 1
    assert r.last_record(n)[1] > 4096
    while (m := r.rx.try_recv()) is not None:
        assert m == _msg(got, n)
        got += 1
    assert r.tx.try_send(_msg(sent, n))  # the ring is empty: back to the start at once
    sent += 1
    assert r.last_record(n)[0] == 0
    for _ in range(100):
        assert r.rx.try_recv() == _msg(got, n)
        got += 1
        assert r.tx.try_send(_msg(sent, n))
        sent += 1
        assert r.last_record(n)[1] <= 4096


def test_a_behind_receiver_is_not_overrun_by_an_early_wrap(make: Any) -> None:
    """Past the window with the receiver still inside the first record of the lap: no early
    wrap (it would overwrite unread data); the record goes on linearly."""
    r = make(1 << 16, 2048)
    n = 1000
    for i in range(3):
        assert r.tx.try_send(_msg(i, n))
    assert r.rx.try_recv_view() is not None  # the first message is held, not released
    assert r.tx.try_send(_msg(3, n))
    assert r.last_record(n)[0] == 3 * 1008
    r.rx.release()
    for i in range(1, 4):
        assert r.rx.try_recv() == _msg(i, n)


def test_a_record_bigger_than_the_window_alternates_with_the_start(make: Any) -> None:
    r = make(1 << 16, 1024)
    n = 5000
    for i in range(30):
        assert r.tx.try_send(_msg(i, n))
        assert r.last_record(n)[0] in (0, 5008), i
        assert r.rx.try_recv() == _msg(i, n)


def test_a_lying_tail_is_caught_at_the_window(make: Any) -> None:
    """The early-wrap decision reads the receiver's tail: a tail beyond the head (or moving
    backward) is refused there as anywhere else."""
    for lie in ("ahead", "backward"):
        r = make(1 << 16, 2048)
        for i in range(2):
            assert r.tx.try_send(_msg(i, 1000))
        assert r.rx.try_recv() is not None and r.rx.try_recv() is not None
        assert r.rx.try_recv() is None  # publishes tail 2016
        assert r.tx.try_send(_msg(2, 1000))  # past the window: reads the tail, wraps early
        assert r.last_record(1000)[0] == 0
        r.words[ringmod.R_TAIL] = r.tx._head + 8 if lie == "ahead" else 8
        with pytest.raises(ChannelCorrupted, match="tail"):
            r.tx.try_send(_msg(3, 1500))
        with pytest.raises(ChannelCorrupted):
            r.tx.try_send(b"x")  # broken stays broken


def test_the_window_is_clamped_to_the_ring(make: Any) -> None:
    r = make(4096)
    assert r.tx._window == 4096  # HOT_WINDOW is bigger than this ring
    r.tx.set_window(1 << 40)
    assert r.tx._window == 4096
    r.tx.set_window(0)
    assert r.tx._window == 16
    for bad in (-1, 1.5, "4M", True, None):
        with pytest.raises(UsageError, match="whole number of bytes"):
            r.tx.set_window(bad)
    assert r.tx._window == 16
    for i in range(50):  # every record crosses a 16-byte window: wrap at every chance
        assert r.tx.try_send(_msg(i, 100))
        assert r.rx.try_recv() == _msg(i, 100)


@pytest.mark.parametrize("rskip", [1, 8, 4096, 4096 - 8, 1 << 40, (1 << 64) - 8])
def test_commit_of_a_hacked_skip_stays_inside(make: Any, rskip: int) -> None:
    """The C commit takes a WRAP before the record only in the shape placement makes;
    anything else goes to the Python twin: an error or a lie inside the ring, never a store
    outside it."""
    r = make(4096, 1024)
    for i in range(2):
        assert r.tx.try_send(_msg(i, 600))
    view = r.tx.try_reserve(8)
    assert view is not None
    r.tx._rskip = rskip
    r.tx._rpos = 0
    with contextlib.suppress(Exception):
        r.tx.commit()
    assert r.outside_untouched()


def test_an_early_wrap_reads_like_any_wrap_for_every_receive_call(make: Any) -> None:
    r = make(1 << 14, 1024)
    n = 300
    payload_at: list[int] = []
    for i in range(60):
        assert r.tx.try_send(_msg(i, n))
        payload_at.append(r.last_record(n)[0] + HEADER)
        kind = i % 3
        if kind == 0:
            assert r.rx.try_recv() == _msg(i, n)
        elif kind == 1:
            assert r.rx.take_many(4) == [_msg(i, n)]
        else:
            v = r.rx.try_recv_view()
            assert v is not None and bytes(v) == _msg(i, n)
            r.rx.release()
    assert max(payload_at) + n <= 1024 and payload_at.count(HEADER) > 5


def test_a_channel_with_a_large_ring_stays_in_its_window(short_tmp: Path) -> None:
    """Through the public channel API (the Receiver gives its space back lazily, every
    sixteenth of the window at the latest): 1 MiB messages, copied in or written into a
    reservation, and received as views, stay within the first HOT_WINDOW bytes of a 16 MiB ring."""
    path = str(short_tmp / "region")
    with ivshmem.open_region(path, id=1, size=64 << 20) as a, ivshmem.open_region(path, id=2) as b:
        format_region(a, max_peers=2, peers=[1, 2])
        rx = Receiver(b, "big", sender=1, capacity=16 << 20)
        tx = Sender(a, "big", receiver=2)
        n = 1 << 20
        data = view_address(rx._rodata)
        try:
            for i in range(48):  # three laps of a ring that walked its whole capacity
                if i % 2:
                    tx.send(_msg(i, n))
                else:
                    view = tx.reserve(n)
                    view[:] = _msg(i, n)
                    tx.commit()
                got = rx.recv_view(timeout=10)
                assert bytes(got[:4]) == _msg(i, 4) and len(got) == n
                assert view_address(got) - data + n <= ringmod.HOT_WINDOW, i
                del got
                rx.release()
        finally:
            rx.close()
            tx.close()

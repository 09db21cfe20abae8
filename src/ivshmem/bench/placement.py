"""The ring's placement alone: one process, one ring, a receiver that always keeps up.

Each step reserves room for a message, writes every byte of it, commits, then receives it as a
view, copies it out and releases it (the written-and-copied pattern, with no second process
and so no scheduling between two processes in the number: only where the bytes land, in cache
or not). With ``window`` the ring uses its default hot window (``ring.HOT_WINDOW``); without,
its window is its whole capacity, which places records exactly as the ring did before the
window existed (it walks the whole capacity). The ring is warmed by a whole lap first, so no
page is faulted in while measured, and it is timed in chunks whose median rate counts: a chunk
the scheduler interrupted (a loaded machine) is an outlier then, not a lower average.
"""

from __future__ import annotations

import mmap
import statistics
import time

from ..channel.ring import CTRL_SIZE, RingReceiver, RingSender, init_area

__all__ = ["CHUNK", "measure_placement"]

#: Bytes per timed chunk (16 MiB: many laps of the window, several messages of any size).
CHUNK = 16 << 20


def measure_placement(capacity: int, payload: int, window: bool, seconds: float) -> float:
    """Bytes per second written and copied through a fresh ring of ``capacity`` bytes."""
    mm = mmap.mmap(-1, CTRL_SIZE + capacity)
    area = memoryview(mm)
    init_area(area)
    tx, rx = RingSender(area, "placement"), RingReceiver(area, "placement")
    if not window:
        tx.set_window(capacity)
        rx.set_window(capacity)
    src = bytes(range(256)) * (payload // 256) + bytes(payload % 256)
    dst = memoryview(bytearray(payload))

    def step() -> None:
        view = tx.try_reserve(payload)
        if view is None:  # pragma: no cover - the receiver keeps up: there is always room
            raise RuntimeError("placement benchmark: the ring is full")
        view[:] = src
        tx.commit()
        got = rx.try_recv_view()
        if got is None:  # pragma: no cover - just committed
            raise RuntimeError("placement benchmark: the message is missing")
        dst[:] = got
        rx.release()

    for _ in range(capacity // payload + 8):  # a whole lap: every page faulted in
        step()
    per_chunk = max(1, CHUNK // payload)
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(per_chunk):
            step()
        now = time.perf_counter()
        rates.append(per_chunk * payload / (now - start))
        if now >= deadline:
            break
    return statistics.median(rates)  # (the mapping goes with the last view of it)

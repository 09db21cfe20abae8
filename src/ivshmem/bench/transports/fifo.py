"""``faster-fifo``: a circular buffer in shared memory guarded by process-shared pthread
mutexes and condition variables. Messages are passed as bytes through its ``dumps``/``loads``
hooks set to ``bytes`` (one copy in, one copy out), so no pickling is measured."""

from __future__ import annotations

from typing import Any

from ..harness import Link, Stamp, Transport

__all__ = ["FasterFifo"]


class _FifoLink(Link):
    def __init__(self, rx: Any, tx: Any, stamp: Stamp) -> None:
        self._rx = rx
        self._tx = tx
        self._stamp = stamp
        self._out = stamp.template()

    def send(self, seq: int) -> None:
        self._stamp.stamp(self._out, seq)
        # Block as long as it takes: a full queue is the normal state of a stream.
        self._tx.put(self._out, True, 1e9)

    def recv(self) -> int:
        return self._stamp.check(self._rx.get(True, 1e9))


class FasterFifo(Transport):
    key = "faster_fifo"
    label = "faster-fifo"
    requires = ("faster_fifo",)
    notes = (
        "faster_fifo.Queue(max_size_bytes=queue budget) per direction, dumps=bytes and "
        "loads=bytes instead of pickle"
    )

    def prepare(self) -> None:
        import faster_fifo

        size = self.depth * (self.payload + 64)
        self._fwd = faster_fifo.Queue(max_size_bytes=size, dumps=bytes, loads=bytes)
        self._back = (
            faster_fifo.Queue(max_size_bytes=size, dumps=bytes, loads=bytes)
            if self.kind == "rtt"
            else None
        )

    def open(self, side: int) -> _FifoLink:
        if side == 0:
            return _FifoLink(self._back, self._fwd, self.stamp)
        return _FifoLink(self._fwd, self._back, self.stamp)

    def cleanup(self) -> None:
        for q in (self._fwd, self._back):
            if q is not None:
                q.close()

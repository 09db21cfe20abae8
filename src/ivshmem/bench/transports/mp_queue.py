"""``multiprocessing.Queue``: ``put(bytes)`` / ``get()``, bounded (``maxsize``) to the common
queue budget so the producer cannot run ahead without limit."""

from __future__ import annotations

import multiprocessing
from typing import Any

from ..harness import Link, Stamp, Transport

__all__ = ["MpQueue"]


class _QueueLink(Link):
    def __init__(self, rx: Any, tx: Any, stamp: Stamp) -> None:
        self._get = rx.get if rx is not None else None
        self._put = tx.put if tx is not None else None
        self._stamp = stamp
        self._out = stamp.template()

    def send(self, seq: int) -> None:
        assert self._put is not None
        self._stamp.stamp(self._out, seq)
        # put() hands the object to a feeder thread that pickles it later: send a snapshot.
        self._put(bytes(self._out))

    def recv(self) -> int:
        assert self._get is not None
        return self._stamp.check(self._get())


class MpQueue(Transport):
    key = "mp_queue"
    label = "multiprocessing.Queue"
    notes = (
        "Queue(maxsize=queue budget) per direction; put(bytes)/get() (pickled by a feeder thread)"
    )

    def prepare(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._fwd = ctx.Queue(maxsize=self.depth)
        self._back = ctx.Queue(maxsize=self.depth) if self.kind == "rtt" else None

    def open(self, side: int) -> _QueueLink:
        if side == 0:
            return _QueueLink(self._back, self._fwd, self.stamp)
        return _QueueLink(self._fwd, self._back, self.stamp)

    def cleanup(self) -> None:
        for q in (self._fwd, self._back):
            if q is not None:
                q.close()
                q.join_thread()

"""``multiprocessing.Pipe``: ``Connection.send_bytes`` / ``recv_bytes`` (no pickling), a pipe
for the stream and a socket pair (duplex) for the round trip."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from typing import Any

from ..harness import Link, Stamp, Transport

__all__ = ["MpPipe"]


class _MpPipeLink(Link):
    def __init__(
        self,
        rx: multiprocessing.connection.Connection | None,
        tx: multiprocessing.connection.Connection | None,
        stamp: Stamp,
    ) -> None:
        self._rx = rx
        self._tx = tx
        self._stamp = stamp
        self._out = stamp.template()

    def send(self, seq: int) -> None:
        assert self._tx is not None
        self._stamp.stamp(self._out, seq)
        self._tx.send_bytes(self._out)

    def recv(self) -> int:
        assert self._rx is not None
        return self._stamp.check(self._rx.recv_bytes())


class MpPipe(Transport):
    key = "mp_pipe"
    label = "multiprocessing.Pipe"
    notes = (
        "Pipe(duplex=False) for the stream, Pipe() (socket pair) for the round trip; "
        "send_bytes/recv_bytes"
    )

    def prepare(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conns: list[Any] = []
        self._ends: tuple[tuple[Any, Any], tuple[Any, Any]]
        if self.kind == "stream":
            rx, tx = ctx.Pipe(duplex=False)
            self._ends = ((None, tx), (rx, None))
            self._conns = [rx, tx]
        else:
            a, b = ctx.Pipe(duplex=True)
            self._ends = ((a, a), (b, b))
            self._conns = [a, b]

    def open(self, side: int) -> _MpPipeLink:
        rx, tx = self._ends[side]
        return _MpPipeLink(rx, tx, self.stamp)

    def cleanup(self) -> None:
        for c in self._conns:
            c.close()
        self._conns = []

"""``pyzmq`` over ``ipc://`` (a Unix socket in the run's temporary directory): PUSH/PULL for
the stream, PAIR for the round trip. High-water marks are set from the common queue budget."""

from __future__ import annotations

import itertools
import os
from typing import Any

from ..harness import BenchError, Link, Stamp, Transport

__all__ = ["ZmqIpc"]

_counter = itertools.count()
_HELLO = b"hello"
#: From this size on, receive into a zmq frame (no copy into a bytes object).
_ZERO_COPY_RECV = 1 << 16


class _ZmqLink(Link):
    def __init__(self, side: int, kind: str, address: str, depth: int, stamp: Stamp) -> None:
        import zmq

        self._zmq = zmq
        self._side = side
        self._kind = kind
        self._stamp = stamp
        self._out = stamp.template()
        self._frames = stamp.size >= _ZERO_COPY_RECV
        self._ctx = zmq.Context(1)
        stype = (zmq.PUSH if side == 0 else zmq.PULL) if kind == "stream" else zmq.PAIR
        self._sock = self._ctx.socket(stype)
        hwm = max(1, depth // 2)  # both ends buffer: split the budget between them
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        if side == 1:
            self._sock.bind(address)
        else:
            self._sock.connect(address)

    def connect(self) -> None:
        # A hello message each way that can go: the socket pair is connected once it arrived.
        sock = self._sock
        sock.setsockopt(self._zmq.RCVTIMEO, 30_000)
        try:
            if self._side == 0:
                sock.send(_HELLO)
                if self._kind == "rtt" and sock.recv() != _HELLO:
                    raise BenchError("zmq: unexpected handshake reply")
            else:
                if sock.recv() != _HELLO:
                    raise BenchError("zmq: unexpected handshake message")
                if self._kind == "rtt":
                    sock.send(_HELLO)
        except self._zmq.Again:
            raise BenchError("zmq: the other side did not connect within 30 s") from None
        sock.setsockopt(self._zmq.RCVTIMEO, -1)

    def send(self, seq: int) -> None:
        self._stamp.stamp(self._out, seq)
        self._sock.send(self._out)

    def recv(self) -> int:
        if self._frames:
            frame: Any = self._sock.recv(copy=False)
            return self._stamp.check(frame.buffer)
        return self._stamp.check(self._sock.recv())

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class ZmqIpc(Transport):
    key = "zmq_ipc"
    label = "pyzmq ipc"
    requires = ("zmq",)
    variants = ("unpinned",)
    notes = (
        "PUSH/PULL (stream) and PAIR (round trip) over ipc:// in a temporary directory; "
        "SNDHWM/RCVHWM from the queue budget; frames (copy=False) for receiving >= 64 KiB; "
        "the unpinned row leaves both processes (and their I/O threads) to the scheduler"
    )

    def prepare(self) -> None:
        path = os.path.join(self.ctx.tmpdir, f"zmq-{next(_counter)}.sock")
        self._path = path
        self._address = f"ipc://{path}"

    def open(self, side: int) -> _ZmqLink:
        return _ZmqLink(side, self.kind, self._address, self.depth, self.stamp)

    def cleanup(self) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

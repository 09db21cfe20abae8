"""This project's channels (:mod:`ivshmem.channel`), in two modes:

* **spinning**: two :func:`ivshmem.open_region` endpoints (ids 0 and 1) on one memfd region,
  formatted with a static membership table; both ends wait by spinning on the ring's index
  word (``spin=inf``), with no system call per message.
* **blocking**: two host peers (:func:`ivshmem.connect`) of a real ``ivshmem-server`` started
  for the measurement (``--memfd --format``: it formats the region and keeps its membership
  table); both ends block on their doorbell eventfd at once when there is
  nothing to do (``spin=0`` by default, configurable), and a sender rings only when the
  receiver says in the region that it sleeps.

Messages go zero-copy both ways: the producer ``reserve()``s room in the ring, stamps it and
``commit()``s; the consumer checks ``recv_view()`` in place and ``release()``s it. In the copy
variant the producer writes the whole payload and the consumer copies it out before checking;
the bytes variant uses the plain API (``send(buffer)``, ``recv() -> bytes``), like the other
transports' users do. The batch variant is the bytes API batched as a streaming application
would use it: ``send_many()`` of up to :data:`BATCH` messages (one index store and one "is the
receiver asleep?" check per batch) and ``recv_many()``; round trips send every message alone.
"""

from __future__ import annotations

import collections
import itertools
import os
import subprocess
import time
from typing import Any

from ...errors import IvshmemError
from ...launch import start_server, stop_server
from ..harness import STOP, BenchError, Link, Stamp, Transport

__all__ = ["ChannelBlocking", "ChannelSpinning"]

_counter = itertools.count()
#: The batch variant hands send_many() at most this many messages, or this many bytes.
BATCH = 256
BATCH_BYTES = 256 << 10
_NAME = "bench"
#: Record header the ring adds to every message (ring.HEADER).
_RECORD_HEADER = 8
_PAGE = 4096


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def ring_capacity(payload: int, depth: int) -> int:
    """Ring bytes for the common queue budget; a message may use at most half the ring."""
    return max(_pow2(depth * payload), _pow2(2 * (payload + _RECORD_HEADER)), 4096)


def region_size(capacity: int) -> int:
    """A power of two (the server requires it) with room for two peers' arenas, each holding
    one channel of ``capacity`` bytes, plus the header and membership pages."""
    return _pow2(2 * (capacity + 4 * _PAGE) + 8 * _PAGE)


class _ChannelLink(Link):
    """Zero-copy use: stamp in the reserved room, check the received view in place."""

    def __init__(
        self, endpoint: Any, kind: str, side: int, capacity: int, spin: float, stamp: Stamp
    ) -> None:
        from ...channel import Receiver, Sender

        self._endpoint = endpoint
        self._stamp = stamp
        self._size = stamp.size
        self._src = stamp.template()
        self._dst = bytearray(stamp.size)
        # Copying out goes through a memoryview of the destination: one memmove. (Slice
        # assignment into a bytearray from anything but a bytearray copies the source into a
        # temporary bytearray first: two copies, half the rate.)
        self._dstv = memoryview(self._dst)
        other = 1 - endpoint.id
        wants_rx = kind == "rtt" or side == 1
        wants_tx = kind == "rtt" or side == 0
        self._rx: Any = None
        self._tx: Any = None
        # Receivers first: a Sender waits for the other side's Receiver to exist, so two sides
        # that both started with their Sender would wait for each other.
        if wants_rx:
            self._rx = Receiver(
                endpoint, _NAME, sender=other, capacity=capacity, spin=spin, timeout=30
            )
        if wants_tx:
            self._tx = Sender(endpoint, _NAME, receiver=other, spin=spin, timeout=30)

    def send(self, seq: int) -> None:
        tx = self._tx
        view = tx.reserve(self._size)
        self._stamp.stamp(view, seq)
        tx.commit()

    def recv(self) -> int:
        rx = self._rx
        seq = self._stamp.check(rx.recv_view())
        rx.release()
        return seq

    def close(self) -> None:
        for end in (self._tx, self._rx):
            if end is not None:
                end.close()
        self._tx = self._rx = None
        self._endpoint.close()


class _ChannelCopyLink(_ChannelLink):
    """Zero-copy API, but the producer writes every byte and the consumer copies it out."""

    def send(self, seq: int) -> None:
        tx = self._tx
        view = tx.reserve(self._size)
        view[:] = self._src
        self._stamp.stamp(view, seq)
        tx.commit()

    def recv(self) -> int:
        rx = self._rx
        self._dstv[:] = rx.recv_view()
        rx.release()
        return self._stamp.check(self._dst)


class _ChannelBytesLink(_ChannelLink):
    """The plain API: send() copies a buffer in, recv() returns a bytes copy."""

    def send(self, seq: int) -> None:
        self._stamp.stamp(self._src, seq)
        self._tx.send(self._src)

    def recv(self) -> int:
        return self._stamp.check(self._rx.recv())


class _ChannelBatchLink(_ChannelLink):
    """The bytes API, batched: the producer hands ``send_many()`` up to BATCH messages (one
    publish, at most one fence and one doorbell per batch), the consumer takes whatever is
    there with ``recv_many()`` and checks every message. Round trips send each message alone."""

    def __init__(
        self, endpoint: Any, kind: str, side: int, capacity: int, spin: float, stamp: Stamp
    ) -> None:
        super().__init__(endpoint, kind, side, capacity, spin, stamp)
        self._every = 1 if kind == "rtt" else max(1, min(BATCH, BATCH_BYTES // stamp.size))
        self._pending: list[bytes] = []
        self._got: collections.deque[bytes] = collections.deque()

    def send(self, seq: int) -> None:
        self._stamp.stamp(self._src, seq)
        pending = self._pending
        pending.append(bytes(self._src))
        if seq >= STOP or len(pending) >= self._every:
            self._tx.send_many(pending)
            pending.clear()

    def recv(self) -> int:
        got = self._got
        if not got:
            got.extend(self._rx.recv_many(4096))
        return self._stamp.check(got.popleft())


#: The calls each variant makes, for the documentation.
_API_NOTES = {
    "": "reserve/stamp/commit, recv_view/check/release",
    "copy": "reserve, write the whole payload, stamp, commit; recv_view, copy it out "
    "(one memmove), release, check",
    "bytes": "stamp a buffer, send(buffer); recv() -> bytes, check",
    "batch": f"send_many() of up to {BATCH} messages ({BATCH_BYTES >> 10} KiB), recv_many(); "
    "round trips send each message alone",
}

_LINKS = {
    "": _ChannelLink,
    "copy": _ChannelCopyLink,
    "bytes": _ChannelBytesLink,
    "batch": _ChannelBatchLink,
}


class ChannelSpinning(Transport):
    key = "ivshmem_spin"
    label = "ivshmem channel (spinning)"
    zero_copy = True
    variants = ("copy", "bytes", "batch")
    notes = (
        "two open_region() endpoints on one formatted memfd region (static membership), "
        "Sender/Receiver with spin=inf"
    )

    @classmethod
    def notes_for(cls, variant: str) -> str:
        return f"{cls.notes}; {_API_NOTES[variant]}"

    def prepare(self) -> None:
        from ...channel import format_region
        from ...endpoint import open_region
        from ...memory import SharedMemory

        self.capacity = self.ring_capacity or ring_capacity(self.payload, self.depth)
        self._shm = SharedMemory.memfd(region_size(self.capacity), "ivshmem-bench")
        # The children inherit the memfd across fork and map it themselves.
        os.set_inheritable(self._shm.fd, True)
        with open_region(self._shm.fd) as ep:
            format_region(ep, max_peers=2, peers=[0, 1])

    def open(self, side: int) -> _ChannelLink:
        from ...endpoint import open_region

        ep = open_region(self._shm.fd, id=side)
        try:
            link = _LINKS[self.variant]
            return link(ep, self.kind, side, self.capacity, float("inf"), self.stamp)
        except BaseException:
            ep.close()
            raise

    def cleanup(self) -> None:
        self._shm.close()


class ChannelBlocking(Transport):
    key = "ivshmem_block"
    label = "ivshmem channel (blocking)"
    zero_copy = True
    variants = ("copy", "bytes", "batch")
    notes = (
        "two host peers connect()ed to a fresh ivshmem-server (--memfd --format, 1 vector; the "
        "server keeps the membership table), Sender/Receiver with spin=0: sleep on the "
        "doorbell eventfd whenever there is nothing to do"
    )

    @classmethod
    def notes_for(cls, variant: str) -> str:
        return f"{cls.notes}; {_API_NOTES[variant]}"

    def prepare(self) -> None:
        self.capacity = self.ring_capacity or ring_capacity(self.payload, self.depth)
        n = next(_counter)
        self._socket = os.path.join(self.ctx.tmpdir, f"server-{n}.sock")
        self._log = os.path.join(self.ctx.tmpdir, f"server-{n}.log")
        self._server: subprocess.Popen[bytes] | None = None
        self._server = _start_server(
            self._socket, region_size(self.capacity), self._log, max_peers=2
        )

    def open(self, side: int) -> _ChannelLink:
        from ...peer import connect

        ep = connect(self._socket, vectors=1, timeout=30)
        try:
            other = 1 - ep.id
            if ep.id not in (0, 1):
                raise BenchError(f"expected peer id 0 or 1 from a fresh server, got {ep.id}")
            deadline = time.monotonic() + 30
            while other not in ep.peers:  # reading peers takes the server's join messages
                if time.monotonic() > deadline:
                    raise BenchError(f"peer {other} did not join the server within 30 s")
                time.sleep(0.002)
            spin = float(self.ctx.options.get("block_spin", 0.0))
            return _LINKS[self.variant](ep, self.kind, side, self.capacity, spin, self.stamp)
        except BaseException:
            ep.close()
            raise

    def cleanup(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            stop_server(server)


def _start_server(sock: str, size: int, log_path: str, max_peers: int) -> subprocess.Popen[bytes]:
    """``ivshmem-server`` with a memfd region it formats for channels and whose membership
    table it keeps."""
    args = ["--memfd", "-l", str(size), "-n", "1", "--status-socket", ""]
    try:
        return start_server(sock, [*args, "--format", "--max-peers", str(max_peers)], log_path)
    except IvshmemError as err:
        raise BenchError(str(err)) from err

"""Channels over real shared memory: in one process, across processes, with and without a
doorbell.

The doorbell endpoint below is real: eventfds created here and inherited by forked children,
rung with ``os.eventfd_write`` exactly as a host peer rings a peer (the fds come from a
table made by the test instead of an ivshmem server, which other modules test). Its peers
are unknown to it, like a guest's, so liveness comes from the region's membership table.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ivshmem
from ivshmem.channel import (
    ChannelClosedError,
    ChannelTimeout,
    Duplex,
    MembershipWriter,
    PeerGoneError,
    Receiver,
    Sender,
    UnexpectedMessageError,
    format_region,
)
from ivshmem.channel import ring as ringmod
from ivshmem.endpoint import EventfdEndpoint
from ivshmem.errors import DoorbellUnavailableError, PeersUnknownError, UsageError

SIZE = 4 << 20
FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


class DoorbellEndpoint(EventfdEndpoint):
    """A region plus real eventfd doorbells: ``table[peer][vector]`` is the eventfd that rings
    ``peer``'s ``vector``. Peers are unknown (as for a guest): liveness is the table's."""

    def __init__(self, path: str, id: int, table: dict[int, Sequence[int]]) -> None:
        self._region = ivshmem.open_region(path, id=id)
        self._table = table
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
        return len(self._table[self._id])

    @property
    def peers(self) -> frozenset[int]:
        raise PeersUnknownError("a guest-like endpoint: read the membership table")

    def notify(self, peer: int, vector: int = 0) -> None:
        os.eventfd_write(self._table[peer][vector], 1)

    def _own_fds(self) -> Sequence[int]:
        return self._table[self._id]

    @property
    def closed(self) -> bool:
        return self._region.closed

    def close(self) -> None:
        self._region.close()


@pytest.fixture
def path(short_tmp: Path) -> str:
    p = str(short_tmp / "region")
    with ivshmem.open_region(p, id=0, size=SIZE):
        pass
    return p


@pytest.fixture
def doorbells() -> Iterator[dict[int, Sequence[int]]]:
    """Two vectors for each of peers 1 and 2."""
    table: dict[int, Sequence[int]] = {
        peer: [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)] for peer in (1, 2)
    }
    yield table
    for fds in table.values():
        for fd in fds:
            os.close(fd)


def _plain(path: str, peer: int) -> ivshmem.RegionEndpoint:
    return ivshmem.open_region(path, id=peer)


@pytest.fixture
def pair(path: str) -> Iterator[tuple[ivshmem.RegionEndpoint, ivshmem.RegionEndpoint]]:
    """Peers 1 and 2 on a plain region with a static membership table."""
    with _plain(path, 1) as a, _plain(path, 2) as b:
        format_region(a, max_peers=4, peers=[1, 2])
        yield a, b


def _payload(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def _finish(proc: Any, timeout: float = 60) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("child process hung")
    assert proc.exitcode == 0, f"child failed with exit code {proc.exitcode}"


# -- one process ------------------------------------------------------------------------------


def test_bytes_in_order_with_wraparound(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "wrap", sender=1, capacity=1024)
    tx = Sender(a, "wrap", receiver=2)
    rng = random.Random(4)
    sent: list[bytes] = []
    got: list[bytes] = []
    for i in range(3000):
        if rng.random() < 0.55:
            msg = _payload(i, rng.choice([0, 1, 7, 8, 63, 200, rng.randrange(504)]))
            if tx.try_send(msg):
                sent.append(msg)
        else:
            m = rx.try_recv()
            if m is not None:
                got.append(m)
    while (m := rx.try_recv()) is not None:
        got.append(m)
    assert got == sent
    assert len(sent) > 1000
    rx.close()
    tx.close()


def test_too_big_message_says_the_limit(pair: tuple[Any, Any]) -> None:
    a, b = pair
    Receiver(b, "small", sender=1, capacity=1024)
    tx = Sender(a, "small", receiver=2)
    tx.send(bytes(504))
    with pytest.raises(UsageError, match="the most is 504 bytes"):
        tx.send(bytes(505))
    with pytest.raises(UsageError, match="power of two"):
        Receiver(b, "odd", sender=1, capacity=1000)


def test_views_are_zero_copy_and_revoked_on_release(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "views", sender=1)
    tx = Sender(a, "views", receiver=2)
    buf = tx.reserve(5)
    buf[:] = b"hello"
    tx.commit()
    tx.send(b"world")
    v1 = rx.recv_view()
    v2 = rx.recv_view()
    assert v1.readonly and bytes(v1) == b"hello" and bytes(v2) == b"world"
    # The view is the shared memory itself: the sender's bytes show through without a copy.
    assert v1.obj is not None
    rx.release()
    with pytest.raises(ValueError):
        bytes(v1)
    with pytest.raises(ValueError):
        buf[0] = 1  # the sender's reservation view is revoked by commit()


def test_partial_commit_cancel_and_batching(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "batch", sender=1)
    tx = Sender(a, "batch", receiver=2)
    view = tx.reserve(100)
    view[:3] = b"abc"
    tx.commit(3, flush=False)
    tx.reserve(10)
    with pytest.raises(UsageError, match="commit"):
        tx.send(b"x")
    tx.cancel()
    tx.send(b"d", flush=False)
    tx.send_many([b"e", b"f"], timeout=1)
    assert rx.recv_many() == [b"abc", b"d", b"e", b"f"]
    tx.send(b"g", flush=False)
    assert tx.pending and rx.try_recv() is None  # not published until flush()
    tx.flush()
    assert rx.recv(timeout=1) == b"g"
    with pytest.raises(UsageError, match="nothing reserved"):
        tx.commit()


def test_arrays_without_copies(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "arrays", sender=1, capacity=1 << 16)
    tx = Sender(a, "arrays", receiver=2)
    samples = [
        np.arange(12, dtype="<f8").reshape(3, 4),
        np.arange(10, dtype=">i2")[::2],  # non-contiguous, big-endian
        np.array(3.5),  # 0-d
        np.zeros((0, 5), "u1"),
        np.array([True, False]),
        np.array([1 + 2j], "c16"),
        np.array(["2024-01-01"], "datetime64[ns]"),
        np.array([b"ab", b"c"], "S2"),
    ]
    for arr in samples:
        tx.send_array(arr)
    for arr in samples:
        got = rx.recv_array(timeout=1)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got, arr)
        if got.size:
            assert not got.flags.writeable  # a read-only window on the ring
        del got
        rx.release()
    # Zero copy on the sending side too: fill the array in the ring, then commit.
    out = tx.reserve_array((2, 3), "f4")
    out[:] = 7
    del out
    tx.commit()
    copy = rx.recv_array(copy=True)
    assert copy.flags.writeable and np.array_equal(copy, np.full((2, 3), 7, "f4"))
    with pytest.raises(UsageError, match="cannot travel"):
        tx.send_array(np.array([object()]))
    tx.send(b"not an array")
    with pytest.raises(UnexpectedMessageError, match="is bytes, not array"):
        rx.recv_array()
    assert rx.recv() == b"not an array"  # left in place for the matching call


def test_one_end_cannot_be_opened_twice(pair: tuple[Any, Any]) -> None:
    _, b = pair
    rx = Receiver(b, "once", sender=1)
    with pytest.raises(UsageError, match="already open"):
        Receiver(b, "once", sender=1)
    rx.close()
    Receiver(b, "once", sender=1).close()  # reopened after close


def test_reopened_receiver_continues(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "re", sender=1)
    tx = Sender(a, "re", receiver=2)
    tx.send(b"1")
    tx.send(b"2")
    assert rx.recv() == b"1"
    rx.close()
    tx.send(b"3")
    rx = Receiver(b, "re", sender=1)
    assert [rx.recv(), rx.recv()] == [b"2", b"3"]


def test_a_closed_end_neither_writes_nor_reads(pair: tuple[Any, Any]) -> None:
    """Every call on a closed end raises ChannelClosedError at once, whether or not the ring
    has room or data, and writes nothing; a new end for the channel carries on."""
    a, b = pair
    rx = Receiver(b, "shut", sender=1, capacity=1024)
    tx = Sender(a, "shut", receiver=2)
    tx.send(b"before")
    tx.close()
    head = rx._q[ringmod.S_HEAD]
    writes: list[Callable[[], object]] = [
        lambda: tx.send(b"x"),
        lambda: tx.try_send(b"x"),
        lambda: tx.send_many([b"x", b"y"]),
        lambda: tx.reserve(8),
        lambda: tx.try_reserve(8),
        lambda: tx.send_array(np.zeros(2)),
        lambda: asyncio.run(tx.send_async(b"x")),
    ]
    for write in writes:
        with pytest.raises(ChannelClosedError, match="is closed"):
            write()
    assert rx._q[ringmod.S_HEAD] == head  # not one byte more
    tx.close()  # again: nothing happens
    assert rx.recv(timeout=1) == b"before"
    rx.close()
    tx2 = Sender(a, "shut", receiver=2)
    tx2.send(b"kept for the next receiver")
    reads: list[Callable[[], object]] = [
        lambda: rx.recv(timeout=1),
        lambda: rx.try_recv(),
        lambda: rx.recv_view(timeout=1),
        lambda: rx.try_recv_view(),
        lambda: rx.recv_many(timeout=1),
        lambda: rx.take_many(5),
        lambda: rx.recv_array(timeout=1),
        lambda: asyncio.run(rx.recv_async(timeout=1)),
    ]
    for read in reads:
        with pytest.raises(ChannelClosedError, match="is closed"):
            read()
    rx2 = Receiver(b, "shut", sender=1)
    assert rx2.recv(timeout=1) == b"kept for the next receiver"


def test_sender_waits_for_the_receiver_then_times_out(pair: tuple[Any, Any]) -> None:
    a, _ = pair
    with pytest.raises(ChannelTimeout, match="has not created it"):
        Sender(a, "nobody", receiver=2, timeout=0.05)
    with pytest.raises(ChannelTimeout, match="not listed"):
        Sender(a, "nobody", receiver=3, timeout=0.05)


def test_receiver_not_in_table_times_out(path: str) -> None:
    with _plain(path, 5) as ep:
        format_region(ep, peers=[1])
        with pytest.raises(ChannelTimeout, match="peer 5 is not in the region's membership"):
            Receiver(ep, "x", sender=1, timeout=0.05)


def test_plain_region_refuses_a_vector(pair: tuple[Any, Any]) -> None:
    a, b = pair
    before = bytes(b.memory)
    for option in ("vector", "membership_vector"):
        with pytest.raises(DoorbellUnavailableError, match=f"{option}=0 .* plain region polls"):
            Receiver(b, "v", sender=1, **{option: 0})
        with pytest.raises(DoorbellUnavailableError, match=f"{option}=0 .* plain region polls"):
            Sender(a, "v", receiver=2, **{option: 0})
    assert bytes(b.memory) == before  # refused before the channel was created


def test_timeouts_and_close(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "close", sender=1, capacity=1024, spin=0)
    tx = Sender(a, "close", receiver=2, spin=0)
    with pytest.raises(ChannelTimeout):
        rx.recv(timeout=0.02)
    for _ in range(2):
        tx.send(bytes(500))
    with pytest.raises(ChannelTimeout):
        tx.send(bytes(500), timeout=0.02)  # ring full
    tx.close()
    assert len(rx.recv()) == 500 and len(rx.recv()) == 500  # everything sent arrives first
    with pytest.raises(ChannelClosedError):
        rx.recv(timeout=1)
    # The other way round: a receiver that closes ends a sender blocked on a full ring.
    rx2 = Receiver(b, "close2", sender=1, capacity=1024, spin=0)
    tx2 = Sender(a, "close2", receiver=2, spin=0, liveness_interval=0.01)
    tx2.send(bytes(500))
    tx2.send(bytes(500))
    rx2.close()
    with pytest.raises(ChannelClosedError, match="receiver closed"):
        tx2.send(bytes(500), timeout=5)


def test_reserve_waits_for_room(pair: tuple[Any, Any]) -> None:
    """reserve() on a full ring: times out, or returns once the receiver makes room, or ends
    with ChannelClosedError when the receiver closes (the C core's reserve and the Python
    one share this wait)."""
    a, b = pair
    rx = Receiver(b, "resv", sender=1, capacity=1024, spin=0)
    tx = Sender(a, "resv", receiver=2, spin=0, liveness_interval=0.01)
    tx.send(bytes(500))
    tx.send(bytes(500))
    with pytest.raises(ChannelTimeout):
        tx.reserve(500, timeout=0.02)
    with pytest.raises(ChannelTimeout):
        tx.reserve(n=500, timeout=0.02)  # keywords, as the Python signature has them
    timer = threading.Timer(0.05, rx.recv)
    timer.start()
    view = tx.reserve(500, timeout=5)  # room appears when the timer's recv() frees it
    timer.join()
    view[:3] = b"abc"
    tx.commit(3)
    assert len(rx.recv(timeout=1)) == 500 and rx.recv(timeout=1) == b"abc"
    rx2 = Receiver(b, "resv2", sender=1, capacity=1024, spin=0)
    tx2 = Sender(a, "resv2", receiver=2, spin=0, liveness_interval=0.01)
    tx2.send(bytes(500))
    tx2.send(bytes(500))
    timer = threading.Timer(0.05, rx2.close)
    timer.start()
    with pytest.raises(ChannelClosedError, match="closed it"):
        tx2.reserve(500, timeout=5)
    timer.join()
    with pytest.raises(TypeError):
        tx.reserve()  # type: ignore[call-arg]


def test_duplex_request_reply_in_threads(pair: tuple[Any, Any]) -> None:
    a, b = pair
    errors: list[BaseException] = []

    def server() -> None:
        try:
            with Duplex(b, "rpc", peer=1) as d:
                for _ in range(200):
                    d.send(d.recv(timeout=10)[::-1])
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    t = threading.Thread(target=server)
    t.start()
    with Duplex(a, "rpc", peer=2) as d:
        for i in range(200):
            d.send(b"%d-abc" % i)
            assert d.recv(timeout=10) == (b"%d-abc" % i)[::-1]
    t.join(10)
    assert not errors


# -- across processes ----------------------------------------------------------------------

N_STREAM = 20000


def _stream_sender(path: str, count: int) -> None:
    with _plain(path, 1) as ep:
        tx = Sender(ep, "stream", receiver=2, timeout=20)
        rng = random.Random(7)
        for i in range(count):
            tx.send(_payload(i, rng.randrange(300)), timeout=20)
        tx.close()


def test_stream_between_processes_plain_region(pair: tuple[Any, Any], path: str) -> None:
    """The receiver here, the sender in a spawned interpreter; no doorbell: polling waits."""
    _, b = pair
    rx = Receiver(b, "stream", sender=1, capacity=4096)
    child = SPAWN.Process(target=_stream_sender, args=(path, N_STREAM))
    child.start()
    try:
        rng = random.Random(7)
        for i in range(N_STREAM):
            assert rx.recv(timeout=20) == _payload(i, rng.randrange(300))
        with pytest.raises(ChannelClosedError):
            rx.recv(timeout=20)
    finally:
        _finish(child)


def _array_receiver(path: str, count: int) -> None:
    with _plain(path, 2) as ep:
        rx = Receiver(ep, "arrays", sender=1, capacity=1 << 18)
        for i in range(count):
            arr = rx.recv_array(timeout=20)
            assert arr.shape == (i % 5 + 1, 100)
            assert np.array_equal(arr, np.full(arr.shape, i, "f8"))
            del arr
            rx.release()


def test_arrays_between_processes(pair: tuple[Any, Any], path: str) -> None:
    a, _ = pair
    child = FORK.Process(target=_array_receiver, args=(path, 300))
    child.start()
    try:
        tx = Sender(a, "arrays", receiver=2, timeout=20)
        for i in range(300):
            tx.send_array(np.full((i % 5 + 1, 100), i, "f8"), timeout=20)
    finally:
        _finish(child)


def _doorbell_echo(path: str, table: dict[int, Sequence[int]], rounds: int, spin: float) -> None:
    with DoorbellEndpoint(path, 2, table) as ep:
        with Duplex(ep, "echo", peer=1, spin=spin, timeout=20) as d:
            for _ in range(rounds):
                d.send(d.recv(timeout=20))


@pytest.mark.parametrize("spin", [0.0, 1e-4])
def test_doorbell_ping_pong_between_processes(
    path: str, doorbells: dict[int, Sequence[int]], spin: float
) -> None:
    with DoorbellEndpoint(path, 1, doorbells) as ep:
        format_region(ep, max_peers=4, peers={1: 2, 2: 2})
        child = FORK.Process(target=_doorbell_echo, args=(path, doorbells, 300, spin))
        child.start()
        try:
            with Duplex(ep, "echo", peer=2, spin=spin, timeout=20) as d:
                for i in range(300):
                    d.send(b"ping %d" % i)
                    assert d.recv(timeout=20) == b"ping %d" % i
        finally:
            _finish(child)


def test_no_doorbell_unless_the_receiver_sleeps(
    path: str, doorbells: dict[int, Sequence[int]]
) -> None:
    with DoorbellEndpoint(path, 1, doorbells) as a, DoorbellEndpoint(path, 2, doorbells) as b:
        format_region(a, max_peers=4, peers={1: 2, 2: 2})
        rx = Receiver(b, "quiet", sender=1, vector=1, spin=0)
        tx = Sender(a, "quiet", receiver=2)
        for i in range(100):
            tx.send(b"%d" % i)
        with pytest.raises(BlockingIOError):  # the receiver never slept: nobody rang it
            os.eventfd_read(doorbells[2][1])
        assert len(rx.recv_many(1000)) == 100
        # Now it sleeps: one send rings it exactly once, on the vector it asked for.
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(rx.recv(timeout=10)))
        t.start()
        deadline = time.monotonic() + 10
        while not rx._q[ringmod.R_WAIT] & 1:  # until it has announced that it sleeps
            assert time.monotonic() < deadline
            time.sleep(0.001)
        tx.send(b"wake")
        t.join(10)
        assert got == [b"wake"]


def _block_forever(path: str, table: dict[int, Sequence[int]] | None, result: Any) -> None:
    ep: Any = DoorbellEndpoint(path, 2, table) if table else _plain(path, 2)
    try:
        # With a doorbell, the periodic check is made too rare to matter: only the ring on the
        # membership vector can end the wait in time.
        rx = Receiver(
            ep, "gone", sender=1, spin=0, liveness_interval=60 if table else 0.05, timeout=20,
            membership_vector=1 if table else None,
        )  # fmt: skip
        result.send("ready")
        try:
            rx.recv(timeout=20)
            result.send("received?!")
        except PeerGoneError as err:
            result.send(f"gone {err.peer}")
        except ChannelTimeout:
            result.send("timed out")
    finally:
        ep.close()


@pytest.mark.parametrize("doorbell", [False, True])
def test_peer_that_leaves_ends_a_blocked_receive(
    path: str, doorbells: dict[int, Sequence[int]], doorbell: bool
) -> None:
    with _plain(path, 0) as server:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)  # this test plays the server
        writer.joined(1, 2)
        writer.joined(2, 2)
        mine, theirs = FORK.Pipe()
        child = FORK.Process(
            target=_block_forever, args=(path, doorbells if doorbell else None, theirs)
        )
        child.start()
        try:
            assert mine.poll(20) and mine.recv() == "ready"
            time.sleep(0.05)  # let it fall asleep
            writer.left(1)
            if doorbell:
                os.eventfd_write(doorbells[2][1], 1)  # the server's membership ring
            assert mine.poll(20) and mine.recv() == "gone 1"
        finally:
            _finish(child)


def test_sender_blocked_on_a_full_ring_sees_the_receiver_leave(path: str) -> None:
    with _plain(path, 0) as server, _plain(path, 1) as a, _plain(path, 2) as b:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)
        writer.joined(1, 0)
        writer.joined(2, 0)
        Receiver(b, "full", sender=1, capacity=1024)
        tx = Sender(a, "full", receiver=2, spin=0, liveness_interval=0.02)
        tx.send(bytes(500))
        tx.send(bytes(500))
        writer.left(2)
        with pytest.raises(PeerGoneError, match="peer 2 left"):
            tx.send(bytes(500), timeout=10)


def _async_sender(path: str, table: dict[int, Sequence[int]], count: int) -> None:
    with DoorbellEndpoint(path, 1, table) as ep:
        tx = Sender(ep, "async", receiver=2, timeout=20)
        for i in range(count):
            tx.send(b"%d" % i)
            if i % 50 == 0:
                time.sleep(0.002)  # let the receiver go to sleep now and then
        tx.close()


def test_async_receive(path: str, doorbells: dict[int, Sequence[int]]) -> None:
    with DoorbellEndpoint(path, 2, doorbells) as ep:
        format_region(ep, max_peers=4, peers={1: 2, 2: 2})
        rx = Receiver(ep, "async", sender=1)
        child = FORK.Process(target=_async_sender, args=(path, doorbells, 500))
        child.start()

        async def consume() -> list[bytes]:
            out = []
            try:
                while True:
                    out.append(await rx.recv_async(timeout=20))
            except ChannelClosedError:
                return out

        try:
            got = asyncio.run(consume())
            assert got == [b"%d" % i for i in range(500)]
        finally:
            _finish(child)


def test_async_on_a_plain_region_polls(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "apoll", sender=1)
    tx = Sender(a, "apoll", receiver=2)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, tx.send, b"later")
        return await rx.recv_async(timeout=10)

    assert asyncio.run(main()) == b"later"

    async def timeout() -> None:
        await rx.recv_async(timeout=0.01)

    with pytest.raises(ChannelTimeout):
        asyncio.run(timeout())


@pytest.mark.parametrize("kind", ["plain", "doorbell"])
def test_async_twins_move_everything_through_a_small_ring(
    path: str, doorbells: dict[int, Sequence[int]], kind: str
) -> None:
    """send_many_async, reserve_async, send_array_async and reserve_array_async against
    recv_many_async, recv_view_async and recv_array_async, both in one event loop, through
    a ring far smaller than the traffic, so each side keeps waiting for the other (polling
    on a plain region, sleeping on eventfd doorbells otherwise)."""

    def endpoint(peer: int) -> Any:
        return DoorbellEndpoint(path, peer, doorbells) if kind == "doorbell" else _plain(path, peer)

    with endpoint(1) as a, endpoint(2) as b:
        format_region(a, max_peers=4, peers={1: 2, 2: 2})
        rx = Receiver(b, "atwins", sender=1, capacity=4096, spin=0)
        tx = Sender(a, "atwins", receiver=2, spin=0)
        small = [_payload(i, 1 + i % 200) for i in range(300)]
        arrays = [np.arange(200, dtype="f8") * i for i in range(10)]

        async def produce() -> None:
            for i in range(0, len(small), 7):
                await tx.send_many_async(small[i : i + 7], timeout=10)
            for i in range(20):
                view = await tx.reserve_async(300, timeout=10)
                view[:] = _payload(1000 + i, 300)
                tx.commit()
            for arr in arrays:
                await tx.send_array_async(arr, timeout=10)
            for i in range(5):
                out = await tx.reserve_array_async((3, 4), "i4", timeout=10)
                out[...] = np.arange(12, dtype="i4").reshape(3, 4) + i
                del out
                tx.commit()
            tx.close()

        async def consume() -> None:
            got: list[bytes] = []
            while len(got) < len(small):
                got += await rx.recv_many_async(len(small) - len(got), timeout=10)
            assert got == small
            for i in range(20):
                view = await rx.recv_view_async(timeout=10)
                assert bytes(view) == _payload(1000 + i, 300)
                rx.release()
            for arr in arrays:
                assert np.array_equal(await rx.recv_array_async(timeout=10, copy=True), arr)
            for i in range(5):
                got_array = await rx.recv_array_async(timeout=10)
                assert got_array.shape == (3, 4) and got_array.dtype == np.dtype("i4")
                assert np.array_equal(got_array, np.arange(12).reshape(3, 4) + i)
                del got_array
                rx.release()
            with pytest.raises(ChannelClosedError):
                await rx.recv_many_async(timeout=10)

        async def main() -> None:
            await asyncio.wait_for(asyncio.gather(produce(), consume()), 60)

        asyncio.run(main())
        rx.close()


def test_async_twins_time_out_and_refuse_closed_ends(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "aclosed", sender=1, capacity=1024, spin=0)
    tx = Sender(a, "aclosed", receiver=2, spin=0, liveness_interval=0.01)
    tx.send(bytes(500))
    tx.send(bytes(500))

    async def full() -> None:
        with pytest.raises(ChannelTimeout):
            await tx.reserve_async(500, timeout=0.02)
        with pytest.raises(ChannelTimeout):
            await tx.send_many_async([b"x"] * 3, timeout=0.02)
        with pytest.raises(ChannelTimeout):
            await tx.send_array_async(np.zeros(50), timeout=0.02)
        asyncio.get_running_loop().call_later(0.02, rx.close)
        with pytest.raises(ChannelClosedError, match="closed it"):
            await tx.reserve_async(500, timeout=5)

    asyncio.run(full())
    tx.close()
    rx2 = Receiver(b, "aclosed2", sender=1, spin=0)

    async def empty() -> None:
        with pytest.raises(ChannelTimeout):
            await rx2.recv_many_async(timeout=0.02)
        rx2.close()
        with pytest.raises(ChannelClosedError, match="is closed"):
            await rx2.recv_many_async(timeout=1)

    asyncio.run(empty())


def test_sender_never_writes_into_a_recycled_arena(path: str) -> None:
    """The receiver leaves and a newcomer gets its slot (and arena): the old sender, which
    still has room in its ring, must fail with PeerGoneError without touching that memory."""
    with _plain(path, 0) as server, _plain(path, 1) as a, _plain(path, 2) as b:
        region = format_region(server, max_peers=2)
        writer = MembershipWriter(server)
        writer.joined(1, 0)
        slot = writer.joined(2, 0)
        Receiver(b, "old", sender=1, capacity=1024).close()
        tx = Sender(a, "old", receiver=2)
        tx.send(b"before")
        writer.left(2)
        assert writer.joined(3, 0) == slot  # the only free slot: the arena is recycled
        base = region.arena_offset(slot)
        before = bytes(server.memory[base : base + region.arena_size])
        with pytest.raises(PeerGoneError, match="peer 2 left"):
            tx.send(b"after")
        with pytest.raises(PeerGoneError):
            tx.reserve(10)
        tx.close()  # closing after the peer left writes nothing and raises nothing
        assert bytes(server.memory[base : base + region.arena_size]) == before


def test_a_sender_waiting_for_a_receiver_that_leaves(path: str) -> None:
    with _plain(path, 0) as server, _plain(path, 1) as a:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)
        writer.joined(1, 0)
        writer.joined(2, 0)
        threading.Timer(0.05, writer.left, (2,)).start()
        with pytest.raises(PeerGoneError, match="peer 2 left"):
            Sender(a, "never", receiver=2, timeout=10)


def test_async_receive_ends_when_the_sender_leaves(path: str) -> None:
    with _plain(path, 0) as server, _plain(path, 2) as b:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)
        writer.joined(1, 0)
        writer.joined(2, 0)
        rx = Receiver(b, "aleave", sender=1, liveness_interval=0.02)

        async def main() -> None:
            asyncio.get_running_loop().call_later(0.05, writer.left, 1)
            await rx.recv_async(timeout=10)

        with pytest.raises(PeerGoneError, match="peer 1 left"):
            asyncio.run(main())


def test_last_message_before_leaving_is_delivered_despite_the_membership_ring(
    path: str, doorbells: dict[int, Sequence[int]]
) -> None:
    """A sender publishes its last message and leaves; the server rings the membership
    vector. The receiver, woken by that ring, must deliver the message before PeerGoneError.
    The sender here cannot ring (a plain region), so only the membership ring wakes the
    receiver, with the message already in the ring."""
    with _plain(path, 0) as server, _plain(path, 1) as a, DoorbellEndpoint(path, 2, doorbells) as b:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)
        writer.joined(1, 0)
        writer.joined(2, 2)
        rx = Receiver(b, "last", sender=1, spin=0, liveness_interval=60, membership_vector=1)
        tx = Sender(a, "last", receiver=2)
        got: list[object] = []

        def receive() -> None:
            for _ in range(2):
                try:
                    got.append(rx.recv(timeout=20))
                except Exception as err:
                    got.append(err)

        t = threading.Thread(target=receive)
        t.start()
        time.sleep(0.05)  # let it fall asleep (past its capped first sleep)
        tx.send(b"last words")
        writer.left(1)
        os.eventfd_write(doorbells[2][1], 1)  # the server's membership ring
        t.join(30)
        assert not t.is_alive()
        assert got[0] == b"last words", got
        assert isinstance(got[1], PeerGoneError) and got[1].peer == 1, got


def test_a_sender_not_connected_yet_is_waited_for(path: str) -> None:
    """A receiver created before its sender joins: the sender is not gone, it has not come.
    The wait goes on to its timeout (ChannelTimeout), and a sender that joins later is heard."""
    with _plain(path, 0) as server, _plain(path, 1) as a, _plain(path, 2) as b:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)  # a server-kept table: presence is known
        writer.joined(2, 0)
        rx = Receiver(b, "early", sender=1, liveness_interval=0.01)
        with pytest.raises(ChannelTimeout):
            rx.recv(timeout=0.3)  # thirty liveness checks, none may say "peer 1 left"
        writer.joined(1, 0)
        tx = Sender(a, "early", receiver=2)
        tx.send(b"here now")
        assert rx.recv(timeout=10) == b"here now"
        writer.left(1)
        with pytest.raises(PeerGoneError, match="peer 1 left"):
            rx.recv(timeout=10)  # seen present, then absent: gone


def test_a_sender_that_came_and_went_unseen_is_gone(path: str) -> None:
    """A sender that opened the channel and left between two liveness checks was here: the
    receiver ends with PeerGoneError, not a timeout."""
    with _plain(path, 0) as server, _plain(path, 1) as a, _plain(path, 2) as b:
        format_region(server, max_peers=4)
        writer = MembershipWriter(server)
        writer.joined(2, 0)
        rx = Receiver(b, "brief", sender=1, liveness_interval=0.01)
        writer.joined(1, 0)
        Sender(a, "brief", receiver=2).send(b"hello")
        writer.left(1)
        assert rx.recv(timeout=10) == b"hello"
        with pytest.raises(PeerGoneError, match="peer 1 left"):
            rx.recv(timeout=10)


def test_an_endpoint_that_cannot_receive_still_rings(
    path: str, doorbells: dict[int, Sequence[int]]
) -> None:
    """A sender whose endpoint has no vectors of its own (a guest device opened without
    interrupts) can still ring: the sleeping receiver must be woken by its doorbell, not
    left to its next liveness check (made an hour away here)."""
    table = {1: (), 2: doorbells[2]}
    with DoorbellEndpoint(path, 1, table) as a, DoorbellEndpoint(path, 2, table) as b:
        format_region(a, max_peers=4, peers={1: 0, 2: 2})
        assert a.vectors == 0
        rx = Receiver(b, "ring", sender=1, spin=0, liveness_interval=3600)
        tx = Sender(a, "ring", receiver=2)
        got: list[object] = []

        def receive() -> None:
            try:
                got.append(rx.recv(timeout=None))
            except Exception as err:
                got.append(err)

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        time.sleep(0.05)  # asleep on its doorbell, past its capped first sleep
        tx.send(b"ding")
        t.join(10)  # without the sender's ring, it would sleep for the hour
        hung = t.is_alive()
        if hung:
            os.eventfd_write(doorbells[2][0], 1)  # wake it ourselves, so the test cleans up
            t.join(10)
        assert not hung, "the sender did not ring the sleeping receiver"
        assert got == [b"ding"]


def test_batches_wrap_fill_and_arrive_in_order(pair: tuple[Any, Any]) -> None:
    """send_many writes many records per publish and recv_many consumes many per tail
    store: through wrap-arounds and a ring that fills (the sender then waits for room),
    every message arrives once, in order, with its exact bytes."""
    a, b = pair
    rx = Receiver(b, "batch", sender=1, capacity=1024)
    tx = Sender(a, "batch", receiver=2)
    rng = random.Random(7)
    sizes = [rng.randrange(0, 300) for _ in range(2000)]
    sent = [_payload(i, n) for i, n in enumerate(sizes)]
    t = threading.Thread(target=lambda: tx.send_many(iter(sent), timeout=30))
    t.start()
    got: list[bytes] = []
    while len(got) < len(sent):
        got.extend(rx.recv_many(37, timeout=30))
    t.join(30)
    assert got == sent
    assert rx.recv_many(0) == [] and rx.try_recv() is None


# -- bad arguments: a clear UsageError before anything is written -----------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sender": 70000}, "sender peer id 70000 is outside 0..65535"),
        ({"sender": -1}, "outside 0..65535"),
        ({"sender": "1"}, "sender peer id must be an int"),
        ({"sender": 1.0}, "must be an int"),
        ({"sender": 1, "name": ""}, "1..32 bytes"),
        ({"sender": 1, "name": "x" * 33}, "1..32 bytes"),
        ({"sender": 1, "name": 123}, "a channel name is a str"),
        ({"sender": 1, "name": "\udc80"}, "cannot be encoded"),
        ({"sender": 1, "capacity": 1024.0}, "power of two"),
        ({"sender": 1, "capacity": "1024"}, "power of two"),
        ({"sender": 1, "spin": float("nan")}, "spin must be a number of seconds >= 0, not nan"),
        ({"sender": 1, "spin": -1}, "spin must be a number of seconds >= 0, not -1"),
        ({"sender": 1, "timeout": -1}, "timeout must be a number of seconds >= 0, not -1"),
        ({"sender": 1, "timeout": "1"}, "timeout must be a number of seconds >= 0"),
        ({"sender": 1, "liveness_interval": float("nan")}, "liveness_interval must be a number"),
        ({"sender": 1, "liveness_interval": float("inf")}, "must be a finite number"),
        ({"sender": 1, "liveness_interval": 3e6}, "longer than a day"),
        ({"sender": 1, "poll_interval": 0}, "poll_interval must be a number of seconds > 0"),
        ({"sender": 1, "vector": 1.0}, "vector must be an int"),
        ({"sender": 1, "membership_vector": True}, "membership_vector must be an int"),
    ],
)
def test_bad_end_arguments_are_refused_before_anything_is_written(
    pair: tuple[Any, Any], kwargs: dict[str, Any], message: str
) -> None:
    a, b = pair
    before = bytes(b.memory)
    args = {"name": "fine", **kwargs}
    with pytest.raises(UsageError, match=re.escape(message)):
        Receiver(b, **args)
    assert bytes(b.memory) == before
    receiver = args.pop("sender")
    if "capacity" not in args:  # a Receiver's option only
        with pytest.raises(UsageError, match=re.escape(message).replace("sender", "receiver")):
            Sender(a, receiver=receiver, **args)
    # The region is intact: channels open and carry messages as before.
    with Receiver(b, "after", sender=1) as rx, Sender(a, "after", receiver=2) as tx:
        tx.send(b"ok")
        assert rx.recv(timeout=5) == b"ok"


def test_bad_message_arguments(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "args", sender=1, capacity=1024)
    tx = Sender(a, "args", receiver=2, spin=0)
    refused: list[tuple[Callable[[], object], str]] = [
        (lambda: tx.send(np.array([1, "x", None], dtype=object)), "Python objects"),  # type: ignore[arg-type]
        (lambda: tx.send(memoryview(bytearray(b"abcdef"))[::2]), "not contiguous"),
        (lambda: tx.send(np.arange(10)[::2]), "not contiguous"),  # type: ignore[arg-type]
        (lambda: tx.send("text"), "not str"),  # type: ignore[arg-type]
        (lambda: tx.send(None), "not NoneType"),  # type: ignore[arg-type]
        (lambda: tx.try_send_many([b"a"], -1), "start -1 is negative"),
        (lambda: tx.reserve(2**70), "does not fit"),
        (lambda: tx.reserve("10"), "whole number of bytes"),  # type: ignore[arg-type]
        (lambda: tx.reserve_array("12"), "not an array shape"),  # type: ignore[arg-type]
        (lambda: tx.reserve_array((2, -1)), "not an array shape"),
        (lambda: tx.send_many(b"abc"), "send() sends one message"),  # type: ignore[arg-type]
        (lambda: rx.recv_many(-1), "max_messages -1 is outside"),
        (lambda: rx.recv_many(1.5), "max_messages must be an int"),  # type: ignore[arg-type]
        (lambda: rx.recv_many(2**70), "outside 0.."),
        (
            lambda: rx.recv(timeout=float("nan")),
            "timeout must be a number of seconds >= 0, not nan",
        ),
    ]
    for call, message in refused:
        with pytest.raises(UsageError, match=re.escape(message)):
            call()
    assert rx.try_recv() is None  # nothing was sent by any of them
    tx.reserve(8)
    for n in (2**63, -1, 1.5, "1"):
        with pytest.raises(UsageError, match="outside the reserved"):
            tx.commit(n)  # type: ignore[arg-type]
    tx.commit(2)
    assert rx.recv(timeout=1) == bytes(2)
    # What does travel: any C-contiguous buffer, whatever its item format; numpy ints as sizes.
    tx.send(np.arange(3, dtype=">u2"))  # type: ignore[arg-type]
    assert rx.recv(timeout=1) == np.arange(3, dtype=">u2").tobytes()
    out = tx.reserve_array(np.int64(3), "i4")
    out[:] = [1, 2, 3]
    del out
    tx.commit()
    assert rx.recv_array(timeout=1, copy=True).tolist() == [1, 2, 3]
    assert rx.recv_many(0) == []


def test_send_many_says_how_much_went_out_when_it_fails(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "partial", sender=1, capacity=1024)
    tx = Sender(a, "partial", receiver=2, spin=0)
    with pytest.raises(UsageError) as bad:
        tx.send_many([b"a", b"b", None])  # type: ignore[list-item]
    assert "none of the 3 messages was sent" in "".join(getattr(bad.value, "__notes__", []))
    tx.send(b"later")
    assert rx.recv_many(timeout=1) == [b"later"]  # a and b were not left behind
    # Two fit, the ring is then full and nobody reads: they are sent, the rest is not.
    with pytest.raises(ChannelTimeout) as late:
        tx.send_many([bytes(400)] * 3, timeout=0.05)
    notes = "".join(getattr(late.value, "__notes__", []))
    assert "the first 2 of the 3 messages were sent" in notes
    assert rx.recv_many(timeout=1) == [bytes(400)] * 2
    assert rx.try_recv() is None


def test_copied_array_keeps_earlier_views_valid(pair: tuple[Any, Any]) -> None:
    a, b = pair
    rx = Receiver(b, "keep", sender=1)
    tx = Sender(a, "keep", receiver=2)
    tx.send(b"held")
    tx.send_array(np.arange(4))
    view = rx.recv_view(timeout=1)
    assert rx.recv_array(timeout=1, copy=True).tolist() == [0, 1, 2, 3]
    assert bytes(view) == b"held"  # not revoked by the copy
    rx.release()
    with pytest.raises(ValueError):
        bytes(view)
    tx.send_array(np.arange(2))
    assert rx.recv_array(timeout=1, copy=True).tolist() == [0, 1]
    assert rx._views == []  # nothing else was held: the copied message went back at once

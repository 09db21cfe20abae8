"""The server's C fan-out (_fanout.c) against the Python path it stands in for (queues.py).

The C call sends a join's or a leave's messages until the kernel refuses one, and the Python
side takes over there with its queues; these tests put real sockets in the states that make
the kernel refuse -- a socket buffer full mid-fan-out, a client gone mid-fan-out -- and check
that both paths leave the same queues, counts and fd references, and deliver the same
messages and fds in the same order once the clients read. ``IVSHMEM_PURE_PYTHON=1`` (or a
build without the extension) skips the C half; the Python half always runs.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require

from ivshmem.server import Server, ServerConfig
from ivshmem.server import queues as queues_mod
from ivshmem.server.fds import SharedFd
from ivshmem.server.queues import Message, _Client

fanout: object | None
try:
    from ivshmem.server import _fanout as fanout_mod

    fanout = fanout_mod
except ImportError:  # not built (no compiler): the Python path is all there is
    fanout = None

_PURE = os.environ.get("IVSHMEM_PURE_PYTHON", "") not in ("", "0")
#: The C half: skipped under IVSHMEM_PURE_PYTHON=1, and where the extension did not build
#: (no compiler) -- except in CI, where it must have built.
needs_c = pytest.mark.skipif(
    _PURE or (queues_mod._FANOUT is None and not os.environ.get("CI")),
    reason="the C fan-out is switched off (IVSHMEM_PURE_PYTHON=1) or not built here",
)


@needs_c
def test_the_c_fan_out_is_built_and_used() -> None:
    require(
        queues_mod.ACCELERATED,
        "the server's C fan-out did not build (pip install needs gcc and the Python headers)",
    )
    assert queues_mod._FANOUT is not None


def test_pure_python_can_be_forced() -> None:
    code = "import ivshmem.server.queues as q; print(q.ACCELERATED, q._FANOUT)"
    env = {**os.environ, "IVSHMEM_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "None"]


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _fill(sock: socket.socket) -> int:
    """Send 8-byte messages into ``sock`` until the kernel refuses one; returns how many."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    count = 0
    while True:
        try:
            sock.send(b"\0" * 8, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return count
        count += 1


def _receive(sock: socket.socket, skip: int = 0) -> list[tuple[int, int | None]]:
    """Everything readable on ``sock``: (value, inode of the fd it carried or None), after
    dropping ``skip`` filler messages. Received fds are closed."""
    got: list[tuple[int, int | None]] = []
    buffer = b""
    pending: list[int] = []
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(8, socket.CMSG_SPACE(4 * 4))
        except BlockingIOError:
            break
        if not data:
            break
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % 4])
                pending.extend(fds)
        buffer += data
        while len(buffer) >= 8:
            value = int.from_bytes(buffer[:8], "little", signed=True)
            buffer = buffer[8:]
            inode: int | None = None
            if pending:
                fd = pending.pop(0)
                inode = os.fstat(fd).st_ino
                os.close(fd)
            got.append((value, inode))
    assert not buffer and not pending
    return got[skip:]


# --------------------------------------------------------------------------------------------
# The C call itself


@needs_c
def test_c_send_delivers_values_and_fds_and_counts_per_recipient() -> None:
    send = queues_mod._FANOUT
    assert send is not None
    a, a_peer = _socketpair()
    b, b_peer = _socketpair()
    memfd = os.memfd_create("fanout-test", os.MFD_CLOEXEC)
    holder = SharedFd(memfd)
    try:
        sends: list[Message] = [(1, 7, None), (1, -1, holder), (2, 2**40, holder), (1, 3, None)]
        socks = {1: [a.fileno(), 0], 2: [b.fileno(), 0]}
        assert send(sends, socks) == (4, [], [])
        assert socks == {1: [a.fileno(), 3], 2: [b.fileno(), 1]}
        inode = os.fstat(memfd).st_ino
        assert _receive(a_peer) == [(7, None), (-1, inode), (3, None)]
        assert _receive(b_peer) == [(2**40, inode)]
        assert holder.refs == 1  # the C call takes no reference
    finally:
        holder.release()
        for s in (a, a_peer, b, b_peer):
            s.close()


@needs_c
def test_c_send_batches_a_run_but_each_fd_arrives_with_its_own_message() -> None:
    """A run of messages for one client goes in few sendmmsg() calls (64 messages each), yet
    a reader that, like QEMU, reads 8 bytes with room for one fd gets each fd with its own
    message: never two fds at once (which would be cut off, MSG_CTRUNC), never a message
    without its fd. 150 messages cross two batch boundaries; every third carries none."""
    send = queues_mod._FANOUT
    assert send is not None
    a, a_peer = _socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    holders = [SharedFd(os.memfd_create(f"fanout-run-{i}", os.MFD_CLOEXEC)) for i in range(3)]
    try:
        sends: list[Message] = [
            (7, value, None if value % 3 == 2 else holders[value % 3]) for value in range(150)
        ]
        socks = {7: [a.fileno(), 0]}
        assert send(sends, socks) == (150, [], [])
        assert socks[7][1] == 150
        inodes = [os.fstat(h.fileno()).st_ino for h in holders]
        for value in range(150):
            data, anc, flags, _addr = a_peer.recvmsg(8, socket.CMSG_SPACE(4))
            assert int.from_bytes(data, "little", signed=True) == value
            assert not flags & socket.MSG_CTRUNC
            fds = [
                fd
                for level, kind, payload in anc
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4])
            ]
            try:
                expected = [] if value % 3 == 2 else [inodes[value % 3]]
                assert [os.fstat(fd).st_ino for fd in fds] == expected
            finally:
                for fd in fds:
                    os.close(fd)
        with pytest.raises(BlockingIOError):
            a_peer.recv(8)
    finally:
        for holder in holders:
            holder.release()
        for s in (a, a_peer):
            s.close()


@needs_c
def test_c_send_goes_on_past_a_refusing_client_and_leaves_the_rest_to_queue() -> None:
    send = queues_mod._FANOUT
    assert send is not None
    a, a_peer = _socketpair()
    full, full_peer = _socketpair()
    gone, gone_peer = _socketpair()
    gone_peer.close()
    closed = SharedFd(os.memfd_create("fanout-closed", os.MFD_CLOEXEC))
    closed.release()
    try:
        filler = _fill(full)
        assert len(full_peer.recv(8)) == 8  # room for one more message
        socks = {1: [a.fileno(), 0], 2: [full.fileno(), 0], 3: [gone.fileno(), 0]}
        sends: list[Message] = [(1, 1, None), (2, 2, None), (2, 3, None), (3, 4, None)]
        sends += [(4, 5, None), (1, 6, None), (2, 7, None), (3, 8, None)]
        # 2 takes one then refuses (EAGAIN), 3 is gone (EPIPE, and no SIGPIPE), 4 is not
        # sent to: their messages are left, in order; 1 gets all of its.
        assert send(sends, socks) == (8, [2, 3, 4, 6, 7], [])
        assert socks == {1: [a.fileno(), 2], 2: [-errno.EAGAIN, 1], 3: [-errno.EPIPE, 0]}
        # A closed fd, or what is not a message: nothing tried from there, the Python path
        # decides (what came before is done as usual).
        socks = {1: [a.fileno(), 0]}
        assert send([(1, 9, None), (4, 0, None), (1, 9, closed), (1, 10, None)], socks) == (
            2,
            [1],
            [],
        )
        assert send([(1, 9)], socks) == (0, [], [])  # type: ignore[list-item]
        assert socks[1][1] == 1
        assert _receive(a_peer) == [(1, None), (6, None), (9, None)]
        assert _receive(full_peer, skip=filler - 1) == [(2, None)]
    finally:
        for s in (a, a_peer, full, full_peer, gone):
            s.close()


# --------------------------------------------------------------------------------------------
# Both paths of _dispatch, side by side


@dataclass
class Scene:
    server: Server
    peers: dict[int, socket.socket]  # the clients' ends, by peer id
    fillers: dict[int, int]  # messages sent to fill a socket before the fan-out
    holders: list[SharedFd]
    inodes: list[int]

    def close(self) -> None:
        for client in list(self.server._clients.values()):
            self.server._drop(client, announce=False)
        for holder in self.holders:
            holder.release()
        for sock in self.peers.values():
            sock.close()


def _scene(short_tmp: Path) -> Scene:
    """Five clients: 1 and 5 read, 2's socket buffer is full, 3 is gone (its end closed), 4
    has messages queued already; and three fds to pass."""
    config = ServerConfig(socket_path=str(short_tmp / "s"), backing="memfd", size=4096)
    server = Server(config)
    server._queue_limit = lambda: 1000  # type: ignore[method-assign]
    peers: dict[int, socket.socket] = {}
    fillers: dict[int, int] = {}
    for peer in range(1, 6):
        ours, theirs = _socketpair()
        server._clients[peer] = _Client(ours, peer, (os.getpid(), os.getuid(), os.getgid()))
        peers[peer] = theirs
    # 2's buffer is full with room for one more message: the fan-out's first message for
    # it goes, the kernel refuses the second (it reads one of the fillers to make room).
    fillers[2] = _fill(server._clients[2].sock) - 1
    assert len(peers[2].recv(8)) == 8
    peers.pop(3).close()
    holders = [SharedFd(os.memfd_create(f"fanout-{i}", os.MFD_CLOEXEC)) for i in range(3)]
    inodes = [os.fstat(h.fileno()).st_ino for h in holders]
    server._dispatch([(4, 100, holders[0])])  # 4 reads nothing yet: ...
    queued = server._clients[4]
    assert queued.sent == 1 and not queued.queue
    # ... make it a client with a queue, as a full socket earlier would have.
    server._enqueue(queued, 101, holders[1], 1000)
    server._queued_total += 1
    return Scene(server, peers, fillers, holders, inodes)


def _fan_out(scene: Scene) -> None:
    h = scene.holders
    # A join's shape (runs per recipient) and a leave's, with a recipient that is not there
    # (6) and recipients that come back after others (1, 2).
    sends: list[Message] = [(1, 10, h[0]), (2, 20, h[0]), (2, 21, h[1]), (3, 30, h[2])]
    sends += [(4, 40, h[2]), (6, 60, h[0]), (1, 11, None), (5, 50, h[1]), (2, 22, None)]
    sends += [(5, 51, None), (3, 31, None), (1, 12, h[2])]
    scene.server._dispatch(sends)


State = dict[int, tuple[Any, ...]]
Delivered = dict[int, list[tuple[int, int | None]]]


def _state(scene: Scene) -> State:
    out: State = {}
    index = {id(h): i for i, h in enumerate(scene.holders)}
    for peer, client in scene.server._clients.items():
        out[peer] = (
            list(client.queue),
            [None if f is None else index[id(f)] for f in client.fds],
            client.sent,
            client.partial,
            client.dirty,
            dict(client.joins_queued),
        )
    out[0] = (
        scene.server._queued_total,
        scene.server._counters.messages_sent,
        [h.refs for h in scene.holders],
        sorted(c.peer for c in scene.server._dirty),
    )
    return out


def _delivered(scene: Scene) -> dict[int, list[tuple[int, int | None]]]:
    """Let every client read, flush what is queued, read again: what each one got, with
    fds as indexes into the scene's holders."""
    server = scene.server
    got: dict[int, list[tuple[int, int | None]]] = {}
    for _round in range(50):
        for peer, sock in scene.peers.items():
            got.setdefault(peer, []).extend(_receive(sock))
        server._flush_dirty()
        for client in list(server._clients.values()):
            if client.queue and not client.closed:
                server._flush(client)
        if not any(c.queue or c.partial for c in server._clients.values()):
            break
    for peer, sock in scene.peers.items():
        got[peer].extend(_receive(sock))
    inodes = {inode: i for i, inode in enumerate(scene.inodes)}
    return {
        peer: [
            (v, None if ino is None else inodes[ino])
            for v, ino in msgs[scene.fillers.get(peer, 0) :]
        ]
        for peer, msgs in got.items()
    }


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], None]]:
    def use(c: bool) -> None:
        monkeypatch.setattr(queues_mod, "_FANOUT", fanout_mod.send if c and fanout else None)

    yield use


def _run(short_tmp: Path, use: Callable[[bool], None], c: bool) -> tuple[State, bool, Delivered]:
    use(c)
    scene = _scene(short_tmp)
    try:
        _fan_out(scene)
        state = _state(scene)
        delivered = _delivered(scene)
        gone = 3 not in scene.server._clients
        return state, gone, delivered
    finally:
        scene.close()
        # Every queued reference was given back: only the scene's own remain.
        assert [h.refs for h in scene.holders] == [0, 0, 0]


def test_python_path_full_and_vanished_clients_mid_fan_out(
    short_tmp: Path, paths: Callable[[bool], None]
) -> None:
    state, gone, delivered = _run(short_tmp, paths, c=False)
    # 1 and 5 took everything at once; 2 (full) and 4 (queue) queued theirs in order.
    assert state[1][:4] == ([], [], 3, b"")
    assert state[5][:4] == ([], [], 2, b"")
    assert state[2][:3] == ([21, 22], [1, None], 1)
    assert state[4][:2] == ([101, 40], [1, 2])
    # 3 vanished: its messages wait for flushing to meet EPIPE and drop it.
    assert state[3][:2] == ([30, 31], [2, None])
    assert gone
    assert delivered == {
        1: [(10, 0), (11, None), (12, 2)],
        2: [(20, 0), (21, 1), (22, None)],
        4: [(100, 0), (101, 1), (40, 2)],
        5: [(50, 1), (51, None)],
    }


@needs_c
def test_c_path_matches_the_python_path_mid_fan_out(
    short_tmp: Path, paths: Callable[[bool], None]
) -> None:
    python = _run(short_tmp, paths, c=False)
    c = _run(short_tmp, paths, c=True)
    assert c == python


@needs_c
def test_c_path_hands_a_closed_fd_to_the_python_path(
    short_tmp: Path, paths: Callable[[bool], None]
) -> None:
    """A message whose fd is closed (a bug elsewhere) gets the Python path's behaviour:
    the messages before it are sent, and ClosedError is raised, not a closed number sent."""
    results = []
    for c in (False, True):
        paths(c)
        scene = _scene(short_tmp)
        try:
            dead = SharedFd(os.memfd_create("fanout-dead", os.MFD_CLOEXEC))
            dead.release()
            with pytest.raises(Exception, match="already closed"):
                scene.server._dispatch([(1, 1, None), (5, 5, None), (1, 2, dead)])
            results.append(_delivered(scene))
        finally:
            scene.close()
    assert results[0] == results[1]
    assert results[1][1] == [(1, None)] and results[1][5] == [(5, None)]


@needs_c
def test_c_path_keeps_the_tail_of_a_message_the_kernel_took_in_part(
    short_tmp: Path, paths: Callable[[bool], None]
) -> None:
    """A stream socket may take part of a message (its fd goes with byte 0). The kernel does
    not do that to 8 bytes on demand, so the first message here is sent in part for it, by
    hand, and reported as the C call reports a partial send; the rest is the real C call."""
    paths(True)
    real = queues_mod._FANOUT
    assert real is not None and fanout is not None
    scene = _scene(short_tmp)
    h = scene.holders

    def first_in_part(
        sends: list[Message], socks: dict[int, list[int]]
    ) -> tuple[int, list[int], list[tuple[int, int]]]:
        recipient, value, holder = sends[0]
        assert holder is not None
        data = value.to_bytes(8, "little", signed=True)
        socket.send_fds(scene.server._clients[recipient].sock, [data[:3]], [holder.fileno()])
        socks[recipient] = [fanout_mod.PARTIAL, 1]
        index, rest, partials = real(sends, socks)
        return index, [i for i in rest if i != 0], [(0, 3), *partials]

    queues_mod._FANOUT = first_in_part
    try:
        scene.server._dispatch([(1, 10, h[0]), (1, 11, None), (5, 50, h[1])])
        one = scene.server._clients[1]
        assert (one.partial, list(one.queue), one.sent) == ((10).to_bytes(8, "little")[3:], [11], 1)
        # The scene sent one to 4 already; then 1's first (in part) and 5's.
        assert scene.server._counters.messages_sent == 3
        scene.server._flush_dirty()  # the tail first, then 1's queue
        assert not one.partial and not one.queue
        assert _delivered(scene) == {
            1: [(10, 0), (11, None)],
            2: [],
            4: [(100, 0), (101, 1)],
            5: [(50, 1)],
        }
    finally:
        scene.close()
    assert [holder.refs for holder in h] == [0, 0, 0]


@pytest.mark.parametrize("c", [False, True])
def test_a_long_queue_flushes_in_order_with_each_fd_through_a_filling_socket(
    short_tmp: Path, paths: Callable[[bool], None], c: bool
) -> None:
    """600 queued messages (two in three carry an fd) flushed into a socket that fills and
    is read in between, many times: with the C fan-out (batches of 256, refused part-way) as
    with the Python loop, each message arrives once, in order, with its own fd, and every
    queued reference is given back."""
    if c and fanout is None:
        pytest.skip("the C fan-out is not built")
    paths(c)
    config = ServerConfig(socket_path=str(short_tmp / "s"), backing="memfd", size=4096)
    server = Server(config)
    ours, theirs = _socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = _Client(ours, 7, (os.getpid(), os.getuid(), os.getgid()))
    server._clients[7] = client
    holders = [SharedFd(os.memfd_create(f"fanout-flush-{i}", os.MFD_CLOEXEC)) for i in range(2)]
    inodes = [os.fstat(h.fileno()).st_ino for h in holders]
    try:
        for value in range(600):
            holder = None if value % 3 == 2 else holders[value % 3]
            server._enqueue(client, value, holder, limit=10_000)
        server._queued_total = 600
        got: list[tuple[int, int | None]] = []
        rounds = 0
        while client.queue or client.partial:
            rounds += 1
            assert rounds < 10_000
            server._flush(client)
            got.extend(_receive(theirs))
        got.extend(_receive(theirs))
        assert rounds > 3  # the socket filled: the queue went out in several flushes
        expected = [(v, None if v % 3 == 2 else inodes[v % 3]) for v in range(600)]
        assert got == expected
        assert client.sent == 600 and server._queued_total == 0
        assert not client.joins_queued
        assert [h.refs for h in holders] == [1, 1]  # only the test's own
    finally:
        for holder in holders:
            holder.release()
        ours.close()
        theirs.close()

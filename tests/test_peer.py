"""The host peer (ivshmem.peer): against scripted bad servers, and against the real server.

The scripted server is a real Unix socket served from a thread, sending exactly the messages a
test gives it, so each way a server can break the protocol is tried for real (SCM_RIGHTS and
all) and the test can check that the client closed every fd it received. The real-server tests
run ``ivshmem-server`` as a process (tests/serverproc.py) and host peers in this process and in
child processes.
"""

from __future__ import annotations

import array
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess

from ivshmem.errors import (
    ClosedError,
    ConnectionLostError,
    ProtocolError,
    UnknownPeerError,
    UnknownVectorError,
    UsageError,
)
from ivshmem.peer import (
    HandshakeTimeoutError,
    Peer,
    Reconnected,
    ServerUnavailableError,
    connect,
    connect_async,
)
from ivshmem.protocol import encode

pytestmark = pytest.mark.timeout(60)

# Hang catchers only: every wait returns as soon as the awaited thing happens.
WAIT = 10.0


def open_fds() -> set[str]:
    """What this process has open, as ``fd -> target`` strings (a reused number with a new
    target counts as a change). Collects garbage first, so that objects other tests dropped
    do not close their fds in the middle of a comparison."""
    gc.collect()
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
        except FileNotFoundError:
            pass  # the fd listdir itself used
    return found


def shm_mappings() -> int:
    """Shared-memory mappings of this process (memfd and /dev/shm)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "memfd:" in line or "/dev/shm/" in line)


def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- a scripted server -------------------------------------------------------------------

# A step: (value, attachment) where attachment is None, "shm", "eventfd", "two"/"five" (that
# many eventfds on one message), "file" (a regular file as an eventfd), "pipe", "empty-shm"; or a
# marker: "close" (hang up), "split" (send the next message in two writes), "pause" (0.3 s of
# silence).
Step = tuple[int, str | None] | str


class ScriptedServer:
    """Accepts one client and sends it a script; closes its own copy of every fd it sends."""

    def __init__(
        self,
        directory: Path,
        script: Sequence[Step],
        hold: bool = True,
        backlog: int = 1,
        gate: threading.Event | None = None,
    ) -> None:
        self.path = str(directory / "scripted.sock")
        self.script = list(script)
        self.hold = hold
        #: Accept nothing until ``gate`` is set; then first accept (and drop) ``skip`` clients.
        self.gate = gate
        self.skip = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(backlog)
        self.release = threading.Event()
        self.failure: BaseException | None = None
        self.scratch = directory / "scratch"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _make_fd(self, kind: str) -> list[int]:
        if kind == "shm":
            fd = os.memfd_create("scripted")
            os.ftruncate(fd, 65536)
            return [fd]
        if kind == "eventfd":
            return [os.eventfd(0)]
        if kind == "two":
            return [os.eventfd(0), os.eventfd(0)]
        if kind == "five":
            return [os.eventfd(0) for _ in range(5)]
        if kind == "file":
            return [os.open(self.scratch, os.O_RDWR | os.O_CREAT, 0o600)]
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return [r]
        if kind == "empty-shm":
            return [os.memfd_create("empty")]
        raise AssertionError(kind)

    def _serve(self) -> None:
        try:
            if self.gate is not None:
                self.gate.wait(WAIT)
                for _ in range(self.skip):
                    self.listener.accept()[0].close()
            conn, _ = self.listener.accept()
            with conn:
                split = False
                for step in self.script:
                    if step == "close":
                        return
                    if step == "split":
                        split = True
                        continue
                    if step == "pause":  # longer than the client's quiet period
                        time.sleep(0.3)
                        continue
                    assert isinstance(step, tuple)
                    value, kind = step
                    fds = self._make_fd(kind) if kind else []
                    data = encode(value)
                    try:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        if split:  # the message in two writes: the client must reassemble it
                            conn.sendmsg([data[:3]], anc if fds else [])
                            time.sleep(0.01)
                            conn.send(data[3:])
                            split = False
                        else:
                            conn.sendmsg([data], anc if fds else [])
                    finally:
                        for fd in fds:
                            os.close(fd)
                if self.hold:
                    self.release.wait(WAIT)
        except BaseException as err:  # reported by stop()
            self.failure = err

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.release.set()
        self.thread.join(WAIT)
        self.listener.close()
        os.unlink(self.path)
        if self.scratch.exists():
            self.scratch.unlink()
        # The client hanging up on a bad script is expected.
        if self.failure is not None and not isinstance(
            self.failure, (BrokenPipeError, ConnectionResetError)
        ):
            raise self.failure


@pytest.fixture
def scripted(short_tmp: Path) -> Iterator[Callable[..., ScriptedServer]]:
    """Factory for one scripted server; checks afterwards that the process's fds are exactly
    what they were before (nothing the client received was leaked)."""
    before = open_fds()
    servers: list[ScriptedServer] = []

    def make(script: Sequence[Step], hold: bool = True, **kwargs: Any) -> ScriptedServer:
        server = ScriptedServer(short_tmp, script, hold, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    assert open_fds() == before, "fds leaked"


HEADER: list[Step] = [(0, None), (3, None), (-1, "shm")]


@pytest.mark.parametrize(
    ("script", "match"),
    [
        ([(1, None)], "version 1"),
        ([(0, "eventfd")], "fd came with the version"),
        ([(0, None), (3, "eventfd")], "fd came with the peer id"),
        ([(0, None), (65536, None)], "peer id 65536 is out of range"),
        ([(0, None), (-1, None)], "peer id -1 is out of range"),
        ([(0, None), (3, None), (-1, None)], "shared-memory message has no fd"),
        ([(0, None), (3, None), (5, "eventfd")], r"expected the shared memory \(-1\), got 5"),
        ([*HEADER, (-1, "shm")], "second shared-memory message"),
        ([*HEADER, (7, None)], "peer 7 left, but it was never announced"),
        ([*HEADER, (3, None)], "leave message for this client's own id"),
        ([*HEADER, (70000, "eventfd")], "out of range"),
        ([*HEADER, (1, "two")], "2 fds arrived with one message"),
        # More than the client makes room for: the kernel truncates (MSG_CTRUNC), and with
        # the process far from its fd limit the server is to blame.
        ([*HEADER, (1, "five")], r"more fds to one message than the protocol allows \(1\)"),
        ([*HEADER, (1, "file")], "peer 1 vector 0 is not an eventfd"),
        ([*HEADER, (3, "pipe")], "own vector 0 is not an eventfd"),
        ([(0, None), (3, None), (-1, "pipe")], "not a memory object or file"),
        ([(0, None), (3, None), (-1, "empty-shm")], "empty"),
        ([(0, None), "close"], r"closed the connection in the middle of the handshake"),
        ([*HEADER, (1, "eventfd"), (1, "eventfd"), "close"], "in the middle of the handshake"),
    ],
)
def test_a_server_breaking_the_protocol_gets_a_specific_error(
    scripted: Callable[..., ScriptedServer], script: list[Step], match: str
) -> None:
    server = scripted(script)
    with pytest.raises(ProtocolError, match=match):
        connect(server.path, timeout=WAIT)


def test_more_vectors_than_expected_names_the_server_option(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted([*HEADER, (1, "eventfd"), (1, "eventfd")])
    with pytest.raises(ProtocolError, match=r"more than 1 vectors for peer 1.*-n 1"):
        connect(server.path, vectors=1, timeout=WAIT)


def test_a_server_closing_before_the_handshake_is_a_lost_connection(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(["close"])
    with pytest.raises(ConnectionLostError, match="closed the connection before the handshake"):
        connect(server.path, timeout=WAIT)


def test_too_few_vectors_times_out_naming_the_count(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted([*HEADER, (3, "eventfd")])
    # The configured timeout, as given (not the time left after connecting).
    with pytest.raises(
        HandshakeTimeoutError, match=r"within 0\.3 s \(1 of the 2 own vector\(s\).*-n 2"
    ):
        connect(server.path, vectors=2, timeout=0.3)


def test_messages_split_across_reads_are_reassembled(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(
        ["split", (0, None), "split", (3, None), (-1, "shm"), "split", (3, "eventfd")]
    )
    with connect(server.path, vectors=1, timeout=WAIT) as peer:
        assert (peer.id, peer.vectors, peer.size) == (3, 1, 65536)


def test_alone_the_vector_count_is_learnt_after_a_quiet_period(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted([*HEADER, (3, "eventfd"), (3, "eventfd"), (3, "eventfd")])
    with connect(server.path, timeout=WAIT) as peer:
        assert peer.vectors == 3
        assert peer.peers == frozenset()


def test_with_peers_the_handshake_ends_when_own_vectors_match_theirs(
    scripted: Callable[..., ScriptedServer],
) -> None:
    own = [(3, "eventfd"), (3, "eventfd")]
    server = scripted([*HEADER, (1, "eventfd"), (1, "eventfd"), *own])
    with connect(server.path, timeout=WAIT) as peer:
        assert peer.vectors == 2
        assert peer.peers == frozenset({1})
        assert peer.vectors_of(1) == 2


def test_late_own_vectors_are_taken(scripted: Callable[..., ScriptedServer]) -> None:
    # Alone and without vectors=, the handshake ends after a quiet period; an own vector sent
    # after it is still taken.
    server = scripted([*HEADER, (3, "eventfd"), "pause", (3, "eventfd")])
    with connect(server.path, timeout=WAIT) as peer:
        assert peer.vectors == 1

        def late_vector_taken() -> bool:
            peer.service()
            return peer.vectors == 2

        until(late_vector_taken, "the late vector")
        assert len(set(peer.vector_fds)) == 2


def test_a_protocol_break_after_the_handshake_loses_the_connection_not_the_memory(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted([*HEADER, (3, "eventfd"), (9, None)])
    with connect(server.path, vectors=1, timeout=WAIT) as peer:
        peer.memory[0:2] = b"ok"
        with pytest.raises(ConnectionLostError, match="broke the protocol") as info:
            peer.wait(timeout=WAIT)
        assert isinstance(info.value.__cause__, ProtocolError)
        with pytest.raises(ConnectionLostError):
            _ = peer.peers
        with pytest.raises(ConnectionLostError):
            peer.notify(1)
        assert bytes(peer.memory[0:2]) == b"ok"


def test_no_server(short_tmp: Path) -> None:
    missing = short_tmp / "nothing.sock"
    with pytest.raises(ServerUnavailableError, match="no ivshmem server socket at"):
        connect(missing)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(missing))
    stale.close()  # the file stays, nobody listens
    with pytest.raises(ServerUnavailableError, match="no ivshmem server listens"):
        connect(missing)
    with pytest.raises(UsageError, match="too long"):
        connect("/tmp/" + "x" * 200)


@pytest.mark.parametrize("use_async", [False, True])
def test_a_handshake_without_timeout_waits_for_the_whole_handshake(
    scripted: Callable[..., ScriptedServer], use_async: bool
) -> None:
    # timeout=None once made the handshake end at the first quiet moment (a "wait without
    # limit" was taken for "complete"), before the shared memory had arrived.
    server = scripted([(0, None), "pause", (3, None), "pause", (-1, "shm"), (3, "eventfd")])
    if use_async:
        peer = asyncio.run(connect_async(server.path, timeout=None, vectors=1))
    else:
        peer = connect(server.path, timeout=None, vectors=1)
    with peer:
        assert (peer.id, peer.vectors, peer.size) == (3, 1, 65536)


def _fill_backlog(path: str) -> list[socket.socket]:
    """Connect to ``path`` until its listen backlog is full (the next connect would fail with
    EAGAIN); the connected sockets, for the caller to close."""
    fillers: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return fillers
        fillers.append(s)
        assert len(fillers) < 64, "the backlog never filled"


@pytest.mark.parametrize("use_async", [False, True])
def test_connect_keeps_trying_while_the_servers_backlog_is_full(
    scripted: Callable[..., ScriptedServer], use_async: bool
) -> None:
    # A flood (or a server short of fds) fills the listen backlog: connect() must wait for
    # room until its timeout, as QEMU's blocking connect does, not fail with EAGAIN at once.
    gate = threading.Event()
    server = scripted([*HEADER, (3, "eventfd")], backlog=0, gate=gate)
    fillers = _fill_backlog(server.path)
    assert fillers
    server.skip = len(fillers)
    opener = threading.Timer(0.5, gate.set)  # the server catches up after half a second
    opener.start()
    started = time.monotonic()
    try:
        if use_async:
            peer = asyncio.run(connect_async(server.path, timeout=WAIT, vectors=1))
        else:
            peer = connect(server.path, timeout=WAIT, vectors=1)
        with peer:
            assert (peer.id, peer.vectors) == (3, 1)
        assert time.monotonic() - started >= 0.4  # it waited for room; nothing failed
    finally:
        opener.cancel()
        gate.set()
        for s in fillers:
            s.close()


@pytest.mark.parametrize("use_async", [False, True])
def test_connect_gives_up_at_its_timeout_when_the_backlog_stays_full(
    short_tmp: Path, use_async: bool
) -> None:
    before = open_fds()
    path = str(short_tmp / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # and never accepts
    fillers = _fill_backlog(path)
    try:
        started = time.monotonic()
        with pytest.raises(HandshakeTimeoutError, match=r"within 0.5 s: its listen backlog"):
            if use_async:
                asyncio.run(connect_async(path, timeout=0.5))
            else:
                connect(path, timeout=0.5)
        assert 0.45 <= time.monotonic() - started < WAIT
    finally:
        for s in fillers:
            s.close()
        listener.close()
        os.unlink(path)
    assert open_fds() == before, "fds leaked"


@pytest.mark.parametrize("kwargs", [{"vectors": 0}, {"vectors": 257}, {"timeout": 0}])
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        connect("/nonexistent", **kwargs)


# -- against the real server -------------------------------------------------------------

VECTORS = 4


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    with ServerProcess(short_tmp, size="1M", vectors=VECTORS) as proc:
        yield proc


@pytest.fixture
def peers(server: ServerProcess) -> Iterator[Callable[..., Peer]]:
    """Factory of host peers on ``server``; all closed afterwards, and the process must then
    hold exactly the fds and shared-memory mappings it had before."""
    before_fds, before_maps = open_fds(), shm_mappings()
    made: list[Peer] = []

    def make(**kwargs: Any) -> Peer:
        kwargs.setdefault("vectors", VECTORS)
        peer = connect(server.socket_path, **kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()
    assert open_fds() == before_fds
    assert shm_mappings() == before_maps


def see(peer: Peer, expected: set[int]) -> None:
    until(lambda: peer.peers == frozenset(expected), f"peer {peer.id} to see {expected}")


def test_peers_ring_each_other_on_every_vector_and_share_bytes(
    peers: Callable[..., Peer],
) -> None:
    group = [peers() for _ in range(3)]
    ids = {p.id for p in group}
    assert len(ids) == 3
    for p in group:
        see(p, ids - {p.id})
        assert (p.vectors, p.size, len(p.memory)) == (VECTORS, 1 << 20, 1 << 20)
        assert len(set(p.vector_fds)) == VECTORS
    for sender in group:
        for receiver in group:
            if receiver is sender:
                continue
            for vector in range(VECTORS):
                sender.notify(receiver.id, vector)
                assert receiver.wait(timeout=WAIT) == vector
                assert receiver.wait(timeout=0) is None
            offset = 64 * sender.id
            payload = f"from {sender.id} to {receiver.id}".encode()
            sender.memory[offset : offset + len(payload)] = payload
            assert bytes(receiver.memory[offset : offset + len(payload)]) == payload


def test_wait_for_one_vector_leaves_the_others_pending(peers: Callable[..., Peer]) -> None:
    a, b = peers(), peers()
    see(a, {b.id})
    a.notify(b.id, 1)
    a.notify(b.id, 3)
    assert b.wait(vector=3, timeout=WAIT) == 3
    assert b.wait(vector=3, timeout=0) is None
    assert b.wait(timeout=WAIT) == 1
    a.notify(b.id, 2)
    a.notify(b.id, 0)
    assert b.wait(timeout=WAIT) == 0  # the lowest pending vector first
    assert b.wait(timeout=WAIT) == 2
    # Rings add up on the eventfd and are consumed as one.
    for _ in range(5):
        a.notify(b.id, 0)
    assert b.wait(timeout=WAIT) == 0
    assert b.wait(timeout=0) is None


def test_unknown_peer_and_vector_are_clear_errors(peers: Callable[..., Peer]) -> None:
    a, b = peers(), peers()
    see(a, {b.id})
    with pytest.raises(
        UnknownPeerError, match=rf"peer 999 is not connected; connected peers: \[{b.id}\]"
    ):
        a.notify(999)
    with pytest.raises(UnknownVectorError, match=f"peer {b.id} has 4 vector"):
        a.notify(b.id, VECTORS)
    with pytest.raises(UnknownVectorError):
        a.notify(b.id, -1)
    with pytest.raises(UnknownVectorError, match="this endpoint has 4"):
        a.wait(vector=VECTORS, timeout=0)
    with pytest.raises(UnknownVectorError):
        a.fileno(VECTORS)


def test_a_peer_rings_its_own_vectors(peers: Callable[..., Peer]) -> None:
    # The server sends a peer the eventfds it receives on; writing one rings it (QEMU's client
    # allows `int <own id> <vector>` too). Nobody else is rung.
    a, b = peers(), peers()
    see(a, {b.id})
    assert a.vectors_of(a.id) == VECTORS
    assert a.id not in a.peers
    a.notify(a.id, 2)
    assert a.wait(timeout=WAIT) == 2
    assert a.wait(timeout=0) is None
    assert b.wait(timeout=0) is None
    with pytest.raises(UnknownVectorError, match=f"peer {a.id} has 4 vector"):
        a.notify(a.id, VECTORS)
    a.close()
    with pytest.raises(ClosedError):
        a.notify(a.id, 0)


def test_notify_right_after_a_join_finds_the_new_peers_vectors(
    peers: Callable[..., Peer],
) -> None:
    a = peers()
    b = peers()
    # Without waiting for a to see b: notify reads the announcement it needs.
    a.notify(b.id, VECTORS - 1)
    assert b.wait(timeout=WAIT) == VECTORS - 1


def test_joins_and_leaves_are_seen_with_callbacks(peers: Callable[..., Peer]) -> None:
    a = peers()
    events: list[tuple[str, int]] = []
    a.on_peer_joined = lambda p: events.append(("joined", p))
    a.on_peer_left = lambda p: events.append(("left", p))
    b = peers()
    c = peers()
    see(a, {b.id, c.id})
    b.close()
    see(a, {c.id})
    assert events == [("joined", b.id), ("joined", c.id), ("left", b.id)]
    with pytest.raises(UnknownPeerError):
        a.notify(b.id)


def test_a_join_wakes_nobody_but_is_processed_during_wait(peers: Callable[..., Peer]) -> None:
    a = peers()
    joined: list[int] = []
    a.on_peer_joined = joined.append
    b = peers()
    assert a.wait(timeout=0.2) is None  # the announcement is not a doorbell...
    assert joined == [b.id]  # ...but wait() processed it


# A host peer in a child process whose RLIMIT_NOFILE is set to leave room for only ``room`` more
# fds. Modes: "hard" (soft = hard = that: connect cannot raise it), "soft" (only the soft limit:
# connect may raise it), "join" (connect normally, then set soft = hard with that room and wait
# for the next join). Prints one JSON line; "leaked" lists fds open after close that were not
# open before connect.
FD_LIMIT_CHILD = """
import json, os, resource, sys
from ivshmem.errors import ConnectionLostError
from ivshmem.peer import FdLimitError, connect

def open_fds():
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
        except FileNotFoundError:
            pass  # the fd listdir itself used
    return found

def leave_room(room, hard):
    limit = max(int(entry.split()[0]) for entry in open_fds()) + 1 + room
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit if hard else HARD))
    return limit

path, mode, room = sys.argv[1], sys.argv[2], int(sys.argv[3])
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
before = open_fds()
result = {}
if mode == "join":
    peer = connect(path, vectors=4)
    result["limit"] = leave_room(room, True)
    print("ready", flush=True)
    try:
        result["woke"] = peer.wait(timeout=float(sys.argv[4]))
    except ConnectionLostError as err:
        result["error"] = str(err)
    peer.close()
else:
    result["limit"] = leave_room(room, mode == "hard")
    try:
        peer = connect(path, vectors=4)
    except FdLimitError as err:
        result["error"] = str(err)
    else:
        result["peers"] = len(peer.peers)
        result["soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        peer.close()
result["leaked"] = sorted(open_fds() - before)
print(json.dumps(result), flush=True)
"""


def fd_limit_child(server: ServerProcess, mode: str, room: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", FD_LIMIT_CHILD, server.socket_path, mode, str(room), str(WAIT)],
        stdout=subprocess.PIPE,
        text=True,
    )


def child_result(child: subprocess.Popen[str]) -> dict[str, Any]:
    assert child.stdout is not None
    out, _ = child.communicate(timeout=WAIT)
    assert child.returncode == 0, out
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def test_at_the_open_file_limit_connect_names_the_limit_not_the_server(
    server: ServerProcess, peers: Callable[..., Peer]
) -> None:
    # Five peers with 4 vectors: a newcomer needs 20 doorbell fds. Room for 8 (and a hard limit
    # it cannot raise) makes the kernel drop one of them mid-handshake (MSG_CTRUNC).
    held = [peers() for _ in range(5)]
    ids = {p.id for p in held}
    child = fd_limit_child(server, "hard", room=8)
    try:
        result = child_result(child)
    finally:
        child.kill()
        child.wait()
    error = result.get("error", "")
    assert f"this process is at its open-file limit ({result['limit']}): raise it" in error
    assert "hard limit" in error  # soft = hard here: says who can raise it
    assert "protocol" not in error
    assert result["leaked"] == []
    # The server saw the child go and serves the others as before.
    see(held[0], ids - {held[0].id})
    held[1].notify(held[0].id, 3)
    assert held[0].wait(timeout=WAIT) == 3


def test_connect_raises_the_soft_fd_limit_when_the_doorbells_need_it(
    server: ServerProcess, peers: Callable[..., Peer]
) -> None:
    held = [peers() for _ in range(5)]
    child = fd_limit_child(server, "soft", room=8)
    try:
        result = child_result(child)
    finally:
        child.kill()
        child.wait()
    assert "error" not in result, result["error"]
    assert result["peers"] == len(held)
    assert result["soft"] > result["limit"]
    assert result["leaked"] == []


def test_a_join_beyond_the_fd_limit_loses_the_connection_saying_why(
    server: ServerProcess, peers: Callable[..., Peer]
) -> None:
    first = peers()
    child = fd_limit_child(server, "join", room=2)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        newcomer = peers()  # 4 vectors for the child, which has room for 2
        result = child_result(child)
    finally:
        child.kill()
        child.wait()
    error = result.get("error", "")
    assert f"this process is at its open-file limit ({result['limit']}): raise it" in error
    assert "Doorbells and membership are gone" in error, result
    assert result["leaked"] == []
    see(first, {newcomer.id})


CHILD = """
import sys, time
from ivshmem.peer import connect
peer = connect(sys.argv[1], vectors=int(sys.argv[2]))
print(peer.id, flush=True)
# Ring the parent's vector 0 once, then sleep until killed.
peer.notify(int(sys.argv[3]), 0)
time.sleep(60)
"""


def test_kill_9_of_a_peer_process_is_seen_by_the_survivors(
    server: ServerProcess, peers: Callable[..., Peer]
) -> None:
    a, b = peers(), peers()
    left: list[int] = []
    a.on_peer_left = left.append
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.socket_path, str(VECTORS), str(a.id)],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child_id = int(child.stdout.readline())
        assert a.wait(timeout=WAIT) == 0  # the child rang us
        see(b, {a.id, child_id})
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        see(a, {b.id})
        see(b, {a.id})
        assert left == [child_id]
        with pytest.raises(UnknownPeerError):
            b.notify(child_id)
        server.wait_until(lambda: sorted(server.peer_ids()) == sorted([a.id, b.id]))
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


def test_wait_async_and_connect_async(server: ServerProcess, peers: Callable[..., Peer]) -> None:
    a = peers()

    async def scenario() -> None:
        b = await connect_async(server.socket_path, vectors=VECTORS)
        try:
            see(a, {b.id})
            assert await b.wait_async(timeout=0.05) is None
            waiter = asyncio.ensure_future(b.wait_async(vector=2, timeout=WAIT))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            a.notify(b.id, 2)
            assert await waiter == 2
            # Several coroutines, each on its own vector.
            waiters = [asyncio.ensure_future(b.wait_async(v, timeout=WAIT)) for v in (0, 1)]
            await asyncio.sleep(0.01)
            a.notify(b.id, 1)
            a.notify(b.id, 0)
            assert await asyncio.gather(*waiters) == [0, 1]
            # A join arriving while waiting is processed and the wait goes on.
            c = peers()
            assert await b.wait_async(timeout=0.1) is None
            assert c.id in b.peers
        finally:
            b.close()

    asyncio.run(scenario())


def test_fileno_works_in_a_selector(peers: Callable[..., Peer]) -> None:
    import selectors

    a, b = peers(), peers()
    see(a, {b.id})
    with selectors.DefaultSelector() as sel:
        for v in range(VECTORS):
            sel.register(b.fileno(v), selectors.EVENT_READ, v)
        sel.register(b.server_fd, selectors.EVENT_READ, "server")
        a.notify(b.id, 3)
        ready = [key.data for key, _ in sel.select(WAIT)]
        assert ready == [3]
        assert b.wait(3, timeout=0) == 3


def test_numpy_view(peers: Callable[..., Peer]) -> None:
    np = pytest.importorskip("numpy")
    a, b = peers(), peers()
    view = a.numpy(dtype=np.uint32, offset=4096, count=16)
    view[:] = np.arange(16, dtype=np.uint32)
    assert list(b.numpy(dtype=np.uint32, offset=4096, count=16)) == list(range(16))
    del view


def test_close_releases_everything_and_is_idempotent(server: ServerProcess) -> None:
    before_fds, before_maps = open_fds(), shm_mappings()
    peer = connect(server.socket_path, vectors=VECTORS)
    other = connect(server.socket_path, vectors=VECTORS)
    see(peer, {other.id})
    # Each peer: the socket, one eventfd per own vector and per vector of the other peer, and
    # the mapping (Python's mmap keeps its own duplicate of the shared-memory fd).
    assert len(open_fds() - before_fds) == 2 * (2 + 2 * VECTORS)
    assert shm_mappings() == before_maps + 2
    view = peer.memory[0:16]  # a user's slice keeps the memory alive until released
    other.close()
    peer.close()
    peer.close()
    assert peer.closed
    assert len(open_fds() - before_fds) == 1  # the mapping's fd, with the user's view
    view.release()
    assert open_fds() == before_fds
    assert shm_mappings() == before_maps
    for call in (lambda: peer.memory, lambda: peer.peers, lambda: peer.notify(0), peer.wait):
        with pytest.raises(ClosedError):
            call()
    server.wait_until(lambda: server.peer_ids() == [], what="the server to drop both peers")


def test_a_peer_dropped_without_close_releases_everything(server: ServerProcess) -> None:
    before_fds, before_maps = open_fds(), shm_mappings()
    peer = connect(server.socket_path, vectors=VECTORS)
    assert open_fds() != before_fds
    with pytest.warns(ResourceWarning, match="unclosed <Peer"):
        del peer
        gc.collect()
    assert open_fds() == before_fds
    assert shm_mappings() == before_maps


def test_server_going_away_keeps_the_memory(short_tmp: Path) -> None:
    server = ServerProcess(short_tmp, size="1M", vectors=VECTORS, check=False).start()
    before_fds = open_fds()
    with connect(server.socket_path, vectors=VECTORS) as peer:
        peer.memory[0:4] = b"kept"
        server.kill()
        with pytest.raises(ConnectionLostError, match="closed the connection") as info:
            peer.wait(timeout=WAIT)
        assert not peer.connected
        assert bytes(peer.memory[0:4]) == b"kept"
        for call in (lambda: peer.peers, lambda: peer.notify(0), peer.wait, peer.fileno):
            with pytest.raises(ConnectionLostError):
                call()
        # Every doorbell fd and the socket are gone already; the mapping (and the duplicate
        # fd Python's mmap keeps) stays until close().
        assert [t.split(" -> ")[1] for t in open_fds() - before_fds] == ["/memfd:ivshmem (deleted)"]
        assert info.value.__cause__ is not None
    server.stop()
    os.unlink(server.socket_path)  # SIGKILL left it


def test_reconnect_keeps_a_named_region_and_learns_the_new_id(short_tmp: Path) -> None:
    backing = ["--file", str(short_tmp / "region")]
    before_fds, before_maps = open_fds(), shm_mappings()
    first = ServerProcess(short_tmp, size="1M", vectors=2, extra_args=backing).start()
    try:
        keeper = connect(first.socket_path, vectors=2, reconnect=True)
        other = connect(first.socket_path, vectors=2)  # takes id 1 ...
        see(keeper, {other.id})
        keeper.memory[100:105] = b"state"
        view = keeper.memory[100:105]
        reconnects: list[Reconnected] = []
        left: list[int] = []
        keeper.on_reconnect = reconnects.append
        keeper.on_peer_left = left.append
        first.stop()
        other.close()
        first = ServerProcess(short_tmp, size="1M", vectors=2, extra_args=backing)
        first.start()
        # ... and after the restart, a newcomer takes id 0 before the keeper is back.
        newcomer = connect(first.socket_path, vectors=2)
        assert newcomer.id == 0
        assert keeper.id == 0  # the keeper has not noticed yet

        def reconnected() -> bool:
            keeper.service()
            return keeper.connected

        until(reconnected, "the keeper to reconnect")
        assert reconnects == [Reconnected(old_id=0, new_id=1, memory_kept=True)]
        assert keeper.id == 1
        assert left == [1]
        assert bytes(view) == b"state"
        assert bytes(newcomer.memory[100:105]) == b"state"
        see(keeper, {0})
        see(newcomer, {keeper.id})
        newcomer.notify(keeper.id, 1)
        assert keeper.wait(timeout=WAIT) == 1
        keeper.notify(0, 0)
        assert newcomer.wait(timeout=WAIT) == 0
        view.release()
        keeper.close()
        newcomer.close()
    finally:
        first.stop()
    assert open_fds() == before_fds
    assert shm_mappings() == before_maps


def test_reconnect_to_a_new_memfd_region_replaces_the_mapping(short_tmp: Path) -> None:
    server = ServerProcess(short_tmp, size="64K", vectors=1).start()
    try:
        peer = connect(server.socket_path, reconnect=True)
        peer.memory[0:3] = b"old"
        server.stop()
        assert peer.wait(timeout=0.1) is None  # the loss is noticed, no reconnect possible
        assert not peer.connected
        assert peer.peers == frozenset()
        with pytest.raises(ConnectionLostError, match="reconnecting"):
            peer.notify(1)
        server = ServerProcess(short_tmp, size="128K", vectors=1).start()
        infos: list[Reconnected] = []
        peer.on_reconnect = infos.append
        until(lambda: peer.wait(timeout=0.05) is None and peer.connected, "reconnect")
        assert infos == [Reconnected(0, 0, memory_kept=False)]
        assert peer.size == 128 * 1024
        assert bytes(peer.memory[0:3]) == b"\0\0\0"
        peer.close()
    finally:
        server.stop()


def test_reconnect_async(short_tmp: Path) -> None:
    server = ServerProcess(short_tmp, size="64K", vectors=1).start()

    async def scenario() -> None:
        nonlocal server
        peer = await connect_async(server.socket_path, reconnect=True, vectors=1)
        try:
            server.stop()
            assert await peer.wait_async(timeout=0.1) is None
            server = ServerProcess(short_tmp, size="64K", vectors=1).start()
            waiter = asyncio.ensure_future(peer.wait_async(timeout=WAIT))
            deadline = time.monotonic() + WAIT
            while not peer.connected and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert peer.connected
            other = await connect_async(server.socket_path, vectors=1)
            other.notify(peer.id)
            assert await waiter == 0
            other.close()
        finally:
            peer.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_notify_and_wait_from_threads(peers: Callable[..., Peer]) -> None:
    a, b = peers(), peers()
    see(a, {b.id})
    rounds = 2000
    got: list[int] = []

    def echo() -> None:
        for _ in range(rounds):
            v = b.wait(timeout=WAIT)
            assert v is not None
            got.append(v)
            b.notify(a.id, v)

    thread = threading.Thread(target=echo)
    thread.start()
    for i in range(rounds):
        a.notify(b.id, i % VECTORS)
        if i % 200 == 0:
            assert b.peers == frozenset({a.id})  # b's server socket, served from this thread
        assert a.wait(timeout=WAIT) == i % VECTORS
    thread.join(WAIT)
    assert got == [i % VECTORS for i in range(rounds)]


def test_256_vectors_per_peer_end_to_end(short_tmp: Path) -> None:
    """The most vectors the server hands out (QEMU's device takes 64): every one of them,
    both ways, between two host peers, and the fds all go on close."""
    with ServerProcess(short_tmp, size="64K", vectors=256) as server:
        baseline = len(os.listdir("/proc/self/fd"))
        a = connect(server.socket_path, vectors=256, timeout=WAIT)
        b = connect(server.socket_path, vectors=256, timeout=WAIT)
        try:
            see(a, {b.id})
            see(b, {a.id})
            assert a.vectors == b.vectors == 256
            assert a.vectors_of(b.id) == b.vectors_of(a.id) == 256
            for v in (0, 1, 63, 64, 128, 255):
                a.notify(b.id, v)
                assert b.wait(v, timeout=WAIT) == v
                b.notify(a.id, v)
                assert a.wait(v, timeout=WAIT) == v
            for v in range(256):  # every vector rings its own eventfd, nothing crosses over
                a.notify(b.id, v)
            got = sorted(b.wait(timeout=WAIT) for _ in range(256))  # type: ignore[type-var]
            assert got == list(range(256))
            assert b.wait(timeout=0, spin=0) is None
        finally:
            a.close()
            b.close()
        assert len(os.listdir("/proc/self/fd")) == baseline

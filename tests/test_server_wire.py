"""The C fan-out's copy of the peer table (``_fanout.Wire``) against the Python path.

With the C extension, the server sends a join's and a leave's messages from its own copy
of the table in one call, and only what the kernel refuses -- or what is for a client that
already has a queue ("held") -- comes back to queues.py to be queued. These tests check
the call on real sockets against what :meth:`PeerTable.join` lists, and a real server
(both paths) with clients that stop reading and start again while others come and go:
whatever the kernel refused, each client must end up with the same, true view.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import RawPeer, ServerProcess, pump_all
from test_server_fanout import _fill, _receive, _socketpair, needs_c

from ivshmem.protocol import PROTOCOL_VERSION, SHM_MARKER, PeerTable

try:
    from ivshmem.server._fanout import Wire
except ImportError:  # not built: needs_c skips (and fails in CI, where it must build)
    pass


class _Peers:
    """A Wire with real sockets: per peer our end (the server's) and theirs, and ``vectors``
    memfds standing in for its eventfds (so that each fd received is known by inode)."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.shm = os.memfd_create("wire-shm", os.MFD_CLOEXEC)
        self.wire = Wire(vectors, self.shm)
        self.ours: dict[int, socket.socket] = {}
        self.theirs: dict[int, socket.socket] = {}
        self.fds: dict[int, list[int]] = {}
        self.table: PeerTable[int] = PeerTable(self.shm)

    def add(self, peer: int) -> None:
        ours, theirs = _socketpair()
        self.ours[peer], self.theirs[peer] = ours, theirs
        self.fds[peer] = [os.memfd_create(f"wire-{peer}-{v}", 0) for v in range(self.vectors)]
        self.wire.add(peer, ours.fileno(), self.fds[peer])
        self.table.put(peer, self.fds[peer])

    def name(self, fd: int | None) -> str | None:
        """Which fd ``fd`` is (by inode): 'shm' or 'peer/vector'."""
        if fd is None:
            return None
        ino = os.fstat(fd).st_ino
        return self.inodes()[ino]

    def inodes(self) -> dict[int, str]:
        names = {os.fstat(self.shm).st_ino: "shm"}
        for peer, fds in self.fds.items():
            for v, fd in enumerate(fds):
                names[os.fstat(fd).st_ino] = f"{peer}/{v}"
        return names

    def received(self) -> dict[int, list[tuple[int, str | None]]]:
        names = self.inodes()
        return {
            peer: [(v, None if ino is None else names[ino]) for v, ino in _receive(sock)]
            for peer, sock in self.theirs.items()
        }

    def close(self) -> None:
        for sock in [*self.ours.values(), *self.theirs.values()]:
            sock.close()
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        os.close(self.shm)


@pytest.fixture
def peers() -> Iterator[_Peers]:
    made = _Peers(vectors=2)
    try:
        yield made
    finally:
        made.close()


@needs_c
def test_a_join_sends_exactly_what_the_table_lists_in_its_order(peers: _Peers) -> None:
    for peer in (4, 1, 7):  # table order is the order of joining, not of ids
        peers.add(peer)
    peers.received()  # nothing yet
    sent, mine, rest, partials, gone = peers.wire.join(1)
    assert (rest, partials, gone) == ([], [], [])
    # What PeerTable.join lists for the same table, each fd named.
    expected: dict[int, list[tuple[int, str | None]]] = {4: [], 1: [], 7: []}
    table: PeerTable[str] = PeerTable("shm")
    for peer in (4, 7):
        table.put(peer, [f"{peer}/{v}" for v in range(2)])
    for send in table.join(1, ["1/0", "1/1"]):
        expected[send.recipient].append((send.value, send.fd))
    assert peers.received() == expected
    assert expected[1][:3] == [(PROTOCOL_VERSION, None), (1, None), (SHM_MARKER, "shm")]
    assert sent == sum(len(m) for m in expected.values()) == 4 + 3 + 6
    assert mine == 3 + 6
    assert peers.wire.stats(1)[0] == 9 and peers.wire.stats(4)[0] == 2


@needs_c
def test_a_held_or_refusing_peer_gets_nothing_more_and_the_rest_is_handed_back(
    peers: _Peers,
) -> None:
    for peer in (1, 2, 3, 4):
        peers.add(peer)
    peers.wire.hold(2)  # it has a queue: nothing goes straight to its socket
    # 3's socket is full but for one message: the first of its two goes, the second is
    # refused, and 3 is held from then on.
    fillers = _fill(peers.ours[3]) - 1
    assert len(peers.theirs[3].recv(8)) == 8
    sent, mine, rest, partials, gone = peers.wire.join(4)
    assert partials == [] and gone == []
    assert rest == [(2, 4, 4, 0), (2, 4, 4, 1), (3, 4, 4, 1)]
    assert peers.wire.held(2) and peers.wire.held(3) and not peers.wire.held(1)
    assert sent == 2 + 1 + mine and mine == 3 + 4 * 2
    got = peers.received()
    assert got[1] == [(4, "4/0"), (4, "4/1")]
    assert got[2] == []
    assert got[3][fillers:] == [(4, "4/0")]
    # A leave: the held ones are handed back (their queues keep order), the others told.
    assert peers.wire.leave(1) == (1, [(2, 1, -2, 0), (3, 1, -2, 0)], [], [])
    assert len(peers.wire) == 3
    assert peers.received()[4] == [(1, None)]
    # Released (its queue flushed), 2 is sent to directly again.
    peers.wire.release(2)
    assert peers.wire.leave(3)[:2] == (2, [])
    assert peers.received() == {1: [], 2: [(3, None)], 3: [], 4: [(3, None)]}


@needs_c
def test_a_peer_whose_socket_is_closed_is_gone_and_costs_nothing_more(peers: _Peers) -> None:
    """Many peers leaving at once: each leave finds the others' sockets closed. Such a
    peer is reported once as gone, and nothing more is sent to it or handed back for it
    (the Python path would queue a message for it per leave until flushing met EPIPE)."""
    for peer in (1, 2, 3, 4):
        peers.add(peer)
    peers.theirs.pop(2).close()
    peers.theirs.pop(3).close()
    assert peers.wire.leave(1) == (1, [], [], [2, 3])
    assert peers.wire.held(2) and peers.wire.held(3)
    # A later join: the gone ones get nothing and are not reported again.
    peers.add(5)
    sent, mine, rest, partials, gone = peers.wire.join(5)
    assert (rest, partials, gone) == ([], [], [])
    assert sent == 2 + mine and mine == 3 + 4 * 2  # 4 hears of 5, 5 of everyone
    peers.wire.release(2)  # even released, a gone peer stays gone
    assert peers.wire.leave(4)[3] == []
    assert peers.received()[5][-1] == (4, None)


@needs_c
def test_the_wire_refuses_bad_calls_without_harm(peers: _Peers) -> None:
    peers.add(1)
    with pytest.raises(ValueError, match="already on the wire"):
        peers.wire.add(1, 5, [5, 6])
    with pytest.raises(ValueError, match="2 eventfds"):
        peers.wire.add(2, 5, [5])
    with pytest.raises(ValueError, match="out of range"):
        peers.wire.add(65536, 5, [5, 6])
    with pytest.raises(ValueError, match="out of range"):
        peers.wire.hold(-1)
    with pytest.raises(KeyError):
        peers.wire.join(9)
    with pytest.raises(KeyError):
        peers.wire.leave(9)
    with pytest.raises(TypeError):
        peers.wire.stats("1")  # type: ignore[arg-type]
    assert len(peers.wire) == 1 and peers.wire.stats(1) == (0, 0.0)
    assert 1 in peers.wire and 2 not in peers.wire and 70000 not in peers.wire


@pytest.mark.parametrize("path", [pytest.param("c", marks=needs_c), "python"])
def test_clients_that_stop_reading_again_and_again_keep_a_true_view(
    short_tmp: Path, path: str
) -> None:
    """Two clients stop reading and start again, many times, while others join and leave
    (each join carries 4 fds to each of them): the kernel refuses them messages. Each pause queues
    its messages, each read lets the queue drain and direct sends resume: at the end every
    client knows exactly the peers that are there, with their vectors, whichever path sent
    what, and was sent exactly what it read."""
    env = {**os.environ, "IVSHMEM_PURE_PYTHON": "1" if path == "python" else "0"}
    with ServerProcess(short_tmp, vectors=4, env=env) as server:
        steady = [RawPeer(server.socket_path) for _ in range(2)]
        pausing = [RawPeer(server.socket_path) for _ in range(2)]
        everyone = steady + pausing
        pump_all(everyone, lambda: all(p.id is not None for p in everyone), timeout=30)
        stayers: list[RawPeer] = []
        most_queued = 0
        for round_ in range(8):
            reading = steady if round_ % 2 == 0 else everyone
            for k in range(70):
                comer = RawPeer(server.socket_path)

                def joined(c: RawPeer = comer) -> bool:
                    return c.id is not None

                pump_all([comer, *reading], joined, timeout=30)
                if k % 20 == 0:
                    stayers.append(comer)  # some stay (their joins must not be lost) ...
                else:
                    comer.close()  # ... most leave again at once
            if reading is steady:
                # The pauses really made the server queue (and hold) the pausing clients.
                queued = {p["id"]: p["queued"] for p in server.status()["peers"]}
                most_queued = max(most_queued, *(queued[p.id] for p in pausing))
            for peer in reading:
                peer.pump()
        assert most_queued > 0, "no pause filled a socket: the test exercised nothing"
        alive = everyone + stayers
        ids = {p.id for p in alive}
        assert None not in ids

        def settled() -> bool:
            return all(p.complete({i for i in ids if i != p.id}, 4) for p in alive)  # type: ignore[misc]

        pump_all(alive, settled, timeout=60)
        for peer in alive:
            assert set(peer.peers) == ids - {peer.id}
        # Every peer here was sent exactly what it read: nothing lost, nothing duplicated
        # (a join and its leave both still queued are dropped together: neither counts).
        deadline = time.monotonic() + 30
        while True:
            status = server.status()
            sent = {p["id"]: p["sent"] for p in status["peers"]}
            read = {p.id: p.messages for p in alive}
            if sent == read or time.monotonic() > deadline:
                break
            for peer in alive:
                peer.pump()
            time.sleep(0.05)
        assert sent == read
        assert status["counters"]["messages_queued"] == 0
        assert status["counters"]["joins"] == len(everyone) + 8 * 70
        for peer in alive:
            peer.close()


@pytest.mark.parametrize("path", [pytest.param("c", marks=needs_c), "python"])
def test_a_leave_never_overtakes_a_queued_join(
    short_tmp: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's socket is full as C joins: one of C's vectors reaches B, the other is queued. B
    then reads, so its
    socket has room again, and C leaves before anything flushed B's queue. The leave must go
    behind the queued join (B is held until its queue is flushed), not straight to B's
    socket: B hears of C, then of its leave, never the other way round (which would leave a
    ghost C in B's view). Run on a real server object, its loop turned by hand."""
    import asyncio

    from ivshmem.server import Server, ServerConfig
    from ivshmem.server import queues as queues_mod
    from ivshmem.server.readers import ClientReaders

    if path == "python":
        monkeypatch.setattr(queues_mod, "_FANOUT", None)
    config = ServerConfig(socket_path=str(short_tmp / "s"), backing="memfd", size=4096, vectors=2)
    server = Server(config)
    loop = asyncio.new_event_loop()
    theirs: dict[str, socket.socket] = {}
    try:
        server.open()
        assert (server._wire is not None) == (path == "c")
        server._loop = loop
        server._readers = ClientReaders(server._on_client_readable)  # as serve() makes it
        creds = (os.getpid(), os.getuid(), os.getgid())
        for name in "ABC":
            if name == "C":
                # B's socket, full: C's announcement to B is refused and queued.
                for sock in theirs.values():
                    _receive(sock)  # the handshakes so far
                # B's socket, full but for one message: the first of C's two vectors goes
                # to B, the second is refused and queued.
                b = server._clients[1]
                fillers = _fill(b.sock) - 1
                assert len(theirs["B"].recv(8)) == 8
            ours, theirs[name] = _socketpair()
            server._join(ours, creds)
        b = server._clients[1]
        assert list(b.queue) == [2]
        got_b = _receive(theirs["B"])  # B reads everything there is: its socket has room
        assert [(v, fd is not None) for v, fd in got_b[fillers:]] == [(2, True)]
        server._drop(server._clients[2], announce=True)  # C leaves, nothing flushed B yet
        loop.run_until_complete(asyncio.sleep(0))  # the flush scheduled by the join/leave
        server._flush_dirty()
        tail = [(value, fd is not None) for value, fd in _receive(theirs["B"])]
        assert tail == [(2, True), (2, False)]
        assert 2 not in server._clients and not b.queue
        if server._wire is not None:
            assert not server._wire.held(1)  # flushed empty: direct sends again
    finally:
        server.close()
        loop.close()
        for sock in theirs.values():
            sock.close()


@pytest.mark.parametrize("path", [pytest.param("c", marks=needs_c), "python"])
def test_a_client_that_stopped_receiving_is_disconnected_on_the_next_fan_out(
    short_tmp: Path, path: str
) -> None:
    """A client that shut down its receiving side (its socket stays open, so the server
    sees no EOF) makes the next message to it fail with EPIPE. The C fan-out reports it as
    gone and sends it nothing more; either way the server disconnects it as having left,
    and the others hear of its leave."""
    env = {**os.environ, "IVSHMEM_PURE_PYTHON": "1" if path == "python" else "0"}
    with ServerProcess(short_tmp, vectors=1, env=env) as server:
        stayer = RawPeer(server.socket_path)
        deaf = RawPeer(server.socket_path)
        pump_all([stayer, deaf], lambda: stayer.complete({1}, 1) and deaf.complete({0}, 1))
        deaf.sock.shutdown(socket.SHUT_RD)
        comer = RawPeer(server.socket_path)  # its announcement to 1 fails with EPIPE
        pump_all([stayer, comer], lambda: comer.id is not None and 1 not in stayer.peers)
        pump_all([stayer, comer], lambda: set(comer.peers) <= {0})
        assert server.peer_ids() == [0, 2]
        server.wait_until(lambda: "peer 1 " in server.log() and " left" in server.log())
        assert "WARNING" not in server.log()
        for peer in (stayer, deaf, comer):
            peer.close()

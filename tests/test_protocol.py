"""The sans-IO protocol: codec, the server's PeerTable, the client's ClientState.

Most tests run PeerTable's sends straight into ClientStates (h11's ConnectionPair idea): no
socket is opened, yet every client's view can be checked against the table. Tests of error
paths use real eventfds, so "the fd was closed" is checked against the kernel.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ivshmem.errors import ProtocolError, UsageError
from ivshmem.protocol import (
    MAX_PEER_ID,
    MAX_VECTORS,
    MESSAGE_SIZE,
    SHM_MARKER,
    ClientState,
    Decoder,
    OwnVector,
    PeerLeft,
    PeerTable,
    PeerVector,
    Send,
    SharedMemoryReceived,
    TableFullError,
    Welcome,
    decode,
    encode,
)

INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def eventfd() -> Iterator[int]:
    """A real fd for the code under test to close (closed here if it did not)."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    yield fd
    if is_open(fd):
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Codec


@given(INT64)
def test_encode_decode_round_trip(value: int) -> None:
    data = encode(value)
    assert len(data) == MESSAGE_SIZE
    assert data == struct.pack("<q", value)  # little-endian signed, as QEMU's peers expect
    assert decode(data) == value


def test_known_encodings() -> None:
    assert encode(0) == bytes(8)
    assert encode(SHM_MARKER) == b"\xff" * 8
    assert encode(0x0102) == b"\x02\x01" + bytes(6)


@given(
    values=st.lists(st.tuples(INT64, st.booleans()), min_size=1, max_size=20),
    data=st.data(),
)
def test_decoder_reassembles_any_split(values: list[tuple[int, bool]], data: st.DataObject) -> None:
    """However the stream is cut into reads (each within one message, as the adapter reads at
    most the missing bytes), the messages and their fds come out whole and in order."""
    decoder = Decoder()
    out: list[tuple[int, int | None]] = []
    for i, (value, has_fd) in enumerate(values):
        raw = encode(value)
        pos = 0
        while pos < MESSAGE_SIZE:
            n = data.draw(st.integers(1, MESSAGE_SIZE - pos))
            # A fake fd number: no error path runs here, so it is never closed.
            fds = [10_000 + i] if has_fd and pos == 0 else []
            message = decoder.feed(raw[pos : pos + n], fds)
            pos += n
            assert (message is not None) == (pos == MESSAGE_SIZE)
            assert decoder.pending == pos % MESSAGE_SIZE
            if message is not None:
                out.append(message)
    assert out == [(v, 10_000 + i if f else None) for i, (v, f) in enumerate(values)]


def test_decoder_rejects_a_read_across_messages(eventfd: int) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="crosses a message boundary"):
        decoder.feed(bytes(9), [eventfd])
    assert not is_open(eventfd)


def test_decoder_rejects_two_fds_on_one_message() -> None:
    a, b = os.eventfd(0), os.eventfd(0)
    with pytest.raises(ProtocolError, match="2 fds arrived"):
        Decoder().feed(bytes(8), [a, b])
    assert not is_open(a) and not is_open(b)


def test_decoder_rejects_fd_mid_message_and_closes_held_fd() -> None:
    first, second = os.eventfd(0), os.eventfd(0)
    decoder = Decoder()
    assert decoder.feed(bytes(3), [first]) is None
    with pytest.raises(ProtocolError, match="middle of a message"):
        decoder.feed(bytes(2), [second])
    assert not is_open(first) and not is_open(second)
    assert decoder.pending == 0


def test_decoder_close_drops_partial_message_and_its_fd(eventfd: int) -> None:
    decoder = Decoder()
    decoder.feed(b"\xff" * 4, [eventfd])
    decoder.close()
    assert not is_open(eventfd)
    assert decoder.pending == 0


# --------------------------------------------------------------------------------------------
# PeerTable


class QemuAllocator:
    """QEMU's id allocation, written from its description: start at 0, go on from the id
    after the last one handed out, skip ids in use, wrap at 65536."""

    def __init__(self, first: int = 0) -> None:
        self.cur = first
        self.used: set[int] = set()

    def next(self) -> int:
        for _ in range(MAX_PEER_ID + 1):
            if self.cur not in self.used:
                peer = self.cur
                self.cur = (self.cur + 1) & MAX_PEER_ID
                self.used.add(peer)
                return peer
            self.cur = (self.cur + 1) & MAX_PEER_ID
        raise AssertionError("full")


def test_first_peer_gets_id_zero_and_a_returning_peer_a_new_id() -> None:
    table: PeerTable[str] = PeerTable("shm")
    table.join(table.allocate_id(), ["a0"])
    assert list(table) == [0]
    table.leave(0)
    assert table.allocate_id() == 1  # not 0 again: QEMU hands ids out monotonically


@settings(max_examples=200)
@given(
    first=st.sampled_from([0, 1, 7, MAX_PEER_ID - 3, MAX_PEER_ID]),
    ops=st.lists(st.one_of(st.just("join"), st.integers(0, 40)), max_size=60),
)
def test_id_allocation_matches_qemu(first: int, ops: list[str | int]) -> None:
    table: PeerTable[int] = PeerTable(-1, first_id=first)
    model = QemuAllocator(first)
    for op in ops:
        if op == "join":
            peer = table.allocate_id()
            assert peer == model.next()
            table.join(peer, [])
        elif table:
            assert isinstance(op, int)
            victim = sorted(table)[op % len(table)]
            table.leave(victim)
            model.used.discard(victim)
        assert set(table) == model.used
        assert all(0 <= p <= MAX_PEER_ID for p in table)


def test_ids_wrap_below_65536() -> None:
    table: PeerTable[int] = PeerTable(-1, first_id=MAX_PEER_ID - 1)
    for _ in range(3):
        table.join(table.allocate_id(), [])
    assert sorted(table) == [0, MAX_PEER_ID - 1, MAX_PEER_ID]
    table.leave(MAX_PEER_ID)
    assert table.allocate_id() == 1  # monotonic: not the freed 65535


def test_ids_in_use_are_skipped_after_a_full_cycle() -> None:
    table: PeerTable[int] = PeerTable(-1)
    for _ in range(3):
        table.join(table.allocate_id(), [])
    table.leave(1)
    # Churn through every other id once: 3 .. 65535, each joining and leaving.
    for expected in range(3, MAX_PEER_ID + 1):
        peer = table.allocate_id()
        assert peer == expected
        table.join(peer, [])
        table.leave(peer)
    assert table.allocate_id() == 1  # 0 is still in use: skipped
    table.join(1, [])
    assert table.allocate_id() == 3  # 2 is still in use: skipped


def test_full_table_raises() -> None:
    table: PeerTable[int] = PeerTable(-1)
    # Filling 65536 peers through join() is quadratic; the allocator only reads membership.
    table._peers = {peer: () for peer in range(MAX_PEER_ID + 1)}
    with pytest.raises(TableFullError, match="all 65536 peer ids are in use"):
        table.allocate_id()
    del table._peers[4242]
    assert table.allocate_id() == 4242


def test_join_sends_handshake_in_qemu_order() -> None:
    table: PeerTable[str] = PeerTable("shm")
    table.join(0, ["a0", "a1"])
    table.join(1, ["b0", "b1"])
    sends = table.join(2, ["c0", "c1"])
    to_new = [(s.value, s.fd) for s in sends if s.recipient == 2]
    assert to_new == [
        (0, None),  # version
        (2, None),  # own id
        (-1, "shm"),
        (0, "a0"),
        (0, "a1"),
        (1, "b0"),
        (1, "b1"),
        (2, "c0"),
        (2, "c1"),
    ]
    assert [s for s in sends if s.recipient == 0] == [Send(0, 2, "c0"), Send(0, 2, "c1")]
    assert [s for s in sends if s.recipient == 1] == [Send(1, 2, "c0"), Send(1, 2, "c1")]
    # Announcements first: the server flushes in this order, so the newcomer cannot ring a
    # peer whose socket does not yet say that the newcomer exists.
    assert [s.recipient for s in sends[:4]] == [0, 0, 1, 1]


def test_leave_returns_fds_and_bare_announcements() -> None:
    table: PeerTable[str] = PeerTable("shm")
    table.join(0, ["a0"])
    table.join(1, ["b0"])
    table.join(2, ["c0"])
    fds, sends = table.leave(1)
    assert fds == ("b0",)
    assert sends == [Send(0, 1), Send(2, 1)]
    assert 1 not in table and len(table) == 2


def test_table_rejects_misuse() -> None:
    table: PeerTable[str] = PeerTable("shm")
    table.join(0, [])
    with pytest.raises(UsageError, match="already in use"):
        table.join(0, [])
    with pytest.raises(UsageError, match="out of range"):
        table.join(MAX_PEER_ID + 1, [])
    with pytest.raises(UsageError, match="at most 256"):
        table.join(5, ["x"] * (MAX_VECTORS + 1))
    with pytest.raises(UsageError, match="not in the table"):
        table.leave(9)
    with pytest.raises(UsageError, match="first id"):
        PeerTable("shm", first_id=-1)


# --------------------------------------------------------------------------------------------
# A table and its clients, connected in memory


class Pair:
    """A PeerTable whose sends are delivered at once to one ClientState per peer."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.table: PeerTable[int] = PeerTable(SHM_FD)
        self.clients: dict[int, ClientState] = {}
        self.events: dict[int, list[object]] = {}
        self._next_fd = 20_000  # fake fd numbers; no error path closes them

    def deliver(self, sends: list[Send[int]]) -> None:
        for send in sends:
            client = self.clients[send.recipient]
            self.events[send.recipient].extend(client.receive(send.value, send.fd))

    def join(self) -> int:
        peer = self.table.allocate_id()
        self.clients[peer] = ClientState()
        self.events[peer] = []
        fds = list(range(self._next_fd, self._next_fd + self.vectors))
        self._next_fd += self.vectors
        self.deliver(self.table.join(peer, fds))
        return peer

    def leave(self, peer: int) -> None:
        _fds, sends = self.table.leave(peer)
        del self.clients[peer]
        self.deliver(sends)

    def check(self) -> None:
        members = set(self.table)
        for peer, client in self.clients.items():
            assert client.state == ClientState.CONNECTED
            assert client.peer_id == peer
            assert client.own_vectors == self.vectors
            assert set(client.peers) == members - {peer}
            assert all(n == self.vectors for n in client.peers.values())


SHM_FD = 19_999


def test_pair_handshake_events() -> None:
    pair = Pair(vectors=2)
    a = pair.join()
    b = pair.join()
    assert pair.events[b] == [
        Welcome(0, 1),
        SharedMemoryReceived(SHM_FD),
        PeerVector(a, 0, 20_000),
        PeerVector(a, 1, 20_001),
        OwnVector(0, 20_002),
        OwnVector(1, 20_003),
    ]
    assert pair.events[a][-2:] == [PeerVector(b, 0, 20_002), PeerVector(b, 1, 20_003)]
    pair.leave(b)
    assert pair.events[a][-1] == PeerLeft(b)
    pair.check()


class MembershipMachine(RuleBasedStateMachine):
    """Random joins and leaves: every client's view always equals the table's."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(vectors=3)

    @rule()
    def join(self) -> None:
        self.pair.join()

    @precondition(lambda self: len(self.pair.clients) > 0)
    @rule(index=st.integers(0, 1000))
    def leave(self, index: int) -> None:
        peers = sorted(self.pair.clients)
        self.pair.leave(peers[index % len(peers)])

    @invariant()
    def views_match(self) -> None:
        self.pair.check()


MembershipMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
TestMembership = MembershipMachine.TestCase


# --------------------------------------------------------------------------------------------
# ClientState: every protocol violation is named and its fd closed


def connected(peer: int = 3, max_vectors: int = MAX_VECTORS) -> ClientState:
    client = ClientState(max_vectors)
    client.receive(0, None)
    client.receive(peer, None)
    shm = os.eventfd(0)
    [event] = client.receive(SHM_MARKER, shm)
    assert event == SharedMemoryReceived(shm)
    os.close(shm)
    return client


@pytest.mark.parametrize(
    ("setup", "value", "message"),
    [
        ("new", 0, "an fd came with the version message"),
        ("version", 3, "an fd came with the peer id message"),
    ],
)
def test_fd_on_version_or_id_is_a_violation(
    setup: str, value: int, message: str, eventfd: int
) -> None:
    client = ClientState()
    if setup == "version":
        client.receive(0, None)
    with pytest.raises(ProtocolError, match=message):
        client.receive(value, eventfd)
    assert not is_open(eventfd)


def test_wrong_version_is_named() -> None:
    with pytest.raises(ProtocolError, match="version 1, this client speaks 0"):
        ClientState().receive(1, None)


@pytest.mark.parametrize("bad_id", [-2, MAX_PEER_ID + 1, 1 << 40])
def test_id_out_of_range(bad_id: int) -> None:
    client = ClientState()
    client.receive(0, None)
    with pytest.raises(ProtocolError, match=f"peer id {bad_id} is out of range"):
        client.receive(bad_id, None)


def test_shm_message_without_fd() -> None:
    client = ClientState()
    client.receive(0, None)
    client.receive(1, None)
    with pytest.raises(ProtocolError, match="shared-memory message has no fd"):
        client.receive(SHM_MARKER, None)


def test_something_else_instead_of_shm_closes_its_fd(eventfd: int) -> None:
    client = ClientState()
    client.receive(0, None)
    client.receive(1, None)
    with pytest.raises(ProtocolError, match=r"expected the shared memory \(-1\), got 4"):
        client.receive(4, eventfd)
    assert not is_open(eventfd)


def test_second_shm_message(eventfd: int) -> None:
    client = connected()
    with pytest.raises(ProtocolError, match="a second shared-memory message"):
        client.receive(SHM_MARKER, eventfd)
    assert not is_open(eventfd)


def test_leave_of_unknown_peer() -> None:
    with pytest.raises(ProtocolError, match="peer 7 left, but it was never announced"):
        connected().receive(7, None)


def test_leave_of_own_id() -> None:
    with pytest.raises(ProtocolError, match="leave message for this client's own id"):
        connected(peer=3).receive(3, None)


def test_vector_for_out_of_range_peer(eventfd: int) -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        connected().receive(MAX_PEER_ID + 1, eventfd)
    assert not is_open(eventfd)


def test_more_peer_vectors_than_expected(eventfd: int) -> None:
    client = connected(max_vectors=2)
    for _ in range(2):
        fd = os.eventfd(0)
        client.receive(5, fd)
        os.close(fd)
    with pytest.raises(ProtocolError, match="more than 2 vectors for peer 5"):
        client.receive(5, eventfd)
    assert not is_open(eventfd)


def test_more_own_vectors_than_expected(eventfd: int) -> None:
    client = connected(peer=3, max_vectors=1)
    fd = os.eventfd(0)
    [event] = client.receive(3, fd)
    assert event == OwnVector(0, fd)
    os.close(fd)
    with pytest.raises(ProtocolError, match="more than 1 vectors for this client"):
        client.receive(3, eventfd)
    assert not is_open(eventfd)


def test_errors_say_which_state() -> None:
    client = ClientState()
    with pytest.raises(ProtocolError, match=r"\(awaiting the protocol version\)"):
        client.receive(9, None)


def test_peer_can_leave_and_its_id_return_later() -> None:
    client = connected(peer=0, max_vectors=1)
    client.receive(1, 20_100)
    assert client.receive(1, None) == [PeerLeft(1)]
    assert client.receive(1, 20_101) == [PeerVector(1, 0, 20_101)]  # vector 0 again: a new peer


def test_max_vectors_is_checked() -> None:
    with pytest.raises(UsageError, match="max_vectors"):
        ClientState(0)
    with pytest.raises(UsageError, match="max_vectors"):
        ClientState(MAX_VECTORS + 1)

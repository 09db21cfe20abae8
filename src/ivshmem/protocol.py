"""The ivshmem wire protocol (version 0), with no I/O inside.

Traffic is one way, server to client, over a Unix stream socket. Every message is one signed
64-bit little-endian integer, optionally with one file descriptor attached (SCM_RIGHTS):

====================  ========  ==================================================
value                 fd        meaning
====================  ========  ==================================================
``0``                 none      protocol version (first message)
``own id``            none      the id the server gave this client (second)
``-1``                shm fd    the shared memory (third)
``peer id``           eventfd   ring ``peer``'s next vector through this fd; the
                                k-th such message for a peer is its vector k
``own id``            eventfd   the eventfd this client receives vector k on
``peer id``           none      that peer left
====================  ========  ==================================================

During the handshake the server sends, after the three fixed messages, every existing peer's
vectors and then the client's own. Later, a join is announced as the new peer's vectors, one
message each, and a leave as the bare id.

This module has three parts, each in one place:

* :func:`encode` / :class:`Decoder` -- bytes and fds in and out;
* :class:`PeerTable` -- the server's table of peers, its id allocation, and the list of
  :class:`Send` that each join or leave causes;
* :class:`ClientState` -- the client's view: turns received messages into events
  (:class:`Welcome`, :class:`SharedMemoryReceived`, :class:`PeerVector`, :class:`OwnVector`,
  :class:`PeerLeft`) and raises :class:`~ivshmem.errors.ProtocolError` on anything the protocol
  forbids, closing every fd that came with a bad message.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ProtocolError, UsageError

__all__ = [
    "MAX_PEER_ID",
    "MAX_VECTORS",
    "MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "SHM_MARKER",
    "ClientState",
    "Decoder",
    "Event",
    "OwnVector",
    "PeerLeft",
    "PeerTable",
    "PeerVector",
    "Send",
    "SharedMemoryReceived",
    "TableFullError",
    "Welcome",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 0
#: Peer ids are 16 bits: the doorbell register holds ``peer << 16 | vector``.
MAX_PEER_ID = 0xFFFF
#: Most vectors per peer this implementation accepts. (QEMU's device caps at 64; the doorbell
#: register carries 8 bits of vector in QEMU, so 256 is the most a host peer can address.)
MAX_VECTORS = 256
#: The value that announces the shared-memory fd.
SHM_MARKER = -1
MESSAGE_SIZE = 8

_MESSAGE = struct.Struct("<q")


def encode(value: int) -> bytes:
    """The 8 bytes of one message (the fd, if any, travels beside them)."""
    return _MESSAGE.pack(value)


def decode(data: bytes) -> int:
    """The value of one 8-byte message."""
    return int(_MESSAGE.unpack(data)[0])


def _close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class Decoder:
    """Reassembles 8-byte messages from a stream of (bytes, fds) reads.

    The kernel attaches an fd to the first byte of the data it was sent with, but a Unix stream
    read may join the bytes of a message sent without an fd to the bytes of a later one sent
    with an fd. So an adapter must read at most :data:`MESSAGE_SIZE` bytes at a time (QEMU's
    device does the same), and a read may bring at most one fd, only at the start of a message.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fd: int | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> tuple[int, int | None] | None:
        """Add what one read returned; return the (value, fd) message it completed, if any,
        whose fd the caller now owns. On error every fd held or given is closed first."""
        problem = None
        if len(data) + len(self._buffer) > MESSAGE_SIZE:
            problem = f"read of {len(data)} bytes crosses a message boundary"
        elif len(fds) > 1:
            problem = f"{len(fds)} fds arrived with one message (at most 1 is allowed)"
        elif fds and self._buffer:
            problem = "an fd arrived in the middle of a message"
        if problem is not None:
            for fd in fds:
                _close_quietly(fd)
            self.close()
            raise ProtocolError(problem)
        if fds:
            self._fd = fds[0]
        self._buffer += data
        if len(self._buffer) < MESSAGE_SIZE:
            return None
        value = decode(bytes(self._buffer))
        attached, self._fd = self._fd, None
        self._buffer.clear()
        return value, attached

    def close(self) -> None:
        """Drop a partial message and close its fd, if any."""
        fd, self._fd = self._fd, None
        _close_quietly(fd)
        self._buffer.clear()


# --------------------------------------------------------------------------------------------
# Server side


FdT = TypeVar("FdT")


@dataclass(frozen=True)
class Send(Generic[FdT]):
    """One message the server must send: ``value`` (and ``fd``, if not None) to ``recipient``."""

    recipient: int
    value: int
    fd: FdT | None = None


class TableFullError(UsageError):
    """All 65536 peer ids are in use."""


class PeerTable(Generic[FdT]):
    """The server's peers and their vectors, and what to send when peers come and go.

    The table does not create, send or close fds: the caller makes the eventfds, passes them
    in, and is told through :class:`Send` lists what to deliver. ``FdT`` is whatever the caller
    uses to hold an fd (an int, or a reference-counted holder).

    Ids are allocated like QEMU's server: the first is 0, then monotonically from the last one
    handed out, skipping ids in use and wrapping below 65536, so a reconnecting client gets a
    new id rather than the one it had.
    """

    def __init__(self, shm: FdT, first_id: int = 0) -> None:
        if not 0 <= first_id <= MAX_PEER_ID:
            raise UsageError(f"first id {first_id} is out of range 0..{MAX_PEER_ID}")
        self._shm = shm
        #: Where the next id search starts (0 like QEMU; another value helps test wrapping).
        self._next_id = first_id
        self._peers: dict[int, tuple[FdT, ...]] = {}

    def __contains__(self, peer: int) -> bool:
        return peer in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[int]:
        return iter(self._peers)

    def vectors_of(self, peer: int) -> tuple[FdT, ...]:
        return self._peers[peer]

    def allocate_id(self) -> int:
        """The id the next :meth:`join` should use (not yet reserved)."""
        candidate = self._next_id
        for _ in range(MAX_PEER_ID + 1):
            if candidate not in self._peers:
                return candidate
            candidate = (candidate + 1) & MAX_PEER_ID
        raise TableFullError("all 65536 peer ids are in use: no more clients can join")

    def add(self, peer: int, vector_fds: Sequence[FdT]) -> list[tuple[int, tuple[FdT, ...]]]:
        """Add ``peer`` with one fd per vector, like :meth:`join`, but return the peers that
        were already here (with their fds, in the order :meth:`join` announces them)
        instead of a list of :class:`Send`: for a caller that builds its messages itself."""
        before = list(self._peers.items())
        self.put(peer, vector_fds)
        return before

    def put(self, peer: int, vector_fds: Sequence[FdT]) -> None:
        """Add ``peer`` with one fd per vector and return nothing: for a caller that sends a
        join's messages from its own copy of the table (the server's C fan-out)."""
        if not 0 <= peer <= MAX_PEER_ID:
            raise UsageError(f"peer id {peer} is out of range 0..{MAX_PEER_ID}")
        if peer in self._peers:
            raise UsageError(f"peer id {peer} is already in use")
        if not 0 <= len(vector_fds) <= MAX_VECTORS:
            raise UsageError(f"{len(vector_fds)} vectors: at most {MAX_VECTORS} are supported")
        self._peers[peer] = tuple(vector_fds)
        self._next_id = (peer + 1) & MAX_PEER_ID

    @property
    def shm(self) -> FdT:
        """The shared memory's fd, as given."""
        return self._shm

    def join(self, peer: int, vector_fds: Sequence[FdT]) -> list[Send[FdT]]:
        """Add ``peer`` with one fd per vector; return its handshake and the announcements."""
        before = self.add(peer, vector_fds)
        # The announcements to the peers already here come first. Sends to different
        # recipients are independent on the wire, but the server flushes in this order, so by
        # the time the newcomer holds its handshake (and can ring anyone), every other peer's
        # socket already holds the news of its arrival: a peer rung by a newcomer finds it in
        # its peer set on its next read, unless that peer's own socket was full.
        fds = self._peers[peer]
        sends: list[Send[FdT]] = [Send(other, peer, fd) for other, _ in before for fd in fds]
        sends += [
            Send(peer, PROTOCOL_VERSION),
            Send(peer, peer),
            Send(peer, SHM_MARKER, self._shm),
        ]
        for other, other_fds in before:
            sends.extend(Send(peer, other, fd) for fd in other_fds)
        sends.extend(Send(peer, peer, fd) for fd in fds)
        return sends

    def remove(self, peer: int) -> tuple[FdT, ...]:
        """Remove ``peer`` like :meth:`leave`, returning only its fds: every remaining peer
        is to be told ``peer`` (no fd)."""
        try:
            return self._peers.pop(peer)
        except KeyError:
            raise UsageError(f"peer {peer} is not in the table") from None

    def leave(self, peer: int) -> tuple[tuple[FdT, ...], list[Send[FdT]]]:
        """Remove ``peer``; return its fds (for the caller to release) and the announcements."""
        fds = self.remove(peer)
        return fds, [Send(other, peer) for other in self._peers]


# --------------------------------------------------------------------------------------------
# Client side


@dataclass(frozen=True)
class Welcome:
    """The server speaks our protocol version and gave us ``peer_id``."""

    version: int
    peer_id: int


@dataclass(frozen=True)
class SharedMemoryReceived:
    """The shared-memory fd (now owned by whoever takes the event)."""

    fd: int


@dataclass(frozen=True)
class PeerVector:
    """``peer`` has a vector ``vector``, rung by writing to ``fd`` (owned by the taker).

    ``vector == 0`` for a peer not seen before means that peer is new (it joined, or existed
    when we connected)."""

    peer: int
    vector: int
    fd: int


@dataclass(frozen=True)
class OwnVector:
    """We receive our vector ``vector`` on ``fd`` (owned by the taker)."""

    vector: int
    fd: int


@dataclass(frozen=True)
class PeerLeft:
    """``peer`` disconnected; its vector fds (already handed out) are now useless."""

    peer: int


Event = Welcome | SharedMemoryReceived | PeerVector | OwnVector | PeerLeft


class ClientState:
    """What a client knows, built from the messages it receives.

    Feed each message to :meth:`receive`; it returns the events the message causes. States:
    waiting for the version, for the id, for the shared memory, then connected (vectors of
    peers and our own may arrive at any time; a bare id is a leave).
    """

    AWAIT_VERSION = "awaiting the protocol version"
    AWAIT_ID = "awaiting the peer id"
    AWAIT_SHM = "awaiting the shared memory"
    CONNECTED = "connected"

    def __init__(self, max_vectors: int = MAX_VECTORS) -> None:
        if not 1 <= max_vectors <= MAX_VECTORS:
            raise UsageError(f"max_vectors must be 1..{MAX_VECTORS}, not {max_vectors}")
        self.max_vectors = max_vectors
        self.state = self.AWAIT_VERSION
        self.peer_id: int | None = None
        self.own_vectors = 0
        #: Vector counts of the other peers currently connected.
        self.peers: dict[int, int] = {}

    def _error(self, message: str) -> ProtocolError:
        return ProtocolError(f"server broke the ivshmem protocol ({self.state}): {message}")

    def receive(self, value: int, fd: int | None) -> list[Event]:
        """Take one message. Raises ProtocolError (after closing ``fd``) if it is not allowed."""
        try:
            return self._receive(value, fd)
        except ProtocolError:
            _close_quietly(fd)
            raise

    def _receive(self, value: int, fd: int | None) -> list[Event]:
        if self.state == self.AWAIT_VERSION:
            if fd is not None:
                raise self._error("an fd came with the version message")
            if value != PROTOCOL_VERSION:
                raise self._error(
                    f"server speaks protocol version {value}, this client speaks {PROTOCOL_VERSION}"
                )
            self.state = self.AWAIT_ID
            return []
        if self.state == self.AWAIT_ID:
            if fd is not None:
                raise self._error("an fd came with the peer id message")
            if not 0 <= value <= MAX_PEER_ID:
                raise self._error(f"peer id {value} is out of range 0..{MAX_PEER_ID}")
            self.peer_id = value
            self.state = self.AWAIT_SHM
            return [Welcome(PROTOCOL_VERSION, value)]
        if self.state == self.AWAIT_SHM:
            if value != SHM_MARKER:
                raise self._error(f"expected the shared memory (-1), got {value}")
            if fd is None:
                raise self._error("the shared-memory message has no fd")
            self.state = self.CONNECTED
            return [SharedMemoryReceived(fd)]
        # Connected.
        if value == SHM_MARKER:
            raise self._error("a second shared-memory message")
        if not 0 <= value <= MAX_PEER_ID:
            raise self._error(f"peer id {value} is out of range 0..{MAX_PEER_ID}")
        if fd is None:
            if value == self.peer_id:
                raise self._error("a leave message for this client's own id")
            if value not in self.peers:
                raise self._error(f"peer {value} left, but it was never announced")
            del self.peers[value]
            return [PeerLeft(value)]
        if value == self.peer_id:
            if self.own_vectors >= self.max_vectors:
                raise self._error(f"more than {self.max_vectors} vectors for this client")
            self.own_vectors += 1
            return [OwnVector(self.own_vectors - 1, fd)]
        count = self.peers.get(value, 0)
        if count >= self.max_vectors:
            raise self._error(f"more than {self.max_vectors} vectors for peer {value}")
        self.peers[value] = count + 1
        return [PeerVector(value, count, fd)]

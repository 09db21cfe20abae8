"""A device's connection to the ivshmem server: one ordinary peer, non-blocking, reconnecting.

The protocol is :mod:`ivshmem.protocol`'s client side (:class:`~ivshmem.protocol.Decoder` and
:class:`~ivshmem.protocol.ClientState`), the same one QEMU's ``ivshmem-doorbell`` speaks with
our server or QEMU's contrib server: version, id, shared memory, then vectors and leaves.

The first connection is made before any VM attaches (BAR2 must exist when QEMU asks for it),
so it may wait for the server's greeting; every later read happens when the loop says the
socket is readable, and a lost server is retried on a timer, so nothing here ever blocks the
loop that answers QEMU.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._scm import received_fds
from ..errors import ProtocolError
from ..protocol import (
    MESSAGE_SIZE,
    ClientState,
    Decoder,
    OwnVector,
    PeerLeft,
    PeerVector,
    SharedMemoryReceived,
    Welcome,
)

__all__ = ["LinkEvents", "ServerLink", "ServerUnavailableError"]

log = logging.getLogger("ivshmem.device")

_FD_SPACE = socket.CMSG_SPACE(4)


class ServerUnavailableError(OSError):
    """The ivshmem server could not be reached or broke off the handshake."""


@dataclass
class LinkEvents:
    """What the link tells its device (set by the loop)."""

    welcome: Callable[[int], None] = lambda peer_id: None
    shared_memory: Callable[[int], None] = lambda fd: None  # fd owned by the callee
    own_vector: Callable[[int, int], None] = lambda vector, fd: None  # fd owned by the callee
    joined: Callable[[int], None] = lambda peer: None  # after the handshake only
    left: Callable[[int], None] = lambda peer: None
    lost: Callable[[str], None] = lambda why: None


@dataclass
class ServerLink:
    """The server connection of one device: peers' doorbell eventfds and the socket."""

    path: str
    max_vectors: int
    events: LinkEvents = field(default_factory=LinkEvents)
    sock: socket.socket | None = None
    peer_id: int | None = None
    #: Doorbell eventfds of the other peers, by id, in vector order.
    peers: dict[int, list[int]] = field(default_factory=dict)
    handshake_done: bool = False
    #: Why the last connection ended.
    lost: str = ""
    _decoder: Decoder = field(default_factory=Decoder)
    _state: ClientState | None = None

    def connect(self) -> None:
        """Connect (non-blocking); raises :class:`ServerUnavailableError` if refused."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except (BlockingIOError, InterruptedError):
            pass  # Unix connects complete at once or fail; a full backlog is retried later
        except OSError as err:
            sock.close()
            raise ServerUnavailableError(
                err.errno, f"cannot connect to the ivshmem server at {self.path}: {err.strerror}"
            ) from err
        self.sock = sock
        self._decoder = Decoder()
        self._state = ClientState(self.max_vectors)
        self.peer_id = None
        self.handshake_done = False

    def wait_ready(self, timeout: float) -> None:
        """Read until the handshake is over (our first own vector), or raise."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while not self.handshake_done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise ServerUnavailableError(
                    0, f"the ivshmem server at {self.path} did not finish its greeting"
                )
            self.sock.settimeout(remaining)
            try:
                if not self.read_ready(blocking=True):
                    raise ServerUnavailableError(
                        0, f"the ivshmem server at {self.path} failed its greeting: {self.lost}"
                    )
            except TimeoutError:
                continue
            finally:
                if self.sock is not None:
                    self.sock.setblocking(False)

    def read_ready(self, blocking: bool = False) -> bool:
        """Process what the socket has; False when the connection is gone (already closed)."""
        sock = self.sock
        if sock is None:
            return False
        for _ in range(64):  # a bounded batch: other work waits for us
            try:
                data, ancdata, msg_flags, _addr = sock.recvmsg(
                    MESSAGE_SIZE - self._decoder.pending, _FD_SPACE
                )
            except (BlockingIOError, InterruptedError):
                return True
            except TimeoutError:
                if blocking:
                    raise
                return True
            except OSError as err:
                self._lost(f"read failed: {err.strerror}")
                return False
            fds = received_fds(ancdata)
            if msg_flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                self._lost("the server sent more fds than one message may carry")
                return False
            if not data:
                for fd in fds:
                    os.close(fd)
                self._lost("the server closed the connection")
                return False
            try:
                message = self._decoder.feed(data, fds)
                if message is not None:
                    assert self._state is not None
                    for event in self._state.receive(*message):
                        self._dispatch(event)
            except ProtocolError as err:
                self._lost(str(err))
                return False
            if blocking and self.handshake_done:
                return True
        return True

    def _dispatch(self, event: object) -> None:
        if isinstance(event, Welcome):
            self.peer_id = event.peer_id
            self.events.welcome(event.peer_id)
        elif isinstance(event, SharedMemoryReceived):
            self.events.shared_memory(event.fd)
        elif isinstance(event, PeerVector):
            fds = self.peers.setdefault(event.peer, [])
            fds.append(event.fd)
            if event.vector == 0 and self.handshake_done:
                self.events.joined(event.peer)
        elif isinstance(event, OwnVector):
            self.handshake_done = True
            self.events.own_vector(event.vector, event.fd)
        elif isinstance(event, PeerLeft):
            for fd in self.peers.pop(event.peer, []):
                os.close(fd)
            self.events.left(event.peer)

    def ring(self, peer: int, vector: int) -> bool:
        """Signal ``peer``'s ``vector`` through the server-given eventfd; False if unknown."""
        fds = self.peers.get(peer)
        if fds is None or vector >= len(fds):
            return False
        try:
            os.write(fds[vector], b"\x01\0\0\0\0\0\0\0")
        except OSError:
            return False
        return True

    def abort(self, why: str) -> None:
        """Give up on this connection (e.g. a silent server); the loss is reported as usual."""
        if self.sock is not None:
            self._lost(why)

    def _lost(self, why: str) -> None:
        self.lost = why
        self.events.lost(why)  # first: the loop stops watching the socket before it closes
        self.close()

    def close(self) -> None:
        """Drop the connection and every eventfd it brought (the device's own vectors are the
        device's to close)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._decoder.close()
        for fds in self.peers.values():
            for fd in fds:
                os.close(fd)
        self.peers.clear()
        self.handshake_done = False

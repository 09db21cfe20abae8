"""The state every part of :class:`~ivshmem.server.Server` shares, declared once.

The server is assembled from one mixin per job (region, queues, flow control, fd shortage,
status socket) around the asyncio core; this base names the attributes they share and the
methods one part calls in another, so that each module type-checks on its own."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..memory import SharedMemory
from ..protocol import PeerTable
from .config import ServerConfig
from .fds import SharedFd
from .regionguard import RegionGuard, RegionMembership

if TYPE_CHECKING:
    from ._fanout import Wire
    from .admission import _Source
    from .core import Server
    from .flow import _SendStall
    from .queues import _Client
    from .shortage import _Shortage


class MembershipObserver(Protocol):
    """Told about membership changes, after the protocol announcements are queued."""

    def on_join(self, server: Server, peer: int) -> None: ...

    def on_leave(self, server: Server, peer: int) -> None: ...


@dataclass
class _Counters:
    joins: int = 0
    leaves: int = 0
    messages_sent: int = 0
    clients_refused: int = 0
    slow_clients_dropped: int = 0
    clients_sent_data: int = 0
    accept_errors: int = 0
    status_queries: int = 0
    #: Episodes in which the kernel would not pass fds (ETOOMANYREFS) or lacked memory.
    send_stalls: int = 0
    #: Clients disconnected in those episodes for holding unread messages and not reading.
    stalled_clients_dropped: int = 0
    #: Clients disconnected because all queues together passed max_queued_total.
    queue_budget_drops: int = 0
    #: Episodes in which the server ran out of fds (accept or eventfd creation failed).
    fd_shortages: int = 0
    #: Joins dropped together with their leave from a queue, both unsent.
    joins_collapsed: int = 0
    #: Connections that waited behind their source's handshakes (--max-pending).
    clients_waited: int = 0


@dataclass
class _Tasks:
    status: set[asyncio.Task[None]] = field(default_factory=set)


class ServerBase:
    """Attributes shared by the server's parts (set in ``Server.__init__``)."""

    config: ServerConfig
    observers: list[MembershipObserver]
    size: int
    _shm: SharedMemory | None
    _shm_ref: SharedFd | None
    _table: PeerTable[SharedFd] | None
    #: The C fan-out's copy of the table (queues.py), or None: then joins and leaves are
    #: sent from lists of messages (:meth:`QueuesMixin._dispatch`).
    _wire: Wire | None
    _listener: socket.socket | None
    _status_listener: socket.socket | None
    _clients: dict[int, _Client]
    _dirty: list[_Client]
    _flush_scheduled: bool
    _queued_total: int
    _budget_check_scheduled: bool
    _blocked: list[_Client]
    _stall: _SendStall | None
    _stall_timer: asyncio.TimerHandle | None
    _stall_delay: float
    _truesize: int
    _loop: asyncio.AbstractEventLoop | None
    _accept_paused: bool
    _parked: deque[tuple[socket.socket, tuple[int, int, int]]]
    _backoff: float
    _shortage: _Shortage | None
    _reserve: int
    _reserve_usable: bool
    _started: float
    _counters: _Counters
    _tasks: _Tasks
    _closed: bool
    _guard: RegionGuard | None
    _membership: RegionMembership | None
    _sources: dict[tuple[int, int], _Source]
    _source_warned: dict[tuple[int, int, int], float]

    if TYPE_CHECKING:
        # Defined in one part, called from another.
        def ring(self, peer: int, vector: int) -> None: ...
        def _on_accept(self) -> None: ...
        def _join(self, conn: socket.socket, creds: tuple[int, int, int]) -> bool: ...
        def _disconnect(self, client: _Client, reason: str, level: int = ...) -> None: ...
        def _flush(self, client: _Client) -> None: ...
        def _stalled(self, client: _Client, err: OSError) -> None: ...
        def _unread(self, client: _Client) -> int: ...
        def _count_fds(self) -> int: ...
        def _restore_reserve(self) -> None: ...
        def _release_reserve(self) -> bool: ...
        def _judge_reader(self, client: _Client) -> None: ...
        def _handshake_sent(self, client: _Client) -> None: ...
        def _source_started(self, client: _Client) -> None: ...
        def _check_region(self) -> None: ...
        def _sent_to(self, client: _Client) -> tuple[int, float]: ...

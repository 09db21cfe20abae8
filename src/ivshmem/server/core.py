"""The server's core: the asyncio loop around :class:`ivshmem.protocol.PeerTable`.

Accepting, admitting (credentials, allow-list, eventfds) and dropping clients, and starting
and stopping; everything else is in its own module of this package: the region
(:mod:`.region`), queues (:mod:`.queues`), flow control (:mod:`.flow`), fd shortage
(:mod:`.shortage`), the status socket (:mod:`.status`), access control (:mod:`.access`),
listening sockets (:mod:`.sockets`), the pid file (:mod:`.pidfile`) and the one epoll set
that watches every client socket for its leave (:mod:`.readers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..memory import SharedMemory, format_size
from ..protocol import PROTOCOL_VERSION, SHM_MARKER, PeerTable, TableFullError
from .access import client_allowed, peer_credentials, peer_groups
from .admission import AdmissionMixin, _Source
from .base import MembershipObserver, _Counters, _Tasks
from .config import QEMU_MAX_VECTORS, ServerConfig
from .doorbells import DoorbellMixin
from .fds import SharedFd, raise_fd_limit
from .flow import _SEND_RETRY_MIN, FlowMixin, _message_truesize, _SendStall
from .pidfile import remove_pidfile, write_pidfile
from .queues import Message, QueuesMixin, _Client
from .readers import ClientReaders, refusal
from .region import RegionMixin
from .regionguard import CHECK_INTERVAL, RegionGuard, RegionMembership, ring_eventfd
from .shortage import _BACKOFF_MIN, ShortageMixin, _Shortage
from .sockets import listen, sd_notify
from .status import _ACCEPT_BURST, StatusMixin

if TYPE_CHECKING:
    from ._fanout import Wire

log = logging.getLogger("ivshmem.server")

_AF_UNIX, _SOCK_STREAM = int(socket.AF_UNIX), int(socket.SOCK_STREAM)


def _accept(listener: socket.socket) -> socket.socket:
    """``listener.accept()`` for the server's own AF_UNIX stream listener, without what that
    spends per client on finding out what it already knows: ``socket.accept`` reads the
    listener's family and type through enum conversions and, for the new socket, asks the
    kernel its address (``getsockname``). Raises what ``accept`` raises."""
    fd, _addr = listener._accept()  # type: ignore[attr-defined]  # socket.accept's own step
    return socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fd)


class Server(
    RegionMixin, AdmissionMixin, QueuesMixin, FlowMixin, ShortageMixin, StatusMixin, DoorbellMixin
):
    """The ivshmem server. :meth:`open` (synchronous) creates the shared memory and the
    listening sockets -- every configuration error surfaces there, before daemonizing --
    and :meth:`serve` runs until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.observers: list[MembershipObserver] = []
        self._shm: SharedMemory | None = None
        self._shm_ref: SharedFd | None = None
        self._table: PeerTable[SharedFd] | None = None
        self._wire: Wire | None = None
        self._listener: socket.socket | None = None
        self._status_listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        #: Every client's socket, watched for its leave (readers.py); made by serve().
        self._readers: ClientReaders[_Client] | None = None
        self._dirty: list[_Client] = []
        self._flush_scheduled = False
        #: Messages in all clients' queues together (bounded by max_queued_total).
        self._queued_total = 0
        self._budget_check_scheduled = False
        #: Clients whose flushing waits for the kernel to take fds again, in stall order.
        self._blocked: list[_Client] = []
        self._stall: _SendStall | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_delay = _SEND_RETRY_MIN
        self._truesize = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._accept_paused = False
        #: Accepted clients waiting for fds to create their eventfds.
        self._parked: deque[tuple[socket.socket, tuple[int, int, int]]] = deque()
        self._backoff = _BACKOFF_MIN
        self._shortage: _Shortage | None = None
        #: An fd held in reserve (on /dev/null): closed when the server is out of fds, so it
        #: can still count its fds and answer a status query, and reopened afterwards.
        self._reserve = -1
        self._reserve_usable = True
        self._pidfile_written = False
        self._started = time.monotonic()
        self._counters = _Counters()
        self._tasks = _Tasks()
        self._closed = False
        self._stop_requested = False
        #: (st_dev, st_ino) of each socket file we bound, to remove only our own at exit.
        self._bound: dict[str, tuple[int, int]] = {}
        self.size = 0
        # The region's size guard (a no-op on a sealed memfd); with ``format_region`` the
        # membership table, written so the server cannot fault.
        self._guard: RegionGuard | None = None
        #: One timer for the periodic guards: the region's size (regionguard.py) and jammed
        #: doorbells (doorbells.py), both every CHECK_INTERVAL.
        self._guard_timer: asyncio.TimerHandle | None = None
        self._membership: RegionMembership | None = None
        #: Per client process: its handshakes in flight and connections waiting to join.
        self._sources: dict[tuple[int, int], _Source] = {}
        #: When each source was last warned about (admission.py).
        self._source_warned: dict[tuple[int, int, int], float] = {}

    def open(self) -> None:
        """Create the listening sockets, the pid file and the shared memory. Raises
        IvshmemError subclasses with a message saying what to change; on error nothing is
        left behind (a region this call created is removed again)."""
        if self._listener is not None:
            return
        cfg = self.config
        old, new = raise_fd_limit()
        if new != old:
            log.debug("raised the open-file limit from %d to %d", old, new)
        if cfg.vectors > QEMU_MAX_VECTORS:
            log.warning(
                "%d vectors per peer: QEMU's ivshmem-doorbell device refuses more than %d, so "
                "QEMU guests cannot connect to this server (host peers can); use -n %d or "
                "fewer for guests",
                cfg.vectors,
                QEMU_MAX_VECTORS,
                QEMU_MAX_VECTORS,
            )
        try:
            self._restore_reserve()
            self._truesize = _message_truesize()
            # Sockets first: their failures are the common ones (path in use, directory not
            # writable). Then the pid file, so that failing on it leaves no region behind.
            self._listener = self._listen(cfg.socket_path, socket.SOMAXCONN, "-S")
            if cfg.status_socket is not None:
                self._status_listener = self._listen(cfg.status_socket, 16, "--status-socket")
            if cfg.pidfile is not None:
                self._write_pidfile(cfg.pidfile)
            self._open_shm()
            if cfg.format_region:
                self._open_membership()
        except BaseException:
            self.close(discard=True)
            raise
        assert self._shm is not None
        shm = self._shm
        log.info(
            "serving %s shared memory (%s%s) with %d vector(s) per peer on %s",
            format_size(self.size),
            shm.kind,
            f" {shm.path or cfg.shm_path}" if shm.kind != "memfd" else "",
            cfg.vectors,
            cfg.socket_path,
        )

    def _write_pidfile(self, path: str) -> None:
        write_pidfile(path)
        self._pidfile_written = True

    def _remove_pidfile(self) -> None:
        path = self.config.pidfile
        if not self._pidfile_written or path is None:
            return
        self._pidfile_written = False
        remove_pidfile(path)

    def _listen(self, path: str, backlog: int, option: str) -> socket.socket:
        sock = listen(path, self.config.mode, self.config.group, backlog, option)
        st = os.lstat(path)
        self._bound[path] = (st.st_dev, st.st_ino)
        return sock

    # -- public state -------------------------------------------------------------------

    @property
    def peers(self) -> frozenset[int]:
        return frozenset(self._clients)

    def ring(self, peer: int, vector: int) -> None:
        """Ring ``vector`` of ``peer`` (as if another peer wrote its doorbell)."""
        table = self._table
        if table is None or peer not in table:
            raise UsageError(f"peer {peer} is not connected")
        fds = table.vectors_of(peer)
        if not 0 <= vector < len(fds):
            raise UsageError(f"vector {vector} does not exist: peers have {len(fds)}")
        # Never blocks, even on an eventfd a peer made blocking and saturated.
        ring_eventfd(fds[vector].fileno())

    # -- running ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until :meth:`stop` is called or SIGTERM/SIGINT arrives, then close."""
        self.open()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        installed: list[signal.Signals] = []
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(signum, self._on_signal, signum)
                    installed.append(signum)
                except (RuntimeError, ValueError):
                    pass  # not the main thread: the embedder handles signals
            assert self._listener is not None
            if not self._closed:
                readers = ClientReaders(self._on_client_readable)
                self._readers = readers
                loop.add_reader(readers.fileno(), readers.dispatch)
            loop.add_reader(self._listener.fileno(), self._on_accept)
            if self._status_listener is not None:
                loop.add_reader(self._status_listener.fileno(), self._on_status_accept)
            self._guard_timer = loop.call_later(CHECK_INTERVAL, self._on_guard_timer)
            sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {self.config.socket_path}")
            await self._stopping.wait()
        finally:
            sd_notify("STOPPING=1")
            # Close while our handlers are still installed: a second SIGTERM during
            # shutdown then changes nothing instead of killing a half-closed server.
            self.close()
            for signum in installed:
                loop.remove_signal_handler(signum)

    def stop(self) -> None:
        """Ask :meth:`serve` to finish; safe to call from any thread."""
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None:
            self._stop_requested = True  # serve() has not started yet: it returns at once
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            stopping.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)

    def _on_signal(self, signum: int) -> None:
        log.info("received signal %d: shutting down", signum)
        self.stop()

    def close(self, discard: bool = False) -> None:
        """Disconnect every client (which is how they learn the server is gone), remove the
        socket files and the pid file and release the shared memory. Idempotent.

        ``discard`` (for a start that failed) also removes a named region that this server
        created: nobody can have used it yet, and left behind it would look like a region
        worth keeping."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if self._clients:
            log.info("closing %d client connection(s)", len(self._clients))
        for client in list(self._clients.values()):
            self._drop(client, announce=False)
        self._wire = None
        while self._parked:
            self._parked.popleft()[0].close()
        self._close_waiting()
        self._dirty.clear()
        self._blocked.clear()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None
        for task in list(self._tasks.status):
            task.cancel()
        readers, self._readers = self._readers, None
        if readers is not None:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(readers.fileno())
            readers.close()
        for listener, path in (
            (self._listener, self.config.socket_path),
            (self._status_listener, self.config.status_socket),
        ):
            if listener is None:
                continue
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(listener.fileno())
            if path is not None:
                self._remove_socket_file(path)
            listener.close()
        self._listener = self._status_listener = None
        if self._membership is not None:
            self._membership.close()
            self._membership = None
        if discard and self._shm is not None and self._shm.created:
            log.info("removing %s, created by this failed start", self._shm.path)
            self._shm.unlink()
        if self._shm_ref is not None:
            self._shm_ref.release()  # the server's reference; queued ones are gone already
            self._shm_ref = None
        elif self._shm is not None:
            self._shm.close()
        self._remove_pidfile()
        self._release_reserve()

    def _on_guard_timer(self) -> None:
        """Every CHECK_INTERVAL: restore an unsealed region's size (a no-op on a sealed
        memfd) and unjam doorbells."""
        self._guard_timer = None
        if self._closed or self._loop is None:
            return
        self._check_region()
        self.check_doorbells()
        self._guard_timer = self._loop.call_later(CHECK_INTERVAL, self._on_guard_timer)

    def _remove_socket_file(self, path: str) -> None:
        """Unlink ``path`` only if it is still the socket we bound: an operator may have
        removed ours and started another server there."""
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._bound.get(path):
                os.unlink(path)
        except OSError:
            pass

    # -- accepting ----------------------------------------------------------------------

    def _on_accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BURST):
            if self._accept_paused:
                return
            try:
                conn = _accept(listener)
            except (BlockingIOError, InterruptedError):
                # The backlog is empty: whoever waited through a shortage has been served.
                if self._shortage is not None and not self._parked:
                    self._end_shortage()
                return
            except OSError as err:
                self._counters.accept_errors += 1
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    first = self._begin_shortage()
                    assert self._shortage is not None
                    self._shortage.accept_failures += 1
                    if first:
                        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                        log.warning(
                            "cannot accept clients: %s (%d fds open, limit %d); waiting "
                            "clients stay in the listen backlog and are served as fds are "
                            "freed (logged once per shortage, with a summary when it ends)",
                            err.strerror,
                            self._count_fds(),
                            soft,
                        )
                    else:
                        log.debug("accept still fails: %s", err.strerror)
                    self._pause_accepting()
                    return
                if err.errno in (errno.ECONNABORTED, errno.EPROTO):
                    log.info("a client went away before it was accepted")
                    continue
                log.error("accept failed: %s; retrying in %.2f s", err.strerror, self._backoff)
                self._pause_accepting()
                return
            try:
                self._admit(conn)
            except Exception:
                # A bug or an unexpected OSError around one client must not stop the server.
                log.exception("unexpected error while admitting a client; dropping it")
                conn.close()
            # Send the announcements and the handshake now (the others first, as queued): a
            # handshake the kernel took is not pending against its source, and a client that
            # already hung up is gone before the next one joins.
            self._flush_dirty()

    def _admit(self, conn: socket.socket) -> None:
        """Give a new connection an id and eventfds, queue its handshake and the announcements."""
        assert self._table is not None and self._loop is not None
        try:
            conn.setblocking(False)
            creds = peer_credentials(conn)
        except OSError as err:
            log.info("a client went away while being accepted: %s", err.strerror)
            conn.close()
            return
        pid, uid, gid = creds
        log.debug("connection from pid %d uid %d gid %d", pid, uid, gid)
        if not client_allowed(self.config, uid, gid, lambda: peer_groups(conn)):
            self._counters.clients_refused += 1
            log.warning("refused client pid %d uid %d gid %d: not in the allow-list", pid, uid, gid)
            conn.close()
            return
        self._admit_bounded(conn, creds)

    def _join(self, conn: socket.socket, creds: tuple[int, int, int]) -> bool:
        """Make an accepted, allowed connection a peer. Returns False if it had to be parked
        because the fd limit is reached (it joins when fds are free again)."""
        assert self._table is not None and self._loop is not None
        pid, uid, _gid = creds
        holders: list[SharedFd] = []
        try:
            for _ in range(self.config.vectors):
                holders.append(SharedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)))
            peer = self._table.allocate_id()
        except OSError as err:
            for holder in holders:
                holder.release()
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                # Out of fds in the middle of a handshake: keep the accepted connection
                # waiting (it costs one fd, already spent) and stop accepting until fds
                # are free, rather than turning a transient limit into a failed client.
                self._parked.append((conn, creds))
                first = self._begin_shortage()
                assert self._shortage is not None
                self._shortage.clients_waited += 1
                if first:
                    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                    log.warning(
                        "client pid %d waits: cannot create its eventfds (%s; %d fds open, "
                        "limit %d); accepting pauses until fds are freed (logged once per "
                        "shortage, with a summary when it ends)",
                        pid,
                        err.strerror,
                        self._count_fds(),
                        soft,
                    )
                else:
                    log.debug("client pid %d waits for its eventfds: %s", pid, err.strerror)
                self._pause_accepting()
                return False
            conn.close()
            self._counters.clients_refused += 1
            log.warning("cannot serve client pid %d: cannot create eventfds: %s", pid, err.strerror)
            return True
        except TableFullError as err:
            for holder in holders:
                holder.release()
            conn.close()
            self._counters.clients_refused += 1
            log.warning("cannot serve client pid %d: %s", pid, err)
            return True
        client = _Client(conn, peer, creds)
        readers = self._readers
        assert readers is not None
        try:
            readers.add(client.fd, client)
        except OSError as err:
            for holder in holders:
                holder.release()
            conn.close()
            self._counters.clients_refused += 1
            log.warning(
                "cannot serve client pid %d: cannot watch its socket: %s", pid, refusal(err)
            )
            return True
        self._backoff = _BACKOFF_MIN
        self._clients[peer] = client
        wire = self._wire
        sends: list[Message] = []
        # The table's entry owns the holders' first reference from here on.
        if wire is not None:
            # The C fan-out's copy of the table sends the join from there.
            self._table.put(peer, holders)
            wire.add(peer, client.fd, [holder.fileno() for holder in holders])
        else:
            before = self._table.add(peer, holders)
            # What PeerTable.join lists, as tuples: the announcements to the peers already
            # here first (so they know of the newcomer before it can ring them), then its
            # handshake.
            sends = [(other, peer, fd) for other, _ in before for fd in holders]
            sends += [(peer, PROTOCOL_VERSION, None), (peer, peer, None)]
            sends.append((peer, SHM_MARKER, self._table.shm))
            sends += [(peer, other, fd) for other, other_fds in before for fd in other_fds]
            sends += [(peer, peer, fd) for fd in holders]
        self._counters.joins += 1
        client.handshake_left = 3 + self.config.vectors * len(self._table)
        if wire is None:
            self._source_started(client)
        # Before the newcomer is sent the fd: it must map the region at its right size.
        self._check_region()
        # Listed in the membership table before it is sent anything, so a peer that looks at
        # the table right after its handshake finds itself there.
        self._membership_joined(peer)
        if wire is not None:
            self._send_join(wire, client)
        else:
            self._dispatch(sends)
        # Logged once the messages are out: the log line is not on the clients' path.
        log.info(
            "peer %d joined (pid %d, uid %d); %d peer(s) connected",
            peer,
            pid,
            uid,
            len(self._clients),
        )
        self._membership_changed(peer)
        self._notify_observers("on_join", peer)
        return True

    # -- leaving ------------------------------------------------------------------------

    def _on_client_readable(self, client: _Client) -> None:
        if client.closed:
            return
        try:
            data = client.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            if err.errno == errno.ECONNRESET:
                # Its process exited (or closed) with messages unread: still a leave.
                self._disconnect(client, "left (it closed with messages unread)")
            else:
                self._disconnect(client, f"connection broke ({err.strerror})")
            return
        if data:
            # Clients never send in protocol version 0; QEMU's server treats any input as a
            # disconnect, and a client that writes is confused or hostile either way.
            self._counters.clients_sent_data += 1
            self._disconnect(
                client,
                "sent data, which ivshmem clients never do: disconnected",
                logging.WARNING,
            )
        else:
            self._disconnect(client, "left")

    def _disconnect(self, client: _Client, reason: str, level: int = logging.INFO) -> None:
        if client.closed:
            return
        self._drop(client, announce=True)
        # Logged once the leave is announced: the log line is not on the clients' path.
        log.log(level, "%s %s", client.describe(), reason)

    def _drop(self, client: _Client, announce: bool) -> None:
        """Close a client, release its queue and table entry and (if ``announce``) queue the
        leave message to everyone else. The leave goes out first: closing the socket, its
        queue and its eventfds is not on the others' path."""
        if client.closed:
            return
        client.closed = True
        peer = client.peer
        self._clients.pop(peer, None)
        table = self._table
        fds: tuple[SharedFd, ...] = ()
        wire = self._wire
        if table is not None and peer in table:
            fds = table.remove(peer)
            self._counters.leaves += 1
            # No size check here: a leave sends no fd, and the membership table is written
            # with pwrite (or into a sealed region), which cannot fault on a shrunken region;
            # the timer restores the size within CHECK_INTERVAL (regionguard.py).
            if self._membership is not None:
                # Also at shutdown (announce=False): the table must not list peers of a
                # server that is gone.
                self._membership.left(peer)
            if wire is not None:
                if announce:
                    self._send_leave(wire, peer, fds)
                else:
                    wire.remove(peer)
            elif announce:
                # Where its whole join is still queued, the join and this leave cancel out.
                collapse = self._collapse_join
                self._dispatch(
                    [
                        (other.peer, peer, None)
                        for other in self._clients.values()
                        if not other.closed
                        and not (other.joins_queued and collapse(peer, fds, other))
                    ]
                )
        readers = self._readers
        if readers is not None:
            readers.discard(client.fd, client)  # before the close frees the number
        loop = self._loop
        if loop is not None and client.writing:
            loop.remove_writer(client.fd)
        client.writing = False
        client.sock.close()
        self._handshake_sent(client)  # it will not take the rest: its source may go on
        self._queued_total -= len(client.queue)
        client.queue.clear()
        while client.fds:
            holder = client.fds.popleft()
            if holder is not None:
                holder.release()
        for holder in fds:
            holder.release()
        self._restore_reserve()  # an fd was just freed
        if fds and announce:
            self._membership_changed(peer)
            self._notify_observers("on_leave", peer)

    def _notify_observers(self, method: str, peer: int) -> None:
        if not self.observers:
            return
        for observer in list(self.observers):
            try:
                getattr(observer, method)(self, peer)
            except Exception:
                log.exception("membership observer %r failed in %s(%d)", observer, method, peer)


def run(server: Server) -> None:
    """Run ``server`` on a new epoll-based event loop until it stops."""
    # asyncio's default on Linux is epoll already; being explicit documents that select()
    # (and its 1024-fd ceiling, which QEMU's server hits) is never used.
    loop = asyncio.SelectorEventLoop(selectors.EpollSelector())
    # A line per join and leave: skip what the server's log lines never show (the logging
    # HOWTO's "Optimization": caller lookup, thread and multiprocessing names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    try:
        loop.run_until_complete(server.serve())
    finally:
        loop.close()

"""The device process: one selector loop serving several VMs, one vfio-user socket each.

QEMU stalls the guest's vCPU, holding its big lock, until each BAR0 access is answered, and a
reply later than ``x-msg-timeout`` (5 s) kills the connection for good. So the loop never
blocks: every socket and eventfd is non-blocking (the server's eventfds, which every peer
holds and any peer can make blocking, are read with a read that ignores the shared
O_NONBLOCK: ivshmem._eventfd), the server is reconnected on a timer, a client that does not
read its replies is dropped once its backlog passes a limit, and each readiness event is
served in a bounded batch so one busy VM cannot starve the others.

Per VM (:class:`VmDevice`): a listening socket, at most one vfio-user connection (a second
client is turned away), the :class:`~ivshmem.device.model.IvshmemFunction`, and in doorbell
mode a :class:`~ivshmem.device.link.ServerLink` plus the eventfds on which the server's peers
ring this VM. VMs that are peers of the same server in this process ring each other directly:
a Doorbell write whose target is served here raises the target guest's interrupt without the
eventfd round trip through the kernel and this loop.
"""

from __future__ import annotations

import array
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import registers as reg
from .._eventfd import try_read
from .._scm import received_fds
from ..errors import UsageError
from ..memory import SharedMemory, is_power_of_two
from ..protocol import MAX_VECTORS
from . import vfio_user as vu
from .link import LinkEvents, ServerLink, ServerUnavailableError
from .model import DeviceOptions, IvshmemFunction

__all__ = ["DeviceServer", "VmDevice", "VmSpec"]

log = logging.getLogger("ivshmem.device")

#: A client whose unread replies exceed this is dropped (QEMU reads each reply at once).
MAX_BACKLOG = 1 << 20
#: Messages served per readiness event before other sockets get their turn.
BATCH = 64
RECONNECT_FIRST = 0.2
RECONNECT_MAX = 2.0
GREETING_TIMEOUT = 10.0
_ANC_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)

Callback = Callable[[int], None]


@dataclass(frozen=True)
class VmSpec:
    """One VM's device: its vfio-user socket and where BAR2 comes from.

    Doorbell mode: ``server`` (an ivshmem server's socket). Plain mode: ``region`` (a file
    path, or ``/NAME`` for a POSIX shm object) and/or ``size`` (a memfd when ``region`` is
    None)."""

    socket: str
    server: str | None = None
    region: str | None = None
    size: int | None = None
    vectors: int = 1
    intx: bool = False
    event_vector: int | None = None
    name: str | None = None


def _send_with_fds(conn: socket.socket, data: bytes, fds: tuple[int, ...]) -> int:
    """One non-blocking send of ``data``, with ``fds`` attached to its first byte."""
    if fds:
        return conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return conn.send(data)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VmDevice:
    """One VM: listener, vfio-user connection, function and (doorbell mode) server link."""

    def __init__(self, owner: DeviceServer, spec: VmSpec, index: int) -> None:
        self.owner = owner
        self.spec = spec
        self.name = spec.name or f"vm{index}"
        self.index = index
        self.link: ServerLink | None = None
        self.own_fds: dict[int, int] = {}  # eventfd -> own vector
        self.server_key = os.path.realpath(spec.server) if spec.server else None
        self.conn: socket.socket | None = None
        self.codec = vu.Connection()
        self.negotiated = False
        self.backlog: list[tuple[bytes, tuple[int, ...]]] = []
        self.backlog_bytes = 0
        self.reconnect_at: float | None = None
        self.reconnect_delay = RECONNECT_FIRST
        #: A reconnection whose server has not finished its greeting by then is dropped and
        #: retried (a server that accepts and stays silent must not hold the device forever).
        self.greeting_deadline: float | None = None
        self.greeting_timeout = GREETING_TIMEOUT
        self.region_identity: tuple[int, int, int] | None = None
        #: Doorbells to peers served by this process (straight to their guest) and through
        #: the server's eventfds.
        self.direct_rings = 0
        self.server_rings = 0
        options = DeviceOptions(
            vectors=spec.vectors,
            intx=spec.intx,
            event_vector=spec.event_vector,
            doorbell=spec.server is not None,
        )
        if spec.server is not None:
            fd, size = self._first_connection(spec.server)
        else:
            fd, size = self._plain_region(spec)
        try:
            if not is_power_of_two(size):
                raise UsageError(
                    f"{self.name}: the shared memory is {size} bytes; a PCI BAR must be a power "
                    "of two (give the server or --size a power of two, e.g. 4M)"
                )
            st = os.fstat(fd)
            self.region_identity = (st.st_dev, st.st_ino, size)
            self.function = IvshmemFunction(self.name, options, fd, size)
        except BaseException:
            self._close_link()
            raise
        finally:
            os.close(fd)
        self.function.ring = self._ring
        if self.link is not None:
            self.function.peer_id = self.link.peer_id or 0
            self.function.peers = sorted(self.link.peers)
            self.link.events = self._link_events()
        try:
            self.listener = self._listen(spec.socket)
        except BaseException:
            self._close_link()
            self.function.close()
            raise

    # -- setup -----------------------------------------------------------------------------

    def _first_connection(self, server: str) -> tuple[int, int]:
        shm: list[int] = []
        own: list[tuple[int, int]] = []
        events = LinkEvents(
            shared_memory=shm.append, own_vector=lambda vector, fd: own.append((vector, fd))
        )
        link = ServerLink(server, max_vectors=MAX_VECTORS)
        link.events = events
        try:
            link.connect()
            link.wait_ready(10.0)
        except (ServerUnavailableError, OSError) as err:
            link.close()
            _close(shm + [fd for _v, fd in own])
            raise UsageError(
                f"{self.name}: {err.strerror or err}: is ivshmem-server running?"
            ) from err
        self.link = link
        for vector, fd in own:
            self.own_fds[fd] = vector
        if len(shm) != 1:  # pragma: no cover - ClientState guarantees exactly one
            raise UsageError(f"{self.name}: the server sent no shared memory")
        return shm[0], os.fstat(shm[0]).st_size

    def _plain_region(self, spec: VmSpec) -> tuple[int, int]:
        if spec.region is None:
            if spec.size is None:
                raise UsageError(f"{self.name}: plain mode needs --region and/or --size")
            memory = SharedMemory.memfd(spec.size, f"ivshmem-{self.name}")
        elif spec.region.startswith("/") and spec.region.count("/") == 1:
            if os.path.exists(spec.region):
                memory = SharedMemory.file(spec.region, spec.size)
            else:
                memory = SharedMemory.posix(spec.region[1:], spec.size)
        else:
            memory = SharedMemory.file(spec.region, spec.size)
        fd = os.dup(memory.fd)
        size = memory.size
        memory.close()
        return fd, size

    def _listen(self, path: str) -> socket.socket:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise UsageError(f"{self.name}: {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket of a dead device process
            else:
                raise UsageError(f"{self.name}: {path} is in use by a running process")
            finally:
                probe.close()
        # Bound and listening under a temporary name, then renamed: whoever sees the socket
        # (QEMU, a script waiting for it) can connect at once.
        staging = os.path.join(os.path.dirname(path), f".ivd-{os.getpid()}-{self.index}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(staging)
            sock.listen(4)
            os.rename(staging, path)
        except OSError as err:
            sock.close()
            try:
                os.unlink(staging)
            except OSError:
                pass
            raise UsageError(f"{self.name}: cannot listen on {path}: {err.strerror}") from err
        sock.setblocking(False)
        return sock

    def _link_events(self) -> LinkEvents:
        return LinkEvents(
            welcome=self._welcome,
            shared_memory=self._reconnected_memory,
            own_vector=self._own_vector,
            joined=self._joined,
            left=self._left,
            lost=self._lost,
        )

    # -- the server side -------------------------------------------------------------------

    def _welcome(self, peer_id: int) -> None:
        self.function.peer_id = peer_id

    def _reconnected_memory(self, fd: int) -> None:
        # QEMU mapped the first region's fd and never maps another: BAR2 stays what it was.
        # With a named region the restarted server shares the same object, so all is well; a
        # memfd server starts over with new memory that this guest can never see.
        try:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino, st.st_size)
        finally:
            os.close(fd)
        if identity != self.region_identity:
            log.warning(
                "%s: the restarted server shares different memory (a memfd server?); the "
                "guest keeps the old region, which is no longer shared",
                self.name,
            )
            self.function.events |= reg.EVENT_REGION_CHANGED

    def _own_vector(self, vector: int, fd: int) -> None:
        first = not self.own_fds
        self.own_fds[fd] = vector
        self.owner.watch(fd, self._own_ring)
        if first and self.function.server_state == reg.SERVER_RECONNECTING:
            self.greeting_deadline = None
            self.function.server_state = reg.SERVER_CONNECTED
            self.function.peers = sorted(self.link.peers) if self.link else []
            self.owner.register_peer(self)
            self.reconnect_delay = RECONNECT_FIRST
            log.info("%s: reconnected to the server as peer %d", self.name, self.function.peer_id)
            self.function.membership_event(reg.EVENT_RECONNECTED)

    def _own_ring(self, fd: int) -> None:
        # Every peer of the server holds this eventfd too, and any of them can clear its
        # O_NONBLOCK and take the count between the selector's wake-up and this read: a plain
        # read would then stop the whole loop (and the guest with it). try_read never blocks.
        try:
            if not try_read(fd):
                return
        except OSError:
            return
        self.function.raise_vector(self.own_fds.get(fd, -1))

    def _joined(self, peer: int) -> None:
        assert self.link is not None
        self.function.peers = sorted(self.link.peers)
        log.info("%s: peer %d joined", self.name, peer)
        self.function.membership_event(reg.EVENT_JOINED)

    def _left(self, peer: int) -> None:
        assert self.link is not None
        self.function.peers = sorted(self.link.peers)
        log.info("%s: peer %d left", self.name, peer)
        self.function.membership_event(reg.EVENT_LEFT)

    def _lost(self, why: str) -> None:
        if self.link is not None and self.link.sock is not None:
            self.owner.unwatch(self.link.sock.fileno())  # before the link closes it
        self.greeting_deadline = None
        self._drop_own_fds()
        if self.function.server_state == reg.SERVER_CONNECTED:
            log.warning("%s: lost the ivshmem server (%s); reconnecting", self.name, why)
            self.owner.unregister_peer(self)
            self.function.peers = []
            self.function.server_state = reg.SERVER_RECONNECTING
            self.function.membership_event(reg.EVENT_SERVER_LOST)
        else:  # a reconnection attempt failed: no news for the guest, just try again later
            log.info("%s: reconnection failed (%s)", self.name, why)
            self.reconnect_delay = min(self.reconnect_delay * 2, RECONNECT_MAX)
        self.reconnect_at = time.monotonic() + self.reconnect_delay

    def _drop_own_fds(self) -> None:
        for fd in self.own_fds:
            self.owner.unwatch(fd)
            os.close(fd)
        self.own_fds.clear()

    def try_reconnect(self) -> None:
        assert self.link is not None
        self.reconnect_at = None
        try:
            self.link.connect()
        except ServerUnavailableError:
            self.reconnect_delay = min(self.reconnect_delay * 2, RECONNECT_MAX)
            self.reconnect_at = time.monotonic() + self.reconnect_delay
            return
        assert self.link.sock is not None
        self.greeting_deadline = time.monotonic() + self.greeting_timeout
        self.owner.watch(self.link.sock.fileno(), self._server_readable)

    def check_greeting(self, now: float) -> None:
        if self.greeting_deadline is not None and self.greeting_deadline <= now:
            assert self.link is not None
            self.link.abort(f"no greeting within {self.greeting_timeout:g} s")

    def _server_readable(self, fd: int) -> None:
        assert self.link is not None
        self.link.read_ready()  # on a loss, _lost unwatches the socket before it is closed

    def start_watching(self) -> None:
        self.owner.watch(self.listener.fileno(), self._accept)
        if self.link is not None and self.link.sock is not None:
            self.owner.watch(self.link.sock.fileno(), self._server_readable)
            for fd in self.own_fds:
                self.owner.watch(fd, self._own_ring)
            self.owner.register_peer(self)

    # -- doorbells -------------------------------------------------------------------------

    def _ring(self, peer: int, vector: int) -> None:
        link = self.link
        if link is None or self.function.server_state != reg.SERVER_CONNECTED:
            return
        if peer == self.function.peer_id:
            if vector < len(self.own_fds):
                self.function.raise_vector(vector)
            return
        local = self.owner.local_peer(self.server_key, peer)
        if local is not None:
            fds = link.peers.get(peer)
            if fds is not None and vector < len(fds):
                self.direct_rings += 1
                local.function.raise_vector(vector)
            return
        if link.ring(peer, vector):
            self.server_rings += 1

    # -- the vfio-user side ----------------------------------------------------------------

    def _accept(self, _fd: int) -> None:
        try:
            conn, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("%s: accept failed: %s", self.name, err.strerror)
            return
        if self.conn is not None:
            log.warning("%s: a second vfio-user client was turned away", self.name)
            conn.close()
            return
        conn.setblocking(False)
        self.conn = conn
        self.codec = vu.Connection()
        self.negotiated = False
        log.info("%s: vfio-user client connected", self.name)
        self.owner.watch(conn.fileno(), self._readable)

    def _readable(self, _fd: int) -> None:
        conn = self.conn
        if conn is None:
            return
        for _ in range(BATCH):
            try:
                data, ancdata, flags, _addr = conn.recvmsg(self.codec.wanted(), _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.close_connection(f"read failed: {err.strerror}")
                return
            fds = received_fds(ancdata)
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                self.close_connection(f"more than {vu.MAX_FDS} fds in one message")
                return
            if not data:
                _close(fds)
                self.close_connection("the client closed the connection")
                return
            try:
                request = self.codec.feed(data, fds)
            except vu.VfioUserError as err:
                self.close_connection(f"protocol error: {err}")
                return
            if request is None:
                continue
            if not self.negotiated:
                if not isinstance(request, vu.Version):
                    if isinstance(request, vu.SetIrqs):
                        _close(request.fds)
                    self.close_connection("the first message was not VERSION")
                    return
                self.negotiated = True
            try:
                payload, reply_fds = self.function.handle(request)
            except Exception:  # a bug must cost this one connection, not the process
                log.exception("%s: failed to handle %r", self.name, request)
                self.close_connection("internal error")
                return
            if payload is not None and not self.codec.last_no_reply:
                self._send(payload, reply_fds)
                # QEMU waits for this reply before it sends anything else: the next read would
                # almost always find nothing. The selector (level-triggered) calls us again if
                # there is more.
                return
            if self.conn is None:
                return

    def _send(self, data: bytes, fds: tuple[int, ...]) -> None:
        conn = self.conn
        assert conn is not None
        if self.backlog:
            self._queue(data, fds)
            return
        try:
            sent = _send_with_fds(conn, data, fds)
        except (BlockingIOError, InterruptedError):
            self._queue(data, fds)
            return
        except OSError as err:
            self.close_connection(f"write failed: {err.strerror}")
            return
        if sent < len(data):
            self._queue(data[sent:], ())

    def _queue(self, data: bytes, fds: tuple[int, ...]) -> None:
        assert self.conn is not None
        self.backlog.append((data, fds))
        self.backlog_bytes += len(data)
        if self.backlog_bytes > MAX_BACKLOG:
            self.close_connection("the client does not read its replies")
            return
        self.owner.watch(self.conn.fileno(), self._readable, self._writable)

    def _writable(self, _fd: int) -> None:
        conn = self.conn
        while conn is not None and self.backlog:
            data, fds = self.backlog[0]
            try:
                sent = _send_with_fds(conn, data, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.close_connection(f"write failed: {err.strerror}")
                return
            self.backlog_bytes -= sent
            if sent < len(data):
                self.backlog[0] = (data[sent:], ())
                return
            self.backlog.pop(0)
        if conn is not None:
            self.owner.watch(conn.fileno(), self._readable)

    def close_connection(self, why: str) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        log.info(
            "%s: vfio-user connection closed: %s (doorbells so far: %d direct, %d through the "
            "server)",
            self.name,
            why,
            self.direct_rings,
            self.server_rings,
        )
        self.owner.unwatch(conn.fileno())
        conn.close()
        self.codec.close()
        self.backlog.clear()
        self.backlog_bytes = 0
        self.function.disconnect()

    # -- teardown --------------------------------------------------------------------------

    def _close_link(self) -> None:
        if self.link is not None:
            if self.link.sock is not None:
                self.owner.unwatch(self.link.sock.fileno())
            self.link.close()
        for fd in list(self.own_fds):
            self.owner.unwatch(fd)
            os.close(fd)
        self.own_fds.clear()

    def close(self) -> None:
        self.close_connection("the device is shutting down")
        self.owner.unregister_peer(self)
        self._close_link()
        if self.listener.fileno() >= 0:
            self.owner.unwatch(self.listener.fileno())
            self.listener.close()
            try:
                os.unlink(self.spec.socket)
            except OSError:
                pass
        self.function.close()


class DeviceServer:
    """Serves every VM of ``specs`` from one loop. Use as a context manager; :meth:`run`
    serves until :meth:`stop` (thread-safe) or a signal's exception."""

    def __init__(self, specs: Sequence[VmSpec]) -> None:
        if not specs:
            raise UsageError("no VM to serve: give at least one --socket")
        sockets = [os.path.abspath(s.socket) for s in specs]
        if len(set(sockets)) != len(sockets):
            raise UsageError("two VMs were given the same vfio-user socket")
        self._selector = selectors.DefaultSelector()
        self._callbacks: dict[int, tuple[Callback, Callback | None]] = {}
        self._peers: dict[tuple[str, int], VmDevice] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self.vms: list[VmDevice] = []
        try:
            for index, spec in enumerate(specs):
                self.vms.append(VmDevice(self, spec, index))
            self.watch(self._wake_r, self._woken)
            for vm in self.vms:
                vm.start_watching()
        except BaseException:
            self.close()
            raise

    # -- registry of local peers (guest-to-guest doorbells without the server) -------------

    def register_peer(self, vm: VmDevice) -> None:
        if vm.server_key is not None:
            self._peers[(vm.server_key, vm.function.peer_id)] = vm

    def unregister_peer(self, vm: VmDevice) -> None:
        if vm.server_key is not None:
            key = (vm.server_key, vm.function.peer_id)
            if self._peers.get(key) is vm:
                del self._peers[key]

    def local_peer(self, server_key: str | None, peer: int) -> VmDevice | None:
        if server_key is None:
            return None
        return self._peers.get((server_key, peer))

    # -- the selector ----------------------------------------------------------------------

    def watch(self, fd: int, on_read: Callback, on_write: Callback | None = None) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if on_write else 0)
        self._callbacks[fd] = (on_read, on_write)
        try:
            self._selector.modify(fd, mask)
        except KeyError:
            self._selector.register(fd, mask)

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _woken(self, fd: int) -> None:
        try:
            os.read(fd, 512)
        except BlockingIOError:
            pass

    def stop(self) -> None:
        """Make :meth:`run` return (from any thread or a signal handler)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def run_once(self, timeout: float | None) -> None:
        now = time.monotonic()
        due = [t for vm in self.vms for t in (vm.reconnect_at, vm.greeting_deadline) if t]
        if due:
            wait = max(0.0, min(due) - now)
            timeout = wait if timeout is None else min(timeout, wait)
        for key, mask in self._selector.select(timeout):
            callbacks = self._callbacks.get(key.fd)
            if callbacks is None:
                continue
            on_read, on_write = callbacks
            try:
                if mask & selectors.EVENT_WRITE and on_write is not None:
                    on_write(key.fd)
                if mask & selectors.EVENT_READ and key.fd in self._callbacks:
                    on_read(key.fd)
            except Exception:  # a bug must not take every VM of the process down with it
                log.exception("unexpected error serving fd %d; carrying on", key.fd)
        now = time.monotonic()
        for vm in self.vms:
            vm.check_greeting(now)
            if vm.reconnect_at is not None and vm.reconnect_at <= now:
                vm.try_reconnect()

    def run(self) -> None:
        for vm in self.vms:
            log.info(
                "%s: serving %s (%s, BAR2 %d bytes, peer %d)",
                vm.name,
                vm.spec.socket,
                f"server {vm.spec.server}" if vm.spec.server else "plain",
                vm.function.region_size,
                vm.function.peer_id,
            )
        while not self._stopping:
            self.run_once(None)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self.vms.clear()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> DeviceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

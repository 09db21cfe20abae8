"""The endpoint contract shared by host peers, guest devices and plain regions.

An application written against :class:`Endpoint` runs unchanged as a host process (connected
to a server with :func:`ivshmem.connect`), inside a VM (:func:`ivshmem.open_pci`), or on a plain
region with no doorbell (:func:`ivshmem.open_region`).

Doorbells are counted events: ringing vector ``v`` of a peer adds 1 to an eventfd of that
peer; :meth:`Endpoint.wait` consumes the count of one vector and returns its number. Rings that
arrive while nobody waits are not lost, but several rings may be reported as one.
"""

from __future__ import annotations

import abc
import asyncio
import os
import select
import time
from collections.abc import Sequence
from typing import Any

from .errors import (
    ClosedError,
    DoorbellUnavailableError,
    UnknownVectorError,
)
from .memory import Mapping, SharedMemory

__all__ = ["Endpoint", "EventfdEndpoint", "RegionEndpoint", "open_region"]


class Endpoint(abc.ABC):
    """One participant in an ivshmem system: shared memory plus doorbells."""

    # -- identity and memory -----------------------------------------------------------

    @property
    @abc.abstractmethod
    def id(self) -> int:
        """This endpoint's peer id (0..65535)."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size of the shared region in bytes."""

    @property
    @abc.abstractmethod
    def memory(self) -> memoryview:
        """A writable memoryview over the whole shared region."""

    @property
    @abc.abstractmethod
    def vectors(self) -> int:
        """How many doorbell vectors this endpoint receives on (0 for a plain region)."""

    @property
    @abc.abstractmethod
    def peers(self) -> frozenset[int]:
        """Ids of the other peers currently connected (raises PeersUnknownError where this
        cannot be known)."""

    # -- doorbells ------------------------------------------------------------------------

    @abc.abstractmethod
    def notify(self, peer: int, vector: int = 0) -> None:
        """Ring vector ``vector`` of peer ``peer``."""

    @abc.abstractmethod
    def wait(self, vector: int | None = None, timeout: float | None = None) -> int | None:
        """Block until one of this endpoint's vectors (or the given one) is rung.

        Returns the vector number, or None when ``timeout`` seconds passed first.
        """

    @abc.abstractmethod
    def fileno(self, vector: int = 0) -> int:
        """An fd that becomes readable when ``vector`` is rung (for selectors/event loops).
        Read it with :meth:`wait` (or ``os.eventfd_read``), not by hand, to keep counts right."""

    @property
    def vector_fds(self) -> tuple[int, ...]:
        """One fd per own vector, in vector order."""
        return tuple(self.fileno(v) for v in range(self.vectors))

    async def wait_async(
        self, vector: int | None = None, timeout: float | None = None
    ) -> int | None:
        """Asyncio variant of :meth:`wait`."""
        raise DoorbellUnavailableError(f"{self!r} has no doorbell to wait on")

    # -- lifecycle -----------------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Release every fd and mapping. Idempotent."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    def numpy(self, dtype: Any = "u1", offset: int = 0, count: int = -1) -> Any:
        """A numpy array over the region (no copy). Needs numpy."""
        try:
            import numpy as np
        except ImportError as err:  # pragma: no cover - depends on the environment
            from .errors import UsageError

            raise UsageError("numpy is not installed: pip install 'ivshmem[numpy]'") from err
        return np.frombuffer(self.memory, dtype=dtype, count=count, offset=offset)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventfdEndpoint(Endpoint):
    """Shared machinery for endpoints whose own vectors are eventfds (host peer, VFIO guest).

    Subclasses provide ``_own_fds()`` and may override ``_service(timeout)`` to handle other
    fds (a server socket) while waiting: ``_extra_fds()`` are polled too and ``_on_extra``
    is called when one becomes readable.
    """

    @abc.abstractmethod
    def _own_fds(self) -> Sequence[int]: ...

    def _extra_fds(self) -> Sequence[int]:
        return ()

    def _on_extra(self, fd: int) -> None:  # pragma: no cover - default does nothing
        pass

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.vectors:
            raise UnknownVectorError(vector, self.vectors)

    def fileno(self, vector: int = 0) -> int:
        self._check_open()
        self._check_vector(vector)
        return self._own_fds()[vector]

    def _candidates(self, vector: int | None) -> list[tuple[int, int]]:
        self._check_open()
        fds = self._own_fds()
        if not fds:
            raise DoorbellUnavailableError(f"{self!r} has no vectors to wait on")
        if vector is None:
            return list(enumerate(fds))
        self._check_vector(vector)
        return [(vector, fds[vector])]

    @staticmethod
    def _consume(fd: int) -> bool:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        return True

    def wait(self, vector: int | None = None, timeout: float | None = None) -> int | None:
        candidates = self._candidates(vector)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        poller = select.poll()
        by_fd = {}
        for v, fd in candidates:
            poller.register(fd, select.POLLIN)
            by_fd[fd] = v
        extras = set(self._extra_fds())
        for fd in extras:
            poller.register(fd, select.POLLIN)
        while True:
            if deadline is None:
                ms = None
            else:
                ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            events = poller.poll(ms)
            for fd, _ in events:
                if fd in extras:
                    self._on_extra(fd)
                    self._check_open()
            for v, fd in sorted((by_fd[fd], fd) for fd, _ in events if fd in by_fd):
                if self._consume(fd):
                    return v
            if deadline is not None and time.monotonic() >= deadline:
                return None

    async def wait_async(
        self, vector: int | None = None, timeout: float | None = None
    ) -> int | None:
        candidates = self._candidates(vector)
        # Fast path: something already pending.
        for v, fd in candidates:
            if _readable(fd) and self._consume(fd):
                return v
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        registered: list[int] = []

        def on_ready(v: int, fd: int) -> None:
            if not fut.done() and self._consume(fd):
                fut.set_result(v)

        def on_extra(fd: int) -> None:
            try:
                self._on_extra(fd)
                self._check_open()
            except BaseException as exc:  # surfaced to the awaiting task
                if not fut.done():
                    fut.set_exception(exc)

        try:
            for v, fd in candidates:
                loop.add_reader(fd, on_ready, v, fd)
                registered.append(fd)
            for fd in self._extra_fds():
                loop.add_reader(fd, on_extra, fd)
                registered.append(fd)
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                return None
        finally:
            for fd in registered:
                loop.remove_reader(fd)


def _readable(fd: int) -> bool:
    p = select.poll()  # poll, not select(): fds above 1023 are normal for a busy process
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class RegionEndpoint(Endpoint):
    """A plain shared region: memory, no server, no doorbell.

    ``id`` is whatever the application chooses (default 0), so that layers above can tell
    the users of one plain region apart.
    """

    def __init__(self, shm: SharedMemory, id: int = 0) -> None:
        if not 0 <= id <= 0xFFFF:
            shm.close()
            from .errors import UsageError

            raise UsageError(f"peer id {id} is out of range 0..65535")
        self._shm = shm
        try:
            self._mapping: Mapping = shm.map()
        except BaseException:
            shm.close()
            raise
        self._id = id

    @property
    def id(self) -> int:
        return self._id

    @property
    def size(self) -> int:
        return self._mapping.size

    @property
    def memory(self) -> memoryview:
        return self._mapping.memory

    @property
    def vectors(self) -> int:
        return 0

    @property
    def peers(self) -> frozenset[int]:
        from .errors import PeersUnknownError

        raise PeersUnknownError(
            "a plain region has no server, so its peers cannot be known: use a doorbell "
            "server, or a formatted region's membership table"
        )

    def _no_doorbell(self) -> DoorbellUnavailableError:
        return DoorbellUnavailableError(
            f"{self!r} is a plain region with no doorbell: connect to an ivshmem server "
            "(ivshmem.connect) or use an ivshmem-doorbell device to ring and wait"
        )

    def notify(self, peer: int, vector: int = 0) -> None:
        raise self._no_doorbell()

    def wait(self, vector: int | None = None, timeout: float | None = None) -> int | None:
        raise self._no_doorbell()

    async def wait_async(
        self, vector: int | None = None, timeout: float | None = None
    ) -> int | None:
        raise self._no_doorbell()

    def fileno(self, vector: int = 0) -> int:
        raise self._no_doorbell()

    @property
    def vector_fds(self) -> tuple[int, ...]:
        return ()

    @property
    def closed(self) -> bool:
        return self._mapping.closed

    def close(self) -> None:
        self._mapping.close()
        self._shm.close()

    def __repr__(self) -> str:
        return f"<RegionEndpoint id={self._id} {self._shm!r}>"


def open_region(
    source: str | int | SharedMemory, id: int = 0, size: int | str | None = None
) -> RegionEndpoint:
    """A plain-region endpoint over a file path, a POSIX shm name (``shm:NAME``), an fd
    (duplicated; the caller keeps its own) or a :class:`SharedMemory` (taken over)."""
    from .memory import parse_size

    nbytes = None if size is None else parse_size(size)
    if isinstance(source, SharedMemory):
        shm = source
    elif isinstance(source, int):
        shm = SharedMemory.adopt(os.dup(source), "fd")
    elif source.startswith("shm:"):
        shm = SharedMemory.posix(source[4:], nbytes)
    else:
        shm = SharedMemory.file(source, nbytes)
    return RegionEndpoint(shm, id)

"""The endpoint contract shared by host peers, guest devices and plain regions.

An application written against :class:`Endpoint` runs unchanged as a host process (connected
to a server with :func:`ivshmem.connect`), inside a VM (:func:`ivshmem.open_pci`), or on a plain
region with no doorbell (:func:`ivshmem.open_region`).

Doorbells are counted events: ringing vector ``v`` of a peer adds 1 to an eventfd of that
peer; :meth:`Endpoint.wait` consumes the count of one vector and returns its number. Rings that
arrive while nobody waits are not lost, but several rings may be reported as one.

Waiting spins first, then blocks: for ``spin`` seconds (default :data:`DEFAULT_SPIN`, 50 µs;
per endpoint in ``endpoint.spin`` or per call) ``wait`` keeps trying a non-blocking read of the
eventfds, and only then sleeps in ``poll()``. A ring that comes back within
the budget (a request/response partner on another core) is taken without the kernel putting the
waiter to sleep and waking it, which on a busy machine costs tens of microseconds; a ring that
comes later costs at most ``spin`` of one core's time. ``spin=0`` blocks at once.
"""

from __future__ import annotations

import abc
import asyncio
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._args import int_arg, peer_arg, seconds_arg, timeout_arg
from ._eventfd import try_read
from .errors import (
    ClosedError,
    DoorbellUnavailableError,
    UnknownVectorError,
    UsageError,
)
from .memory import Mapping, SharedMemory

__all__ = ["DEFAULT_SPIN", "Endpoint", "EventfdEndpoint", "RegionEndpoint", "open_region"]

#: Seconds :meth:`Endpoint.wait` spins (non-blocking reads) before it blocks.
DEFAULT_SPIN = 50e-6

#: poll() takes its timeout in milliseconds as a C int: longer waits are made of several.
MAX_POLL_MS = 2**31 - 1
#: The argument types a wait's hot path takes as they are; anything else is checked (and
#: normalised, or refused) by the argument rule first (see ivshmem._args). type(True) is bool,
#: so bools are never among them.
NUMBER_TYPES = frozenset({int, float})
VECTOR_TYPES = frozenset({int, type(None)})
_INF = float("inf")

_E = TypeVar("_E", bound="Endpoint")


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

    #: Default spin budget of :meth:`wait`, in seconds (see the module docstring).
    spin: float = DEFAULT_SPIN

    @abc.abstractmethod
    def wait(
        self, vector: int | None = None, timeout: float | None = None, *, spin: float | None = None
    ) -> int | None:
        """Block until one of this endpoint's vectors (or the given one) is rung.

        Returns the vector number, or None when ``timeout`` seconds passed first. ``spin``
        overrides :attr:`spin` (seconds of non-blocking tries before sleeping).
        """

    @abc.abstractmethod
    def fileno(self, vector: int = 0) -> int:
        """An fd that becomes readable when ``vector`` is rung (for selectors/event loops).
        Read it with :meth:`wait`, not by hand, to keep counts right: a plain ``read`` (or
        ``os.eventfd_read``) blocks if another peer cleared O_NONBLOCK on the shared fd, and
        the count a poll reported may be gone by then (see :mod:`ivshmem._eventfd`)."""

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
            raise UsageError("numpy is not installed: pip install 'ivshmem[numpy]'") from err
        offset = int_arg(offset, "offset")
        count = int_arg(count, "count")
        try:
            dtype = np.dtype(dtype)
        except (TypeError, ValueError) as err:
            raise UsageError(f"dtype {dtype!r} is not a numpy dtype: {err}") from None
        memory = self.memory
        if not 0 <= offset <= len(memory) or count < -1:
            raise UsageError(
                f"offset {offset} must be within 0..{len(memory)} and count {count} >= -1 "
                "(-1: as many as fit)"
            )
        try:
            return np.frombuffer(memory, dtype=dtype, count=count, offset=offset)
        except (ValueError, OverflowError) as err:  # count or the dtype does not fit what is left
            raise UsageError(
                f"numpy(dtype={dtype}, offset={offset}, count={count}): {err}"
            ) from None

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: A spinner: given a budget in seconds, returns the vector whose count it consumed, or None.
Spinner = Callable[[float], "int | None"]
# A cached poll set: its bound poll() method, {eventfd: vector}, the extra fds, a spinner.
_PollSet = tuple[Callable[..., list[tuple[int, int]]], dict[int, int], frozenset[int], Spinner]


class EventfdEndpoint(Endpoint):
    """Shared machinery for endpoints whose own vectors are eventfds (host peer, VFIO guest).

    Subclasses provide ``_own_fds()`` and may override ``_service(timeout)`` to handle other
    fds (a server socket) while waiting: ``_extra_fds()`` are polled too and ``_on_extra``
    is called when one becomes readable. They must call :meth:`_fds_changed` before closing or
    replacing any of these fds: :meth:`wait` trusts a cached poll set without further checks.
    """

    # Per instance once used (subclasses need not call an __init__ of ours): vector -> set.
    _poll_sets: dict[int | None, _PollSet] | None = None

    @abc.abstractmethod
    def _own_fds(self) -> Sequence[int]: ...

    def _extra_fds(self) -> Sequence[int]:
        return ()

    def _on_extra(self, fd: int) -> None:  # pragma: no cover - default does nothing
        pass

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _check_vector(self, vector: object) -> int:
        v = int_arg(vector, "vector")
        if not 0 <= v < self.vectors:
            raise UnknownVectorError(v, self.vectors)
        return v

    def fileno(self, vector: int = 0) -> int:
        self._check_open()
        return self._own_fds()[self._check_vector(vector)]

    def _candidates(self, vector: int | None) -> list[tuple[int, int]]:
        self._check_open()
        fds = self._own_fds()
        if not fds:
            raise DoorbellUnavailableError(f"{self!r} has no vectors to wait on")
        if vector is None:
            return list(enumerate(fds))
        vector = self._check_vector(vector)
        return [(vector, fds[vector])]

    #: Take an eventfd's count (True) or find none (False). Never blocks, even when another
    #: holder of the fd cleared O_NONBLOCK and took the count poll() reported (see
    #: ivshmem._eventfd): every read of our doorbells goes through it.
    _consume = staticmethod(try_read)

    def _poll_set(self, vector: int | None) -> _PollSet:
        """A poll set of the wanted vector fds and the extra fds, cached per ``vector``:
        building one costs more than the doorbell itself. Call :meth:`_fds_changed` whenever
        the fds change (a closed and reused fd number must never stay registered)."""
        cache = self._poll_sets
        if cache is None:
            cache = self._poll_sets = {}
        cached = cache.get(vector)
        if cached is None:
            wanted = {fd: v for v, fd in self._candidates(vector)}
            extras = frozenset(self._extra_fds())
            poller = select.poll()  # poll, not select(): fds above 1023 are normal
            for fd in (*wanted, *extras):
                poller.register(fd, select.POLLIN)
            cached = cache[vector] = (poller.poll, wanted, extras, make_spinner(wanted))
        return cached

    def _fds_changed(self) -> None:
        """Forget cached poll sets and wake every async waiter, so they start over."""
        self._poll_sets = {}
        watches = self.__dict__.get("_async_watches", {})
        self.__dict__["_async_watches"] = {}
        for fd, (loop, futures) in watches.items():
            loop.remove_reader(fd)
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    def wait(
        self, vector: int | None = None, timeout: float | None = None, *, spin: float | None = None
    ) -> int | None:
        # The doorbell hot path: a cached poll set (its existence says the endpoint is open:
        # close() drops them first), the spin, one poll(), one read. Anything else (an extra
        # fd readable, several vectors ready, no cached set yet) takes the full loop.
        sets = self._poll_sets
        # type() first: True and 1.0 would find vector 1's set, and a list is unhashable.
        cached = None if sets is None or type(vector) not in VECTOR_TYPES else sets.get(vector)
        if (
            cached is None
            or not (timeout is None or (type(timeout) in NUMBER_TYPES and 0 <= timeout < _INF))
            or not (spin is None or (type(spin) in NUMBER_TYPES and 0 <= spin < _INF))
        ):
            return self._wait_slow(vector, timeout, spin)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        budget = self.spin if spin is None else spin
        if budget > 0 and timeout != 0:
            found = cached[3](budget if timeout is None or budget < timeout else timeout)
            if found is not None:
                return found
        ms = -1 if deadline is None else _ms_until(deadline)
        try:
            events = cached[0](ms)
        except RuntimeError:  # another thread polls this cached set
            return self._wait_slow(vector, None if deadline is None else _left(deadline), 0)
        if not events:
            return None  # timed out (poll() itself retries after EINTR)
        if len(events) == 1:
            fd = events[0][0]
            found = cached[1].get(fd)
            if found is not None and self._consume(fd):
                return found
        return self._wait_slow(vector, None if deadline is None else _left(deadline), 0)

    def _wait_slow(self, vector: object, timeout: object, spin: object) -> int | None:
        # The argument rule (ivshmem._args) for whatever the hot path did not take.
        vector = None if vector is None else int_arg(vector, "vector")
        timeout = timeout_arg(timeout)
        spin = None if spin is None else seconds_arg(spin, "spin", finite=True)
        self._check_open()
        budget = self.spin if spin is None else spin
        if budget > 0 and timeout != 0:
            found = self._poll_set(vector)[3](budget if timeout is None else min(budget, timeout))
            if found is not None:
                return found
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            poll, wanted, extras, _ = self._poll_set(vector)
            ms = -1 if deadline is None else _ms_until(deadline)
            try:
                events = poll(ms)
            except RuntimeError:  # another thread polls this cached set: use a fresh one
                if self._poll_sets is not None:
                    self._poll_sets.pop(vector, None)
                continue
            for fd, _ in events:
                if fd in extras:
                    self._on_extra(fd)
                    self._check_open()
            ready = sorted((wanted[fd], fd) for fd, _ in events if fd in wanted)
            for v, fd in ready:
                if self._consume(fd):
                    return v
            if deadline is not None and time.monotonic() >= deadline:
                return None

    async def wait_async(
        self, vector: int | None = None, timeout: float | None = None
    ) -> int | None:
        vector = None if vector is None else int_arg(vector, "vector")
        timeout = timeout_arg(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            found = self.wait(vector, 0)  # consumes anything pending, serves the extra fds
            if found is not None:
                return found
            _, wanted, extras, _ = self._poll_set(vector)
            if not await self._await_readable(loop, (*wanted, *extras), deadline):
                return None

    async def _await_readable(
        self, loop: asyncio.AbstractEventLoop, fds: Sequence[int], deadline: float | None
    ) -> bool:
        """Wait until one of ``fds`` is readable (True) or ``deadline`` passes (False)."""
        fut: asyncio.Future[None] = loop.create_future()
        watched: list[int] = []
        try:
            for fd in fds:
                self._watch(loop, fd, fut)
                watched.append(fd)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                return False
            return True
        finally:
            for fd in watched:
                self._unwatch(fd, fut)

    # One add_reader per fd, shared by every coroutine waiting on it: two add_reader calls on
    # one fd replace each other, and the first waiter to finish would remove the other's.

    def _watch(self, loop: asyncio.AbstractEventLoop, fd: int, fut: asyncio.Future[None]) -> None:
        watches = self.__dict__.setdefault("_async_watches", {})
        entry = watches.get(fd)
        if entry is None:
            loop.add_reader(fd, self._wake, fd)
            entry = watches[fd] = (loop, set())
        elif entry[0] is not loop:
            raise UsageError(f"wait_async() on {self!r} from two event loops at once")
        entry[1].add(fut)

    def _unwatch(self, fd: int, fut: asyncio.Future[None]) -> None:
        watches = self.__dict__.get("_async_watches", {})
        entry = watches.get(fd)
        if entry is None:
            return  # dropped already (the fds changed)
        entry[1].discard(fut)
        if not entry[1]:
            del watches[fd]
            entry[0].remove_reader(fd)

    def _wake(self, fd: int) -> None:
        entry = self.__dict__.get("_async_watches", {}).get(fd)
        for fut in entry[1] if entry is not None else ():
            if not fut.done():
                fut.set_result(None)


def poll_ms(seconds: float) -> int:
    """poll()'s timeout for a wait of ``seconds`` (finite): whole milliseconds, rounded up
    (never down to 0, which would make a short wait spin, nor to -1, which blocks), at most
    MAX_POLL_MS. Clamped before the conversion: a huge finite timeout times 1000 is inf,
    which int() refuses."""
    return max(0, int(min(seconds * 1000 + 0.999, MAX_POLL_MS)))


def _ms_until(deadline: float) -> int:
    """poll()'s timeout for ``deadline`` (time.monotonic() seconds): see :func:`poll_ms`."""
    return poll_ms(deadline - time.monotonic())


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def make_spinner(wanted: dict[int, int]) -> Spinner:
    """A spinner over the eventfds in ``wanted`` (fd -> vector): called with a budget in
    seconds, it tries non-blocking reads of them until one has a count or the budget is spent,
    and returns that vector (the lowest when several are rung), else None. Made once per set
    of fds and cached with them, so that a wait does no setup.

    Why reads and not ``poll(0)``: measured in a two-process ping-pong on two CPUs, spinning
    with reads gave 1.7 µs round trips, with poll(0) checks 2.0 µs (a poll that sees the ring
    still needs the read after it). The reads are :func:`ivshmem._eventfd.try_read`: they
    never block, even on a doorbell whose O_NONBLOCK another peer cleared, and an empty one
    is a False, not a raised BlockingIOError (from C, about a quarter of its cost)."""
    read, clock = try_read, time.perf_counter
    if len(wanted) == 1:
        ((only, vector),) = wanted.items()

        def spin_one(budget: float) -> int | None:
            end = clock() + budget
            while True:
                if read(only):
                    return vector
                if clock() >= end:
                    return None

        return spin_one

    items = tuple(sorted(wanted.items(), key=lambda item: item[1]))

    def spin_many(budget: float) -> int | None:
        end = clock() + budget
        while True:
            for fd, v in items:
                if read(fd):
                    return v
            if clock() >= end:
                return None

    return spin_many


def spin_read(wanted: dict[int, int], budget: float) -> int | None:
    """Spin up to ``budget`` seconds for one of the eventfds in ``wanted`` (fd -> vector); the
    vector whose count was consumed, or None. Uncached: a wait loop should keep a
    :func:`make_spinner` instead."""
    return make_spinner(wanted)(budget)


class RegionEndpoint(Endpoint):
    """A plain shared region: memory, no server, no doorbell.

    ``id`` is whatever the application chooses (default 0), so that layers above can tell
    the users of one plain region apart.
    """

    def __init__(self, shm: SharedMemory, id: int = 0) -> None:
        try:
            id = peer_arg(id)
        except UsageError:
            shm.close()
            raise
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
        """The other peers connected to the server that keeps this region's membership table
        (a server started with --format, whose named backing this endpoint opened);
        PeersUnknownError otherwise: a plain region alone cannot know them."""
        from .channel.layout import listed_peers

        return listed_peers(
            self.memory,
            self._id,
            "a plain region has no server, so its peers cannot be known unless a server "
            "started with --format keeps the region's membership table",
        )

    def _no_doorbell(self) -> DoorbellUnavailableError:
        return DoorbellUnavailableError(
            f"{self!r} is a plain region with no doorbell: connect to an ivshmem server "
            "(ivshmem.connect) or use an ivshmem-doorbell device to ring and wait"
        )

    def notify(self, peer: int, vector: int = 0) -> None:
        raise self._no_doorbell()

    def wait(
        self, vector: int | None = None, timeout: float | None = None, *, spin: float | None = None
    ) -> int | None:
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

    id = peer_arg(id)
    if size is not None and not isinstance(size, (int, str)):
        raise UsageError(f"size must be a number of bytes or a str like '4M', not {size!r}")
    nbytes = None if size is None else parse_size(size)
    if isinstance(source, SharedMemory):
        shm = source
    elif isinstance(source, int) and not isinstance(source, bool):
        if source < 0:
            raise UsageError(f"fd {source} is not a file descriptor (fds are >= 0)")
        try:
            fd = os.dup(source)
        except OSError as err:
            raise UsageError(f"fd {source} cannot be used: {err.strerror}") from None
        except OverflowError:
            raise UsageError(f"fd {source} is not a file descriptor (too large)") from None
        shm = SharedMemory.adopt(fd, "fd")
        if shm.size <= 0:
            shm.close()
            raise UsageError(f"fd {source} is an empty file: there is no region to map")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not isinstance(path, str) or not path or "\0" in path:
            raise UsageError(f"{path!r} is not a usable path or shm:NAME")
        if path.startswith("shm:"):
            shm = SharedMemory.posix(path[4:], nbytes)
        else:
            shm = SharedMemory.file(path, nbytes)
    else:
        raise UsageError(
            "open_region() takes a path, 'shm:NAME', an fd or a SharedMemory, "
            f"not {type(source).__name__} ({source!r:.60})"
        )
    return RegionEndpoint(shm, id)

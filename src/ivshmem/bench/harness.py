"""The process machinery of the messaging benchmarks: one producer and one consumer process
per measurement, a control pipe to each, and the two measurement loops (stream, round trip).

Every transport is driven through the same tiny :class:`Link` interface (``send(seq)``,
``recv() -> seq``), so the per-message cost of the harness itself (one Python method call per
message and side) is the same for every transport and for the physical references.

Messages carry their sequence number twice, as a little-endian u64 at the start and at the end
of the payload. The consumer checks every message: the sequence number must be the next one
expected and both copies must agree (which catches a torn or truncated payload cheaply). The
producer ends a run with a *stop* message whose sequence number is ``STOP + count``; the
consumer checks that ``count`` equals the number of messages it received, so a transport that
drops, duplicates or reorders messages fails the run instead of looking fast.

Timing uses ``CLOCK_MONOTONIC`` (``time.monotonic_ns``/``perf_counter_ns`` on Linux). Stream
throughput is measured on the consumer, over the window that starts once ``warmup`` seconds
have passed since its first message and ends with the stop message; round trips are timed on
the pinger, one sample per round trip, after the same warm-up.
"""

from __future__ import annotations

import abc
import mmap
import multiprocessing
import multiprocessing.connection
import os
import struct
import time
import traceback
from array import array
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import IvshmemError, UsageError

__all__ = [
    "STOP",
    "BenchError",
    "Link",
    "MessageCheckError",
    "Plan",
    "Stamp",
    "SuiteContext",
    "Transport",
    "measure",
]

#: A sequence number at or above this is a stop message; the low bits hold the message count.
STOP = 1 << 63

#: Smallest payload: the sequence number is written at both ends.
MIN_PAYLOAD = 16

_U64 = struct.Struct("<Q")
_PROGRESS = struct.Struct("<qq")


class BenchError(IvshmemError):
    """A benchmark could not run or produced an inconsistent result."""


class MessageCheckError(BenchError):
    """A received message failed its check (wrong sequence number, torn or short payload)."""


# -- messages ---------------------------------------------------------------------------------


class Stamp:
    """Writes and checks the sequence number at both ends of a payload of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        if size < MIN_PAYLOAD:
            raise UsageError(f"payload of {size} bytes is too small: at least {MIN_PAYLOAD}")
        self.size = size
        self.tail = size - 8
        self._pack = _U64.pack_into
        self._unpack = _U64.unpack_from

    def template(self) -> bytearray:
        """A payload filled with a non-zero pattern, ready to be stamped."""
        pattern = bytes(range(1, 256))
        reps = self.size // len(pattern) + 1
        return bytearray((pattern * reps)[: self.size])

    def stamp(self, buf: Any, seq: int) -> None:
        self._pack(buf, 0, seq)
        self._pack(buf, self.tail, seq)

    def check(self, data: Any) -> int:
        """Return the sequence number of ``data`` after checking its size and both copies."""
        if len(data) != self.size:
            raise MessageCheckError(f"message of {len(data)} bytes, expected {self.size}")
        (head,) = self._unpack(data, 0)
        (tail,) = self._unpack(data, self.tail)
        if head != tail:
            raise MessageCheckError(
                f"torn message: sequence number {head} at the start, {tail} at the end"
            )
        return int(head)


# -- transports -------------------------------------------------------------------------------


class Link(abc.ABC):
    """One side of a transport inside a child process.

    Side 0 is the producer (stream) or pinger (round trip); side 1 the consumer or ponger.
    In a round trip the ponger sends every message back with the same sequence number.
    """

    def connect(self) -> None:  # noqa: B027 - optional hook
        """Called on both sides once both have opened: block until the transport can carry
        messages to the other side (e.g. a subscriber is attached), so no warm-up message is
        lost to a connection still being made."""

    @abc.abstractmethod
    def send(self, seq: int) -> None:
        """Send one message stamped with ``seq`` (a stop message when ``seq >= STOP``)."""

    @abc.abstractmethod
    def recv(self) -> int:
        """Receive and check one message; return its sequence number."""

    def stats(self) -> dict[str, Any]:
        """Transport-specific counts worth reporting (e.g. retries), after the run."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the link holds (called after the parent saw both results)."""


@dataclass
class SuiteContext:
    """What a whole benchmark run shares: a private temporary directory and options."""

    tmpdir: str
    #: CPU placement: "apart" pins side 0 and side 1 to different CPUs (see pin_cpu),
    #: "never" leaves them to the scheduler.
    pin: str = "apart"
    #: Transport options, e.g. "block_spin": the blocking channel's spin budget in seconds.
    options: dict[str, Any] = field(default_factory=dict)


class Transport(abc.ABC):
    """A way of moving messages between two processes, configured for one payload size.

    Created in the parent; :meth:`prepare` runs there before the children are forked (so
    anonymous pipes, queues and shared mappings are inherited), :meth:`open` runs in each child,
    :meth:`cleanup` in the parent after both children have exited.
    """

    #: Stable identifier used in the JSON results.
    key: ClassVar[str]
    #: Human-readable name for tables and charts.
    label: ClassVar[str]
    #: Python modules this transport needs (reported as unavailable when one is missing).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Which measurements make sense: "stream", "rtt".
    kinds: ClassVar[tuple[str, ...]] = ("stream", "rtt")
    #: True when the consumer can read the payload in place (the copy variant then exists).
    zero_copy: ClassVar[bool] = False
    #: Variants besides the default "": "copy" (zero-copy transports: the producer writes the
    #: whole payload into the loaned buffer, the consumer copies it out before checking),
    #: "bytes" (the transport's plain bytes-in, bytes-out API instead of its zero-copy one) and
    #: "unpinned" (the same transport, with both processes left to the scheduler).
    variants: ClassVar[tuple[str, ...]] = ()
    #: One line for the documentation: how the transport is used.
    notes: ClassVar[str] = ""

    @classmethod
    def notes_for(cls, variant: str) -> str:
        """The documentation line for one variant (transports whose variants use different
        calls say so here)."""
        return cls.notes

    def __init__(
        self,
        ctx: SuiteContext,
        payload: int,
        kind: str,
        variant: str = "",
        *,
        capacity: int | None = None,
    ) -> None:
        if variant and variant not in self.variants:
            raise UsageError(f"{self.label} has no variant {variant!r}")
        #: The ring capacity asked for (the capacity axis); None: the transport's own choice.
        #: Only transports with a ring of their own (this project's channels) use it.
        self.ring_capacity = capacity
        self.ctx = ctx
        self.payload = payload
        self.kind = kind
        self.variant = variant
        #: Producer writes the whole payload and consumer copies it out (zero-copy transports).
        self.copy = variant == "copy"
        self.stamp = Stamp(payload)
        #: Depth of the transport's queue in messages, from a common byte budget.
        self.depth = queue_depth(payload)

    @classmethod
    def unavailable(cls) -> str | None:
        """None when this transport can run here, else the reason it cannot."""
        import importlib

        for name in cls.requires:
            try:
                importlib.import_module(name)
            except ImportError as err:
                return f"{name} is not installed ({err}); pip install 'ivshmem[bench]'"
        return None

    @classmethod
    def start(cls, ctx: SuiteContext) -> None:
        """Once per run, before this transport's first measurement (parent side)."""
        return None

    @classmethod
    def finish(cls, ctx: SuiteContext) -> None:
        """Once per run, after its last measurement, also after failures (parent side)."""
        return None

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Parent side, before the children start."""

    @abc.abstractmethod
    def open(self, side: int) -> Link:
        """Child side: this process's end of the transport."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Parent side, after both children have exited (also after failures)."""


#: Bytes the queue of every transport may hold, so none wins by buffering more than another:
#: 256 messages, but at least 1 MiB and at most 16 MiB (16 messages of 1 MiB).
def queue_depth(payload: int) -> int:
    budget = min(max(256 * payload, 1 << 20), 16 << 20)
    return max(2, budget // payload)


# -- running one measurement ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How long one measurement runs."""

    #: Seconds of traffic before the measured window starts.
    warmup: float = 0.05
    #: Seconds of measured traffic (the producer stops after warmup + duration).
    duration: float = 0.3
    #: Stop after this many messages (or round trips) even if time is left; 0 = no limit.
    max_messages: int = 0
    #: Extra seconds a measurement may take before it is declared hung.
    slack: float = 30.0

    def mask(self, payload: int) -> int:
        """Check the clock every mask+1 messages: often enough for slow (large) messages."""
        if self.max_messages and self.max_messages < 4096:
            return 0
        return 255 if payload <= 4096 else 0


class _Progress:
    """Two counters in an anonymous shared mapping, so a hung run can say where it stopped."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)

    def set(self, side: int, value: int) -> None:
        struct.pack_into("<q", self._map, side * 8, value)

    def get(self) -> tuple[int, int]:
        a, b = _PROGRESS.unpack_from(self._map, 0)
        return int(a), int(b)

    def close(self) -> None:
        self._map.close()


def pin_cpu(ctx: SuiteContext, side: int, pinned: bool = True) -> int | None:
    """Pin side 0 and side 1 to different CPUs (when there are two), unless ``ctx.pin`` is
    "never" or this transport runs unpinned.

    Why apart, for every transport (measured on the 2-vCPU VM these numbers come from): two
    spinning sides left to the scheduler sometimes share one CPU, and a round trip then takes
    a scheduler tick (milliseconds instead of a microsecond). Blocking sides left free are
    bimodal instead: a wake-up on the waker's own CPU is cheap and one sent to the other CPU
    is an inter-processor interrupt, so an eventfd round trip measured 6 us in one repetition
    and 40 us in the next, which makes same-run ratios meaningless. Pinned apart, every
    transport pays the cross-CPU wake-up and gets two CPUs' worth of parallelism, every time.
    Transports with helper threads (libzmq's I/O thread) then share their process's CPU:
    that is what the "unpinned" variant shows.
    """
    if ctx.pin == "never" or not pinned:
        return None
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    cpu = cpus[side % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


def _stream_producer(link: Link, plan: Plan, mask: int, progress: _Progress) -> dict[str, Any]:
    send = link.send
    clock = time.monotonic_ns
    deadline = clock() + int((plan.warmup + plan.duration) * 1e9)
    limit = plan.max_messages or (1 << 62)
    n = 0
    while True:
        send(n)
        n += 1
        if not n & mask:
            progress.set(0, n)
            if n >= limit or clock() >= deadline:
                break
    send(STOP + n)
    progress.set(0, n)
    return {"sent": n}


def _stream_consumer(link: Link, plan: Plan, mask: int, progress: _Progress) -> dict[str, Any]:
    recv = link.recv
    clock = time.monotonic_ns
    warm_ns = int(plan.warmup * 1e9)
    t_first = t0 = 0
    n_first = n0 = 0
    n = 0
    while True:
        seq = recv()
        if seq != n:
            if seq >= STOP:
                if seq - STOP != n:
                    raise MessageCheckError(
                        f"producer sent {seq - STOP} messages, consumer received {n}"
                    )
                break
            raise MessageCheckError(f"expected message {n}, received message {seq}")
        n += 1
        if not n & mask:
            progress.set(1, n)
            if not t0:
                now = clock()
                if not t_first:
                    t_first, n_first = now, n
                elif now - t_first >= warm_ns:
                    t0, n0 = now, n
    t_end = clock()
    progress.set(1, n)
    if not t0 and t_first:
        # The whole run was shorter than the warm-up (tiny test runs): time what there is.
        t0, n0 = t_first, n_first
    measured = n - n0
    seconds = (t_end - t0) / 1e9 if t0 else 0.0
    return {
        "received": n,
        "checked": n,
        "measured_messages": measured,
        "seconds": seconds,
        "msgs_per_s": measured / seconds if seconds > 0 and measured > 0 else None,
    }


def _rtt_pinger(link: Link, plan: Plan, mask: int, progress: _Progress) -> dict[str, Any]:
    send, recv = link.send, link.recv
    clock = time.perf_counter_ns
    start = clock()
    warm_end = start + int(plan.warmup * 1e9)
    deadline = warm_end + int(plan.duration * 1e9)
    limit = plan.max_messages or (1 << 62)
    samples = array("q")
    n = 0
    while True:
        t = clock()
        send(n)
        seq = recv()
        dt = clock() - t
        if seq != n:
            raise MessageCheckError(f"sent round trip {n}, the echo was message {seq}")
        n += 1
        if t >= warm_end:
            samples.append(dt)
        if not n & mask:
            progress.set(0, n)
        if n >= limit or t >= deadline:
            break
    send(STOP + n)
    progress.set(0, n)
    if not samples:
        # Shorter than the warm-up (tiny test runs): nothing was measured.
        return {"sent": n, "received": n, "checked": n, "round_trips": 0}
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1e3

    return {
        "sent": n,
        "received": n,
        "checked": n,
        "round_trips": len(ordered),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "min_us": ordered[0] / 1e3,
        "max_us": ordered[-1] / 1e3,
        "mean_us": sum(ordered) / len(ordered) / 1e3,
    }


def _rtt_ponger(link: Link, plan: Plan, mask: int, progress: _Progress) -> dict[str, Any]:
    send, recv = link.send, link.recv
    n = 0
    while True:
        seq = recv()
        if seq != n:
            if seq >= STOP:
                if seq - STOP != n:
                    raise MessageCheckError(f"pinger sent {seq - STOP} messages, ponger saw {n}")
                break
            raise MessageCheckError(f"expected message {n}, received message {seq}")
        send(seq)
        n += 1
        if not n & mask:
            progress.set(1, n)
    progress.set(1, n)
    return {"echoed": n, "checked": n}


_LOOPS = {
    ("stream", 0): _stream_producer,
    ("stream", 1): _stream_consumer,
    ("rtt", 0): _rtt_pinger,
    ("rtt", 1): _rtt_ponger,
}


def _expect(conn: multiprocessing.connection.Connection, what: str) -> None:
    msg = conn.recv()
    if msg != what:
        raise BenchError(f"control: expected {what!r} from the parent, got {msg!r}")


def _child(
    transport: Transport,
    side: int,
    plan: Plan,
    conn: multiprocessing.connection.Connection,
    progress: _Progress,
    parent_ends: list[multiprocessing.connection.Connection],
) -> None:
    """Entry point of a producer/consumer process. Reports ("ok", result) or ("error", text)."""
    # Fork gave us the parent's ends of the control pipes too: close them, or the parent
    # closing its own end would never read as EOF here.
    for end in parent_ends:
        end.close()
    link: Link | None = None
    try:
        cpu = pin_cpu(transport.ctx, side, transport.variant != "unpinned")
        link = transport.open(side)
        conn.send("opened")
        _expect(conn, "connect")
        link.connect()
        conn.send("connected")
        _expect(conn, "go")
        loop = _LOOPS[(transport.kind, side)]
        result = loop(link, plan, plan.mask(transport.payload), progress)
        result["cpu"] = cpu
        extra = link.stats()
        if extra:
            result["stats"] = extra
        conn.send(("ok", result))
        # Keep the link open until the parent has both results: closing a sender early can
        # drop messages still queued in the transport (zmq linger, iceoryx2 publisher).
        _expect(conn, "close")
    except BaseException as exc:  # reported to the parent, which decides
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if not isinstance(exc, (BenchError, KeyboardInterrupt)):
            text += "\n" + traceback.format_exc()
        try:
            conn.send(("error", text))
        except OSError:
            pass
    finally:
        if link is not None:
            try:
                link.close()
            except Exception:
                pass
        conn.close()


def _wait_all(
    conns: list[multiprocessing.connection.Connection], timeout: float, phase: str
) -> list[Any]:
    """One message from each child within ``timeout`` seconds; an error message ends it."""
    deadline = time.monotonic() + timeout
    got: dict[int, Any] = {}
    while len(got) < len(conns):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [i for i in range(len(conns)) if i not in got]
            raise BenchError(f"timed out in phase {phase!r} waiting for side(s) {missing}")
        ready = multiprocessing.connection.wait(
            [c for i, c in enumerate(conns) if i not in got], left
        )
        for obj in ready:
            i = next(k for k, c in enumerate(conns) if c is obj)
            try:
                msg = conns[i].recv()
            except EOFError:
                raise BenchError(f"side {i} exited during phase {phase!r}") from None
            if isinstance(msg, tuple) and msg[0] == "error":
                raise BenchError(f"side {i} failed during phase {phase!r}: {msg[1]}")
            got[i] = msg
    return [got[i] for i in range(len(conns))]


def measure(transport: Transport, plan: Plan) -> dict[str, Any]:
    """Run one measurement with two fresh processes; return the merged result.

    Raises :class:`BenchError` (with the reason) when the transport fails, a message fails its
    check, or the run hangs; the children are gone when this returns or raises.
    """
    ctx = multiprocessing.get_context("fork")
    progress = _Progress()
    procs: list[Any] = []
    conns: list[multiprocessing.connection.Connection] = []
    finished = False
    transport.prepare()
    try:
        for side in (0, 1):
            parent_end, child_end = ctx.Pipe()
            conns.append(parent_end)
            proc = ctx.Process(
                target=_child,
                args=(transport, side, plan, child_end, progress, list(conns)),
                name=f"bench-{transport.key}-{side}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            procs.append(proc)
        _wait_all(conns, 60.0, "open")
        for c in conns:
            c.send("connect")
        _wait_all(conns, 60.0, "connect")
        for c in conns:
            c.send("go")
        run_timeout = plan.warmup + plan.duration + plan.slack
        try:
            (_, a), (_, b) = _wait_all(conns, run_timeout, "run")
        except BenchError as err:
            sent, got = progress.get()
            raise BenchError(f"{err} (progress: side 0 at {sent}, side 1 at {got})") from None
        for c in conns:
            c.send("close")
        result: dict[str, Any] = {**b, **a} if transport.kind == "rtt" else {**a, **b}
        result["cpus"] = [a.get("cpu"), b.get("cpu")]
        result.pop("cpu", None)
        result.pop("stats", None)
        if "stats" in a or "stats" in b:
            result["link_stats"] = [a.get("stats", {}), b.get("stats", {})]
        if transport.kind == "stream" and result.get("msgs_per_s"):
            result["bytes_per_s"] = result["msgs_per_s"] * transport.payload
        finished = True
        return result
    finally:
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        # After a failure the other side may wait forever for a message that will not come.
        grace = 5.0 if finished else 0.5
        for proc in procs:
            proc.join(grace)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        progress.close()
        transport.cleanup()

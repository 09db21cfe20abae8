"""The physical references every transport is compared with, measured in the same run:

* **eventfd ping-pong**: two processes, two blocking eventfds; a round trip is one write and
  one read on each side (two sleeps and two wake-ups). No message moves: this is the floor of
  any design that blocks in the kernel between messages.
* **spin-byte ping-pong**: two processes spin on one byte of a shared mapping, each waiting
  for the value the other writes. This is the floor of any polling design: one cache line
  going back and forth, plus the Python loop around it.
* **memcpy**: copying 1 MiB inside one process (numpy ``copyto`` and memoryview slice
  assignment; the faster counts), the rate a message that is written and then copied out can
  at best reach with one copy on each of two cores.

The ping-pongs go through the same :class:`~ivshmem.bench.harness.Link` interface and loops as
the transports, so the per-message Python overhead cancels out of the ratios.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from ..harness import STOP, BenchError, Link, Plan, SuiteContext, Transport, pin_cpu

__all__ = ["EventfdPingPong", "SpinBytePingPong", "measure_memcpy"]


class _EventfdLink(Link):
    def __init__(self, rx: int, tx: int) -> None:
        self._rx = rx
        self._tx = tx
        self._n = 0

    def send(self, seq: int) -> None:
        # 1 = a message, 2 = stop; the two sides alternate, so counts never add up.
        os.eventfd_write(self._tx, 2 if seq >= STOP else 1)

    def recv(self) -> int:
        value = os.eventfd_read(self._rx)
        n = self._n
        if value == 2:
            return STOP + n
        if value != 1:
            raise BenchError(f"eventfd read {value}, expected 1 (a lost or doubled wake-up)")
        self._n = n + 1
        return n


class EventfdPingPong(Transport):
    key = "ref_eventfd"
    label = "eventfd ping-pong (reference)"
    kinds = ("rtt",)
    notes = "two blocking eventfds between two processes; eventfd_write / eventfd_read"

    def prepare(self) -> None:
        self._fds = (os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC))

    def open(self, side: int) -> _EventfdLink:
        a, b = self._fds
        return _EventfdLink(b, a) if side == 0 else _EventfdLink(a, b)

    def cleanup(self) -> None:
        for fd in self._fds:
            os.close(fd)


# The pinger writes odd values 1..253, the ponger answers with the next even value 2..254, and
# 255 means stop; a value is never reused before the other side has seen it.
_STOP_BYTE = 255


class _SpinPinger(Link):
    def __init__(self, mem: mmap.mmap) -> None:
        self._mv = memoryview(mem)
        self._n = 0

    def send(self, seq: int) -> None:
        self._mv[0] = _STOP_BYTE if seq >= STOP else 1 + 2 * (seq % 127)

    def recv(self) -> int:
        mv = self._mv
        n = self._n
        want = 2 + 2 * (n % 127)
        while mv[0] != want:
            pass
        self._n = n + 1
        return n

    def close(self) -> None:
        self._mv.release()


class _SpinPonger(Link):
    def __init__(self, mem: mmap.mmap) -> None:
        self._mv = memoryview(mem)
        self._n = 0

    def send(self, seq: int) -> None:
        self._mv[0] = 2 + 2 * (seq % 127)

    def recv(self) -> int:
        mv = self._mv
        n = self._n
        want = 1 + 2 * (n % 127)
        while True:
            v = mv[0]
            if v == want:
                break
            if v == _STOP_BYTE:
                return STOP + n
        self._n = n + 1
        return n

    def close(self) -> None:
        self._mv.release()


class SpinBytePingPong(Transport):
    key = "ref_spin"
    label = "spin-byte ping-pong (reference)"
    kinds = ("rtt",)
    notes = "one byte of an anonymous shared mapping, both processes spin reading it"

    def prepare(self) -> None:
        self._mem = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED|MAP_ANONYMOUS: shared by fork

    def open(self, side: int) -> Link:
        return _SpinPinger(self._mem) if side == 0 else _SpinPonger(self._mem)

    def cleanup(self) -> None:
        self._mem.close()


def _copy_rates(size: int, seconds: float, variant: str, limit: int = 0) -> dict[str, Any]:
    """Bytes per second of copying ``size`` bytes. ``hot``: from one buffer into another, again
    and again (both stay in cache). ``cold``: into consecutive slots of a 16-slot ring, as a
    producer fills a channel's ring (the destination has usually left the nearest caches)."""
    slots = 1 if variant == "hot" else 16
    src = bytearray(os.urandom(size))
    dst = bytearray(size * slots)
    out: dict[str, Any] = {"variant": variant, "payload": size, "slots": slots}

    def rate(copy: Callable[[int], None]) -> float:
        for i in range(slots + 2):  # touch every page once: no page faults are timed
            copy(i % slots)
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in range(16):
                copy(n % slots)
                n += 1
            t = time.perf_counter()
            if t >= end or (limit and n >= limit):
                return n * size / (t - t0)

    sv, dv = memoryview(src), memoryview(dst)

    def mv_copy(i: int) -> None:
        dv[i * size : (i + 1) * size] = sv

    out["memoryview_bytes_per_s"] = rate(mv_copy)
    try:
        import numpy as np
    except ImportError:
        out["numpy_bytes_per_s"] = None
    else:
        a = np.frombuffer(src, dtype=np.uint8)
        b = np.frombuffer(dst, dtype=np.uint8).reshape(slots, size)

        def np_copy(i: int) -> None:
            np.copyto(b[i], a)

        out["numpy_bytes_per_s"] = rate(np_copy)
    out["bytes_per_s"] = max(
        v for v in (out["memoryview_bytes_per_s"], out["numpy_bytes_per_s"]) if v is not None
    )
    return out


def _memcpy_child(ctx: SuiteContext, plan: Plan, size: int, variant: str, conn: Any) -> None:
    try:
        cpu = pin_cpu(ctx, 0)
        result = _copy_rates(size, plan.duration, variant, plan.max_messages)
        result["cpu"] = cpu
        conn.send(("ok", result))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def measure_memcpy(
    ctx: SuiteContext, plan: Plan, size: int = 1 << 20, variant: str = "hot"
) -> dict[str, Any]:
    """Copy rate of ``size`` bytes in a fresh process pinned like a producer."""
    if variant not in ("hot", "cold"):
        raise BenchError(f"unknown memcpy variant {variant!r}")
    mp = multiprocessing.get_context("fork")
    parent, child = mp.Pipe()
    proc = mp.Process(target=_memcpy_child, args=(ctx, plan, size, variant, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(plan.duration * 2 + plan.slack):
            raise BenchError("memcpy measurement did not finish")
        status, result = parent.recv()
        if status != "ok":
            raise BenchError(f"memcpy measurement failed: {result}")
        return dict(result)
    finally:
        parent.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()

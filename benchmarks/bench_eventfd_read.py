"""What a doorbell read costs when it does not rely on O_NONBLOCK (see ivshmem._eventfd).

Every read of a doorbell that other peers hold is ``ivshmem._eventfd.try_read``: a
``preadv2(..., RWF_NOWAIT)``, which never blocks even when another holder cleared the shared
O_NONBLOCK. This prints, per call, in one process and interleaved repetitions (medians):

* **empty**: the eventfd has no count (what the spin loop does until the ring arrives);
* **full**: one ``eventfd_write`` then the read (the ring arriving; the write is included,
  the same for all);

for ``os.eventfd_read`` on a non-blocking eventfd (the read the wait paths used before,
catching BlockingIOError), the C ``try_read`` (extension ``ivshmem._eventfdcore``) and the
pure-Python ``try_read`` (``os.preadv``), and their ratios against ``os.eventfd_read``. It
also checks first that an RWF_NOWAIT read of an empty *blocking* eventfd gives EAGAIN here.

    .venv/bin/python benchmarks/bench_eventfd_read.py --calls 200000 --repeats 7

The doorbell round trip as a whole (two processes): benchmarks/bench_doorbell.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

from ivshmem import _eventfd


def _plain(fd: int) -> bool:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


def _time(read: Callable[[int], bool], fd: int, calls: int, ring: bool) -> float:
    """ns per call of ``read(fd)`` (each preceded by a ring when ``ring``)."""
    write = os.eventfd_write
    clock = time.perf_counter_ns
    if ring:
        t0 = clock()
        for _ in range(calls):
            write(fd, 1)
            read(fd)
    else:
        t0 = clock()
        for _ in range(calls):
            read(fd)
    return (clock() - t0) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="calls per repetition")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
    args = parser.parse_args(argv)

    print(f"kernel {os.uname().release}: NOWAIT_READS={_eventfd.NOWAIT_READS}")
    if not _eventfd.NOWAIT_READS:
        print("this kernel refuses RWF_NOWAIT on eventfds: nothing to compare")
        return 1
    blocking = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        found = _eventfd._try_read_python(blocking)  # the import-time probe, once more
    finally:
        os.close(blocking)
    print(f"an RWF_NOWAIT read of an empty blocking eventfd found a count: {found}")
    print(f"try_read is {_eventfd.try_read!r}")

    variants: dict[str, Callable[[int], bool]] = {"os.eventfd_read": _plain}
    try:
        from ivshmem._eventfdcore import try_read as core
    except ImportError:
        print("(the C extension is not built: only the Python try_read is measured)")
    else:
        variants["try_read (C)"] = core
    variants["try_read (os.preadv)"] = _eventfd._try_read_python

    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    results: dict[tuple[str, bool], list[float]] = {}
    try:
        for _ in range(args.repeats):
            for name, read in variants.items():
                for ring in (False, True):
                    ns = _time(read, fd, args.calls, ring)
                    results.setdefault((name, ring), []).append(ns)
    finally:
        os.close(fd)

    print(f"\nns per call, median of {args.repeats} x {args.calls:,} calls (one process):")
    print(f"{'read':24} {'empty':>8} {'ratio':>6} {'ring+read':>10} {'ratio':>6}")
    base = {ring: statistics.median(results[("os.eventfd_read", ring)]) for ring in (False, True)}
    for name in variants:
        empty = statistics.median(results[(name, False)])
        full = statistics.median(results[(name, True)])
        print(
            f"{name:24} {empty:8.0f} {empty / base[False]:6.2f} {full:10.0f} "
            f"{full / base[True]:6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

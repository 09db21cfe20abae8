"""The hot window in isolation: one process, one ring, a receiver that always keeps up
(``ivshmem.bench.placement``; ``ivshmem bench --capacities`` measures the same in its
"placement alone" table).

Each step reserves room for a message, writes every byte of it, commits, then receives it as a
view, copies it out and releases it (the written-and-copied pattern of ``ivshmem bench``, with
no second process). Two rings of the same capacity are measured in turn within every
repetition: one with the default hot window (``ring.HOT_WINDOW``), one whose window is the
whole capacity, which places records exactly as the ring did before the window existed (it
walks the whole capacity). Both are warmed by a full lap first, so no page is faulted in while
measured, and timed in 16 MiB chunks whose median rate counts (a chunk the scheduler
interrupted is an outlier then, not a lower average). Printed: the median rate of each over
the repetitions and the median of the same-run ratios window ÷ whole ring, per capacity.
With nothing to wait for, no scheduling between two processes is measured: only where the
bytes land, in cache or not. (Same-run ratios: the machine may be shared; the rates
themselves move with its load.)

    .venv/bin/python benchmarks/bench_ring_window.py
    .venv/bin/python benchmarks/bench_ring_window.py --payload 64K --capacities 4M,256M -r 7
"""

from __future__ import annotations

import argparse
import statistics
import sys

from ivshmem.bench.placement import measure_placement as measure
from ivshmem.channel.ring import HOT_WINDOW
from ivshmem.memory import format_size, parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payload", default="1M", help="message size (default 1M)")
    parser.add_argument("--capacities", default="4M,32M,64M,256M", help="ring capacities")
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="measured per number")
    args = parser.parse_args(argv)
    payload = parse_size(args.payload)
    caps = [parse_size(c) for c in args.capacities.split(",")]
    if any(2 * (payload + 8) > c for c in caps):
        print("bench_ring_window: a message may use at most half the ring", file=sys.stderr)
        return 2
    rates: dict[tuple[int, bool], list[float]] = {}
    ratios: dict[int, list[float]] = {}
    for rep in range(args.repetitions):
        for cap in caps:
            both = {w: measure(cap, payload, w, args.seconds) for w in (True, False)}
            for w, r in both.items():
                rates.setdefault((cap, w), []).append(r)
            ratios.setdefault(cap, []).append(both[True] / both[False])
            print(
                f"rep {rep + 1}: {format_size(cap)} ring: window {both[True] / 1e9:.2f} GB/s, "
                f"whole ring {both[False] / 1e9:.2f} GB/s",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"{format_size(payload)} messages written + copied, one process, hot window "
        f"{format_size(HOT_WINDOW)}; medians of {args.repetitions} repetitions"
    )
    print("| ring | hot window | whole ring (as before) | window ÷ whole ring |")
    print("|---|---:|---:|---:|")
    for cap in caps:
        win = statistics.median(rates[(cap, True)]) / 1e9
        whole = statistics.median(rates[(cap, False)]) / 1e9
        print(
            f"| {format_size(cap)} | {win:.2f} GB/s | {whole:.2f} GB/s | "
            f"{statistics.median(ratios[cap]):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak the channels under a hostile peer for a set time; print the counts.

Runs :func:`ivshmem.channel.fuzz.run_fuzz` (read its docstring for what one round does and
what is checked) on a plain region and on host peers of a real ``ivshmem-server`` started
here with ``--format -n 2``, half the time each unless ``--mode`` picks one. Printed: messages
sent / received / verified per channel (``fz`` is attacked, ``ctl`` never is), the hostile
writes by kind, corruption detected by type and field (by the channel layer, or by the
application's digest and sequence checks when only payload bytes changed), how the attacked
receivers ended, and the counts that must be 0: crashes, hangs, out-of-area writes and views,
other failures (control channel or unattacked rounds misbehaving). Exit status 1 if any of
those is not 0; each failure comes with the seed and the last hostile writes to replay it.

    .venv/bin/python benchmarks/soak_channel.py --seconds 60
    .venv/bin/python benchmarks/soak_channel.py --seconds 3600 --mode server --json
    .venv/bin/python benchmarks/soak_channel.py --seconds 60 --seed 1234   # replay
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverproc import ServerProcess

from ivshmem.channel.fuzz import FuzzConfig, FuzzReport, run_fuzz


def soak(mode: str, seconds: float, args: argparse.Namespace) -> FuzzReport:
    config = FuzzConfig(
        seconds=seconds,
        round_seconds=args.round_seconds,
        seed=args.seed,
        capacity=args.capacity,
        verbose=args.verbose,
    )
    if mode == "plain":
        return run_fuzz(config)
    with tempfile.TemporaryDirectory(prefix="soak-", dir="/tmp") as tmp:
        with ServerProcess(tmp, size="1M", vectors=2, extra_args=["--format"]) as server:
            config.server = server.socket_path
            return run_fuzz(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total run time")
    parser.add_argument("--mode", choices=["both", "plain", "server"], default="both")
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--capacity", type=int, default=4096, help="ring bytes per channel")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    modes = ["plain", "server"] if args.mode == "both" else [args.mode]
    reports = [soak(mode, args.seconds / len(modes), args) for mode in modes]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(r.format() for r in reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

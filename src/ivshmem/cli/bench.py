"""``ivshmem bench``: the messaging benchmarks (see :mod:`ivshmem.bench`).

::

    ivshmem bench                 # full run (about 3 minutes), tables and verdicts on stdout
    ivshmem bench --quick         # a rough run in well under a minute
    ivshmem bench --out DIR       # also DIR/results.json, DIR/benchmarks.md, DIR/*.png
    ivshmem bench --docs          # regenerate docs/benchmarks.md and docs/bench/ (project root)
    ivshmem bench --from-json F   # re-render a previous run's results without measuring
    ivshmem bench --capacities    # the ring-capacity axis (64 KiB and 1 MiB, 4..256 MiB rings)
    ivshmem bench --capacities --docs   # ... and replace its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import UsageError
from ..memory import parse_size

__all__ = ["build_parser", "main", "register"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("what to measure")
    run.add_argument(
        "--quick",
        action="store_true",
        help="2 repetitions of 0.1 s instead of 5 of 0.3 s: rough numbers, fast",
    )
    run.add_argument(
        "-r",
        "--repetitions",
        type=int,
        metavar="N",
        help="repetitions of everything (default 5; --quick 2)",
    )
    run.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="measured seconds per number (default 0.3; --quick 0.1)",
    )
    run.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="unmeasured seconds before each number (default 0.05)",
    )
    run.add_argument(
        "--payloads",
        metavar="LIST",
        default=None,
        help="comma-separated message sizes (default 64,4K,1M, or 64K,1M with --capacities; "
        "at least 16 bytes each)",
    )
    run.add_argument(
        "--capacities",
        metavar="LIST",
        nargs="?",
        const="4M,32M,64M,256M",
        default=None,
        help="measure the ring-capacity axis instead of the main tables: the spinning "
        "channel written + copied (stream and round trip) at these ring capacities "
        "(default 4M,32M,64M,256M) next to iceoryx2 written + copied; with --docs, only the "
        "capacity section of docs/benchmarks.md is replaced",
    )
    run.add_argument(
        "--only",
        metavar="KEYS",
        help="comma-separated series keys to run (see --list); default all",
    )
    run.add_argument("--list", action="store_true", help="list the series and exit")
    run.add_argument(
        "--pin",
        choices=("apart", "never"),
        default="apart",
        help="apart (default): pin producer and consumer to different CPUs; never: leave "
        "them to the scheduler",
    )
    run.add_argument(
        "--block-spin",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="spin budget of the blocking channel before it sleeps (default 0)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", metavar="DIR", help="write results.json, benchmarks.md and PNG charts into DIR"
    )
    out.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    out.add_argument("--markdown", metavar="FILE", help="write the Markdown report")
    out.add_argument(
        "--docs",
        action="store_true",
        help="regenerate docs/benchmarks.md, docs/bench/results.json and docs/bench/*.png "
        "(run from the project root)",
    )
    out.add_argument(
        "--from-json",
        metavar="FILE",
        help="do not measure: render the report of a saved results file",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem bench",
        description="Benchmark this project's channels against os.pipe, multiprocessing, "
        "faster-fifo, pyzmq and iceoryx2, next to memcpy/eventfd/spin references.",
    )
    add_arguments(parser)
    return parser


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark messaging between processes (channels vs. the Python IPC field)",
        description=build_parser().description,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def _payloads(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        size = parse_size(part.strip())
        if size < 16:
            raise UsageError(f"--payloads: {part!r} is below the 16-byte minimum")
        out.append(size)
    if not out:
        raise UsageError("--payloads: give at least one size")
    return tuple(out)


def _config(args: argparse.Namespace) -> Any:
    from ..bench.harness import Plan
    from ..bench.suite import MEMCPY, SERIES_BY_KEY, SuiteConfig

    reps = args.repetitions if args.repetitions is not None else (2 if args.quick else 5)
    duration = args.duration if args.duration is not None else (0.1 if args.quick else 0.3)
    warmup = args.warmup if args.warmup is not None else (0.03 if args.quick else 0.05)
    if reps < 1:
        raise UsageError("--repetitions must be at least 1")
    if duration <= 0 or warmup < 0:
        raise UsageError("--duration must be positive and --warmup not negative")
    if args.block_spin < 0:
        raise UsageError("--block-spin must not be negative")
    only = None
    if args.only:
        only = frozenset(k.strip() for k in args.only.split(",") if k.strip())
        unknown = sorted(only - set(SERIES_BY_KEY) - {MEMCPY})
        if unknown:
            raise UsageError(f"--only: unknown series {', '.join(unknown)} (see --list)")
    capacities: tuple[int, ...] = ()
    if args.capacities is not None:
        capacities = _payloads(args.capacities)  # sizes, parsed the same way
        bad = [c for c in capacities if c < 4096 or c & (c - 1) or c > 1 << 32]
        if bad:
            raise UsageError(
                f"--capacities: {', '.join(map(str, bad))} is not a power of two within 4K..4G"
            )
    default = "64K,1M" if capacities else "64,4K,1M"
    payloads = _payloads(args.payloads or default)
    for cap in capacities:
        too_big = [p for p in payloads if 2 * (p + 8) > cap]
        if too_big:
            raise UsageError(
                f"--capacities: a {cap}-byte ring cannot carry {too_big[0]}-byte messages "
                "(a message may use at most half the ring)"
            )
    return SuiteConfig(
        repetitions=reps,
        plan=Plan(warmup=warmup, duration=duration),
        payloads=payloads,
        only=only,
        pin=args.pin,
        block_spin=args.block_spin,
        capacities=capacities,
    )


def _list() -> None:
    from ..bench.suite import MEMCPY, SERIES

    for s in SERIES:
        cls = s.load()
        reason = cls.unavailable()
        state = "" if reason is None else f"  [unavailable: {reason}]"
        print(f"{s.key:20} {s.label()}{state}")
    print(f"{MEMCPY:20} memcpy 1 MiB (reference)")


def _outputs(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """(json path, markdown path, chart directory)."""
    json_path, md_path, chart_dir = args.json, args.markdown, None
    if args.docs:
        if not os.path.exists("pyproject.toml"):
            raise UsageError(
                "--docs writes docs/benchmarks.md and docs/bench/: run it from the project "
                "root (where pyproject.toml is), e.g. scripts/bench-docs.sh"
            )
        chart_dir = os.path.join("docs", "bench")
        # (json_path stays None here: its default depends on the run, see run_from_args)
        md_path = md_path or os.path.join("docs", "benchmarks.md")
    if args.out:
        chart_dir = args.out
        json_path = json_path or os.path.join(args.out, "results.json")
        md_path = md_path or os.path.join(args.out, "benchmarks.md")
    return json_path, md_path, chart_dir


def run_from_args(args: argparse.Namespace) -> int:
    from ..bench.report import (
        evaluate_targets,
        existing_capacity_section,
        render_markdown,
        splice_capacity_section,
        verdict_lines,
        write_charts,
        write_json,
    )
    from ..bench.suite import run_suite

    if args.list:
        _list()
        return 0
    try:
        json_path, md_path, chart_dir = _outputs(args)
        if args.from_json:
            with open(args.from_json) as f:
                doc = json.load(f)
            doc["targets"] = evaluate_targets(doc)
        else:
            config = _config(args)

            def progress(msg: str) -> None:
                if not args.quiet:
                    print(msg, file=sys.stderr, flush=True)

            doc = run_suite(config, progress)
    except (UsageError, OSError, ValueError) as err:
        print(f"ivshmem bench: {err}", file=sys.stderr)
        return 2
    capacity_run = bool(doc["config"].get("capacities"))
    if args.docs and not json_path:
        # The capacity axis keeps its results apart: they never replace the main run's.
        name = "capacity.json" if capacity_run else "results.json"
        json_path = os.path.join("docs", "bench", name)
    for path in (json_path, md_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    charts: dict[str, str] = {}
    if chart_dir and not capacity_run:
        charts = write_charts(doc, chart_dir)
        if not charts:
            print("ivshmem bench: matplotlib is missing, no charts", file=sys.stderr)
    if json_path:
        write_json(doc, json_path)
    base = os.path.dirname(md_path) if md_path else os.getcwd()
    rel = {k: os.path.relpath(v, base or ".") for k, v in charts.items()}
    text = render_markdown(doc, rel)
    if md_path:
        # The capacity axis is a section of its own: a capacity run replaces just that
        # section of an existing file, and a full run keeps the section it finds.
        old = ""
        if os.path.exists(md_path):
            with open(md_path) as f:
                old = f.read()
        if capacity_run and old:
            text = splice_capacity_section(old, text).rstrip("\n")
        elif not capacity_run:
            text = splice_capacity_section(text, existing_capacity_section(old))
        with open(md_path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print()
    print("Target verdicts (medians of same-run ratios):")
    for line in verdict_lines(doc):
        print(line)
    sys.stdout.flush()  # the verdicts before the notes on stderr, also in a pipe
    failed = [r for r in doc["runs"] if "error" in r]
    if failed:
        print(f"{len(failed)} measurement(s) failed: see the report", file=sys.stderr)
    for path in (json_path, md_path):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())

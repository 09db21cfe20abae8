"""One benchmark run: every series, payload and kind, repeated, into one JSON-able dict.

Repetitions are the outer loop: each repetition measures everything once, so the ratios
between series are taken between numbers measured within seconds of each other (same-run
ratios), and the report gives the median of those per-repetition ratios. That is what keeps
a noisy, shared 2-core machine usable for comparisons: a burst of load from elsewhere slows a
whole repetition, not one series.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..memory import format_size
from .harness import BenchError, Plan, SuiteContext, Transport, measure, queue_depth
from .transports.references import measure_memcpy

__all__ = [
    "CAPACITY_PAYLOADS",
    "DEFAULT_CAPACITIES",
    "DEFAULT_PAYLOADS",
    "SERIES",
    "Series",
    "SuiteConfig",
    "capacity_key",
    "run_suite",
    "summarize",
]

SCHEMA = 1
DEFAULT_PAYLOADS = (64, 4096, 1 << 20)
#: Payload of the memcpy reference and of the written-and-copied variant.
COPY_PAYLOAD = 1 << 20
#: The capacity axis (``ivshmem bench --capacities``): the channel's written-and-copied
#: stream and round trip at each ring capacity, iceoryx2's written-and-copied at its own queue
#: depth in the same repetition, for these payloads.
CAPACITY_PAYLOADS = (64 << 10, 1 << 20)
DEFAULT_CAPACITIES = (4 << 20, 32 << 20, 64 << 20, 256 << 20)
#: Series of the capacity axis: (key, whether it runs once per capacity).
CAPACITY_SERIES = (("ivshmem_spin+copy", True), ("iceoryx2+copy", False))


#: The capacity axis's one-process pseudo-series (bench/placement.py): the default hot window,
#: and the window set to the whole capacity (records placed as before the window existed).
PLACEMENT = (("placement_window", True), ("placement_whole", False))


def capacity_key(series: str, capacity: int) -> str:
    """The results key of ``series`` measured with a ring of ``capacity`` bytes."""
    return f"{series}@{capacity}"


@dataclass(frozen=True)
class Series:
    """One line in the tables: a transport, possibly in its copy variant."""

    key: str
    module: str
    cls: str
    #: "" (the transport's default use), "copy", "bytes" or "unpinned": Transport.variants.
    variant: str = ""

    def load(self) -> type[Transport]:
        module = importlib.import_module(f"ivshmem.bench.transports.{self.module}")
        cls: type[Transport] = getattr(module, self.cls)
        return cls

    def label(self) -> str:
        cls = self.load()
        if not self.variant:
            # Zero-copy rows only stamp and check the ends of the payload: say so, since their
            # bytes/s is the rate of handing over buffers, not of moving bytes.
            return f"{cls.label}, zero-copy" if cls.zero_copy else cls.label
        suffix = {
            "copy": ", written + copied",
            "bytes": ", bytes API",
            "batch": ", bytes API, batched",
            "unpinned": ", unpinned",
        }[self.variant]
        return cls.label + suffix


#: Every series, in table order: ours, the stdlib, third parties, then the references.
SERIES: tuple[Series, ...] = (
    Series("ivshmem_spin", "channel", "ChannelSpinning"),
    Series("ivshmem_block", "channel", "ChannelBlocking"),
    Series("ivshmem_spin+bytes", "channel", "ChannelSpinning", "bytes"),
    Series("ivshmem_block+bytes", "channel", "ChannelBlocking", "bytes"),
    Series("ivshmem_spin+copy", "channel", "ChannelSpinning", "copy"),
    Series("ivshmem_block+copy", "channel", "ChannelBlocking", "copy"),
    Series("ivshmem_spin+batch", "channel", "ChannelSpinning", "batch"),
    Series("ivshmem_block+batch", "channel", "ChannelBlocking", "batch"),
    Series("pipe", "ospipe", "OsPipe"),
    Series("mp_pipe", "mp_pipe", "MpPipe"),
    Series("mp_queue", "mp_queue", "MpQueue"),
    Series("faster_fifo", "fifo", "FasterFifo"),
    Series("zmq_ipc", "zmq_ipc", "ZmqIpc"),
    Series("zmq_ipc+unpinned", "zmq_ipc", "ZmqIpc", "unpinned"),
    Series("iceoryx2", "iceoryx", "Iceoryx2"),
    Series("iceoryx2+copy", "iceoryx", "Iceoryx2", "copy"),
    Series("ref_eventfd", "references", "EventfdPingPong"),
    Series("ref_spin", "references", "SpinBytePingPong"),
)
SERIES_BY_KEY = {s.key: s for s in SERIES}
#: The pseudo-series of the copy reference (not a transport).
MEMCPY = "ref_memcpy"


@dataclass
class SuiteConfig:
    repetitions: int = 5
    plan: Plan = field(default_factory=Plan)
    payloads: tuple[int, ...] = DEFAULT_PAYLOADS
    #: Series keys to run (None: all); "ref_memcpy" selects the copy reference.
    only: frozenset[str] | None = None
    #: CPU placement, see harness.pin_cpu: "apart" or "never".
    pin: str = "apart"
    #: Spin budget (seconds) of the channel in blocking mode.
    block_spin: float = 0.0
    #: Ring capacities of the capacity axis; when given, the run measures that axis only
    #: (CAPACITY_SERIES at ``payloads``), not the main tables.
    capacities: tuple[int, ...] = ()

    def wants(self, key: str) -> bool:
        return self.only is None or key in self.only


@dataclass(frozen=True)
class Job:
    series: Series
    kind: str
    payload: int
    #: The channel's ring capacity (the capacity axis), None: the transport's default.
    capacity: int | None = None

    @property
    def key(self) -> str:
        key = self.series.key
        return key if self.capacity is None else capacity_key(key, self.capacity)


def plan_jobs(config: SuiteConfig) -> list[Job]:
    """What one repetition measures, in order."""
    jobs: list[Job] = []
    if config.capacities:
        # Both kinds in the copy variant: a ring's capacity matters when bytes are touched.
        for kind in ("stream", "rtt"):
            for payload in config.payloads:
                for key, per_capacity in CAPACITY_SERIES:
                    if not config.wants(key):
                        continue
                    series = SERIES_BY_KEY[key]
                    caps: tuple[int | None, ...] = config.capacities if per_capacity else (None,)
                    jobs.extend(Job(series, kind, payload, cap) for cap in caps)
        return jobs
    for kind in ("stream", "rtt"):
        for payload in config.payloads:
            for s in SERIES:
                if not config.wants(s.key):
                    continue
                cls = s.load()
                if kind not in cls.kinds:
                    continue
                if s.variant == "copy" and (kind != "stream" or payload != COPY_PAYLOAD):
                    continue
                if s.key.startswith("ref_") and payload != config.payloads[0]:
                    continue  # the ping-pongs carry no payload: once per repetition
                jobs.append(Job(s, kind, payload))
    return jobs


def machine_info() -> dict[str, Any]:
    """What the numbers depend on, recorded with them."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            if not idx.startswith("index"):
                continue
            with open(f"{base}/{idx}/level") as f:
                level = f.read().strip()
            with open(f"{base}/{idx}/type") as f:
                ctype = f.read().strip()
            with open(f"{base}/{idx}/size") as f:
                size = f.read().strip()
            caches[f"L{level} {ctype}"] = size
    except OSError:
        pass
    info["caches"] = caches
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    from importlib import metadata

    for dist in ("ivshmem", "pyzmq", "iceoryx2", "faster-fifo", "numpy", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    info["versions"] = versions
    from ..channel import ring

    info["channel_core"] = "C" if ring.ACCELERATED else "Python"
    return info


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _describe(job: Job, result: dict[str, Any]) -> str:
    if job.kind == "stream":
        rate = result.get("msgs_per_s")
        if not rate:
            return "no rate (run too short)"
        return f"{rate:,.0f} msg/s, {rate * job.payload / 1e6:,.1f} MB/s"
    if "p50_us" not in result:
        return "no samples (run too short)"
    return f"p50 {result['p50_us']:.1f} us, p99 {result['p99_us']:.1f} us"


def run_suite(config: SuiteConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure everything ``config`` selects; return the results document (see report.py)."""
    say = progress or (lambda _msg: None)
    tmpdir = tempfile.mkdtemp(prefix="ivb-", dir="/tmp")  # short: Unix socket paths
    ctx = SuiteContext(tmpdir=tmpdir, pin=config.pin, options={"block_spin": config.block_spin})
    series_info: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    axis = dict(CAPACITY_SERIES) if config.capacities else None
    for s in SERIES:
        if not config.wants(s.key) or (axis is not None and s.key not in axis):
            continue
        cls = s.load()
        reason = cls.unavailable()
        series_info[s.key] = {
            "label": s.label(),
            "transport": cls.key,
            "variant": s.variant,
            "zero_copy": cls.zero_copy,
            "notes": cls.notes_for(s.variant),
            "available": reason is None,
            "reason": reason,
        }
        if reason is not None:
            unavailable[s.key] = reason
            say(f"{s.key}: unavailable: {reason}")
        if axis is not None and axis[s.key]:
            base = series_info.pop(s.key)
            for cap in config.capacities:
                series_info[capacity_key(s.key, cap)] = {
                    **base,
                    "label": f"{base['label']}, {format_size(cap)} ring",
                    "capacity": cap,
                }
    if axis is not None:
        for key, window in PLACEMENT:
            for cap in config.capacities:
                series_info[capacity_key(key, cap)] = {
                    "label": f"one process, {'hot window' if window else 'whole ring'}, "
                    f"{format_size(cap)} ring",
                    "transport": key,
                    "variant": "",
                    "zero_copy": False,
                    "notes": "the ring alone in one process, written + copied with a receiver "
                    "that always keeps up (ivshmem.bench.placement): "
                    + (
                        "the default hot window"
                        if window
                        else "window = capacity, the placement before the hot window existed"
                    ),
                    "available": True,
                    "reason": None,
                    "capacity": cap,
                }
    if config.wants(MEMCPY) and axis is None:
        series_info[MEMCPY] = {
            "label": "memcpy 1 MiB (reference)",
            "transport": MEMCPY,
            "variant": "",
            "zero_copy": False,
            "notes": "copy 1 MiB within one process: numpy copyto and memoryview slice "
            "assignment, the faster counts; 'hot' copies one buffer again and again (it stays "
            "in cache), 'cold' walks a 16 MiB ring like the channel's",
            "available": True,
            "reason": None,
        }
    jobs = [j for j in plan_jobs(config) if j.series.key not in unavailable]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "repetitions": config.repetitions,
            "warmup_s": config.plan.warmup,
            "duration_s": config.plan.duration,
            "max_messages": config.plan.max_messages,
            "payloads": list(config.payloads),
            "pin": config.pin,
            "block_spin_s": config.block_spin,
            "capacities": list(config.capacities),
            "queue_budget": {str(p): queue_depth(p) for p in config.payloads},
        },
        "series": series_info,
        "runs": [],
        "load_average": {"start": _load()},
    }
    started = time.monotonic()
    classes = {j.series.load() for j in jobs}
    try:
        for cls in classes:
            cls.start(ctx)
        for rep in range(config.repetitions):
            if config.wants(MEMCPY) and COPY_PAYLOAD in config.payloads and axis is None:
                for variant in ("hot", "cold"):
                    entry: dict[str, Any] = {
                        "series": MEMCPY,
                        "kind": f"memcpy_{variant}",
                        "payload": COPY_PAYLOAD,
                        "rep": rep,
                    }
                    try:
                        entry["result"] = measure_memcpy(ctx, config.plan, COPY_PAYLOAD, variant)
                        rate = entry["result"]["bytes_per_s"] / 1e9
                        say(f"rep {rep + 1}/{config.repetitions} memcpy {variant}: {rate:.2f} GB/s")
                    except BenchError as err:
                        entry["error"] = str(err)
                        say(f"rep {rep + 1}/{config.repetitions} memcpy {variant}: FAILED {err}")
                    doc["runs"].append(entry)
            if axis is not None:
                _measure_placement(config, rep, doc["runs"], say)
            for job in jobs:
                entry = {
                    "series": job.key,
                    "kind": job.kind,
                    "payload": job.payload,
                    "rep": rep,
                }
                if job.capacity is not None:
                    entry["capacity"] = job.capacity
                cls = job.series.load()
                what = (
                    f"rep {rep + 1}/{config.repetitions} {job.kind} {format_size(job.payload)} "
                    f"{job.key}"
                )
                try:
                    transport = cls(
                        ctx, job.payload, job.kind, job.series.variant, capacity=job.capacity
                    )
                    entry["result"] = measure(transport, config.plan)
                    say(f"{what}: {_describe(job, entry['result'])}")
                except Exception as err:  # one broken transport must not end the run
                    text = (
                        str(err) if isinstance(err, BenchError) else f"{type(err).__name__}: {err}"
                    )
                    entry["error"] = text
                    say(f"{what}: FAILED {text.splitlines()[0]}")
                doc["runs"].append(entry)
    finally:
        for cls in classes:
            try:
                cls.finish(ctx)
            except Exception as err:  # cleanup must not hide the results
                say(f"{cls.key}: cleanup failed: {err!r}")
        shutil.rmtree(tmpdir, ignore_errors=True)
    doc["load_average"]["end"] = _load()
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["summary"] = summarize(doc)
    from .report import evaluate_targets

    doc["targets"] = evaluate_targets(doc)
    return doc


def _measure_placement(
    config: SuiteConfig, rep: int, runs: list[dict[str, Any]], say: Callable[[str], None]
) -> None:
    """One repetition of the capacity axis's one-process table: for every payload and
    capacity, the hot window and the whole ring one right after the other."""
    from .placement import measure_placement

    for payload in config.payloads:
        for cap in config.capacities:
            for key, window in PLACEMENT:
                entry: dict[str, Any] = {
                    "series": capacity_key(key, cap),
                    "kind": "placement",
                    "payload": payload,
                    "rep": rep,
                    "capacity": cap,
                }
                try:
                    rate = measure_placement(cap, payload, window, config.plan.duration)
                    entry["result"] = {"bytes_per_s": rate}
                    say(
                        f"rep {rep + 1}/{config.repetitions} placement {format_size(payload)} "
                        f"{entry['series']}: {rate / 1e9:.2f} GB/s"
                    )
                except (OSError, RuntimeError) as err:
                    entry["error"] = str(err)
                    say(f"placement {entry['series']}: FAILED {err}")
                runs.append(entry)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Medians over repetitions of every measured number, per series, kind and payload."""
    fields = {
        "stream": ("msgs_per_s", "bytes_per_s"),
        "rtt": ("p50_us", "p90_us", "p99_us", "mean_us"),
        "memcpy_hot": ("bytes_per_s",),
        "memcpy_cold": ("bytes_per_s",),
        "placement": ("bytes_per_s",),
    }
    out: dict[str, Any] = {}
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in doc["runs"]:
        groups.setdefault((run["kind"], run["series"], run["payload"]), []).append(run)
    for (kind, series, payload), runs in groups.items():
        ok = [r["result"] for r in runs if "result" in r]
        cell: dict[str, Any] = {
            "repetitions": len(runs),
            "failures": [r["error"] for r in runs if "error" in r],
        }
        for name in fields.get(kind, ()):
            values = [r[name] for r in ok if r.get(name) is not None]
            cell[name] = _median(values)
        out.setdefault(kind, {}).setdefault(series, {})[str(payload)] = cell
    return out

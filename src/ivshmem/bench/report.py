"""Turning a results document (see :mod:`ivshmem.bench.suite`) into same-run ratios, target
verdicts, a Markdown report and PNG charts.

A *same-run ratio* divides two numbers measured in the same repetition; the report shows the
median over repetitions of those ratios, which is robust against load that comes and goes
between repetitions. Every ratio reads "this series divided by that one": for throughput,
higher is better; for latency, lower is better.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..memory import format_size

__all__ = [
    "CAPACITY_BEGIN",
    "CAPACITY_END",
    "TARGETS",
    "Target",
    "capacity_targets",
    "evaluate_targets",
    "existing_capacity_section",
    "render_capacity_section",
    "render_markdown",
    "same_run_ratio",
    "splice_capacity_section",
    "write_charts",
    "write_json",
]

#: pyzmq is compared at its best placement: the faster of pinned and unpinned, per repetition
#: (its I/O thread shares the process's CPU when pinned; see harness.pin_cpu).
PYZMQ = ("zmq_ipc", "zmq_ipc+unpinned")
ICEORYX = "iceoryx2"
EVENTFD = "ref_eventfd"
SPIN = "ref_spin"
MEMCPY = "ref_memcpy"
MIB = 1 << 20
#: Shown for a number that was not measured (an en dash), and the "times" sign of ratios.
NONE = "\u2013"
TIMES = "\u00d7"


#: (series, kind, payload, metric); the series may be a tuple of alternatives, of which the
#: best in each repetition counts (highest rate, lowest latency); payload None matches any.
Measure = tuple[str | tuple[str, ...], str, int | None, str]


def _value(
    doc: dict[str, Any],
    series: str | tuple[str, ...],
    kind: str,
    payload: int | None,
    rep: int,
    metric: str,
) -> float | None:
    names = (series,) if isinstance(series, str) else series
    found: list[float] = []
    for run in doc["runs"]:
        if (
            run["series"] in names
            and run["kind"] == kind
            and run["rep"] == rep
            and (payload is None or run["payload"] == payload)
            and "result" in run
            and run["result"].get(metric) is not None
        ):
            found.append(float(run["result"][metric]))
    if not found:
        return None
    return min(found) if metric.endswith("_us") else max(found)


def same_run_ratio(doc: dict[str, Any], num: Measure, den: Measure) -> dict[str, Any] | None:
    """Median over repetitions of ``num / den`` (see :data:`Measure`); None when the two were
    never measured in the same repetition."""
    per_rep: list[float] = []
    for rep in range(doc["config"]["repetitions"]):
        a = _value(doc, num[0], num[1], num[2], rep, num[3])
        b = _value(doc, den[0], den[1], den[2], rep, den[3])
        if a is not None and b:
            per_rep.append(a / b)
    if not per_rep:
        return None
    return {"median": statistics.median(per_rep), "per_rep": per_rep}


@dataclass(frozen=True)
class Target:
    name: str
    num: Measure
    den: Measure
    op: str  # ">=" or "<="
    threshold: float


def _targets() -> tuple[Target, ...]:
    """The targets of issue 4, for both channel modes and both of its APIs (zero-copy and
    bytes): each is reported on its own line, nothing is picked as a best-of."""
    out: list[Target] = []
    modes = (("spinning", "ivshmem_spin"), ("blocking", "ivshmem_block"))
    apis = (("zero-copy API", ""), ("bytes API", "+bytes"))
    stream_apis = (*apis, ("bytes API, send_many/recv_many", "+batch"))
    for mode, key in modes:
        for api, suffix in stream_apis:
            num = (key + suffix, "stream", 64, "msgs_per_s")
            for other, name, want in ((PYZMQ, "pyzmq ipc", 2.0), (ICEORYX, "iceoryx2", 4.0)):
                out.append(
                    Target(
                        f"64 B stream, {mode} channel ({api}) ÷ {name}",
                        num,
                        (other, "stream", 64, "msgs_per_s"),
                        ">=",
                        want,
                    )
                )
    for mode, key, ref, name, want in (
        ("spinning", "ivshmem_spin", SPIN, "spin-byte reference", 5.0),
        ("blocking", "ivshmem_block", EVENTFD, "eventfd reference", 1.3),
    ):
        for api, suffix in apis:
            out.append(
                Target(
                    f"64 B round trip p50, {mode} channel ({api}) ÷ {name}",
                    (key + suffix, "rtt", 64, "p50_us"),
                    (ref, "rtt", None, "p50_us"),
                    "<=",
                    want,
                )
            )
    for mode, key in modes:
        for api, suffix in (("written + copied", "+copy"), ("bytes API", "+bytes")):
            # Against both copy references: "hot" copies 1 MiB within the cache, "cold" walks a
            # 16 MiB ring as the channel's own 1 MiB stream does.
            for ref, which in (("memcpy_hot", "cache-hot"), ("memcpy_cold", "cold")):
                out.append(
                    Target(
                        f"1 MiB stream, {mode} channel ({api}) ÷ {which} memcpy rate",
                        (key + suffix, "stream", MIB, "bytes_per_s"),
                        (MEMCPY, ref, MIB, "bytes_per_s"),
                        ">=",
                        0.7,
                    )
                )
    return tuple(out)


TARGETS = _targets()

#: The capacity axis (issue 12): its channel series and reference.
CAP_SERIES = "ivshmem_spin+copy"
CAP_ICEORYX = "iceoryx2+copy"
CAP_BASE = 4 << 20


def _cap_key(capacity: int) -> str:
    return f"{CAP_SERIES}@{capacity}"


def capacity_targets(doc: dict[str, Any]) -> tuple[Target, ...]:
    """Issue 12's targets for the large rings measured in ``doc``: the 1 MiB written-and-copied
    stream at >= 0.9x the 4 MiB ring's rate and >= 1.0x iceoryx2's, and its round-trip p99 at
    <= 1.5x the 4 MiB ring's."""
    caps = [c for c in doc["config"].get("capacities") or () if c >= 64 << 20]
    if CAP_BASE not in (doc["config"].get("capacities") or ()):
        return ()
    out: list[Target] = []
    base = _cap_key(CAP_BASE)
    for cap in caps:
        key, size = _cap_key(cap), _payload(cap)
        out.append(
            Target(
                f"1 MiB stream written + copied, {size} ring ÷ 4 MiB ring",
                (key, "stream", MIB, "bytes_per_s"),
                (base, "stream", MIB, "bytes_per_s"),
                ">=",
                0.9,
            )
        )
        out.append(
            Target(
                f"1 MiB stream written + copied, {size} ring ÷ iceoryx2 written + copied",
                (key, "stream", MIB, "bytes_per_s"),
                (CAP_ICEORYX, "stream", MIB, "bytes_per_s"),
                ">=",
                1.0,
            )
        )
        out.append(
            Target(
                f"1 MiB round trip p99 written + copied, {size} ring ÷ 4 MiB ring",
                (key, "rtt", MIB, "p99_us"),
                (base, "rtt", MIB, "p99_us"),
                "<=",
                1.5,
            )
        )
    return tuple(out)


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdicts of a run: the main targets, or for a capacity-axis run its own."""
    out = []
    targets = capacity_targets(doc) if doc["config"].get("capacities") else TARGETS
    for t in targets:
        r = same_run_ratio(doc, t.num, t.den)
        verdict = "not measured"
        if r is not None:
            ok = r["median"] >= t.threshold if t.op == ">=" else r["median"] <= t.threshold
            verdict = "met" if ok else "missed"
        out.append(
            {
                "target": t.name,
                "op": t.op,
                "threshold": t.threshold,
                "median": None if r is None else r["median"],
                "per_rep": None if r is None else r["per_rep"],
                "verdict": verdict,
            }
        )
    return out


def verdict_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for t in doc.get("targets") or evaluate_targets(doc):
        value = "n/a" if t["median"] is None else f"{t['median']:.2f}"
        lines.append(
            f"{t['verdict'].upper():>12}  {t['target']}: {value} (target {t['op']} "
            f"{t['threshold']:g})"
        )
    return lines


# -- formatting -------------------------------------------------------------------------------


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return NONE
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _us(x: float | None) -> str:
    if x is None:
        return NONE
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def _ratio(r: dict[str, Any] | None) -> str:
    if r is None:
        return NONE
    x = r["median"]
    return f"{x:,.0f}{TIMES}" if x >= 1000 else f"{x:.3g}{TIMES}"


def _payload(p: int) -> str:
    text = format_size(p)
    if text.endswith("B"):
        return f"{p} B"
    return f"{text[:-1]} {text[-1]}iB"


def _cell(doc: dict[str, Any], kind: str, series: str, payload: int | None) -> dict[str, Any]:
    by_payload = doc["summary"].get(kind, {}).get(series, {})
    if payload is None:
        return next(iter(by_payload.values()), {})
    cell: dict[str, Any] = by_payload.get(str(payload), {})
    return cell


def _series_order(doc: dict[str, Any], keys: Iterable[str]) -> list[str]:
    order = list(doc["series"])
    return sorted(set(keys), key=lambda k: order.index(k) if k in order else len(order))


def _label(doc: dict[str, Any], key: str) -> str:
    info = doc["series"].get(key)
    return str(info["label"]) if info else key


# -- Markdown ---------------------------------------------------------------------------------


#: The markers around the capacity-axis section in docs/benchmarks.md: a capacity run
#: (``ivshmem bench --capacities --docs``) replaces what is between them, and a full run
#: (``--docs``) keeps it.
CAPACITY_BEGIN = "<!-- capacity-axis: begin (ivshmem bench --capacities --docs) -->"
CAPACITY_END = "<!-- capacity-axis: end -->"


def render_capacity_section(doc: dict[str, Any]) -> str:
    """The capacity axis as one Markdown section (between the markers)."""
    cfg = doc["config"]
    m = doc["machine"]
    caps: list[int] = list(cfg.get("capacities") or ())
    lines: list[str] = []
    add = lines.append
    add(CAPACITY_BEGIN)
    add("## Ring capacity")
    add("")
    add(
        "Does a bigger ring cost speed? The spinning channel's written-and-copied stream and "
        "round trip (the producer writes every byte of each message into `reserve()`d room, "
        "the consumer copies each `recv_view()` out) at several ring capacities, next to "
        "iceoryx2 written + copied (its own queue depth) in the same repetitions. A sender "
        "whose receiver keeps up works within the first "
        "`ivshmem.channel.ring.HOT_WINDOW` bytes of its ring, so the capacity should not "
        "matter; it fills the whole ring only when the receiver falls behind. (On a loaded "
        "machine the receiver falls behind whenever the scheduler takes its CPU away, and a "
        "bigger ring then lets the producer run further ahead into memory the caches do not "
        "hold: there, the large rings' numbers show the load as much as the ring; "
        "`benchmarks/bench_ring_window.py` measures the placement alone, in one process.)"
    )
    add("")
    add(
        f"Run of {doc['started']} on {m.get('cpu_model', '?')} ({m.get('cpus_online')} CPUs), "
        f"{cfg['repetitions']} repetitions, {cfg['duration_s']:g} s measured "
        f"(+{cfg['warmup_s']:g} s warm-up) per number, {doc.get('elapsed_s', '?')} s in all; "
        f"load average at start {doc['load_average'].get('start')}, at end "
        f"{doc['load_average'].get('end')} (the machine was shared: compare the same-run "
        "ratios, not the absolute rates, with the tables above, which come from another run)."
        " Regenerate this section alone with `ivshmem bench --capacities --docs`."
    )
    add("")
    targets = doc.get("targets") or evaluate_targets(doc)
    if targets:
        add("| target | median same-run ratio | wanted | verdict |")
        add("|---|---:|---:|---|")
        for t in targets:
            value = NONE if t["median"] is None else f"{t['median']:.3g}"
            add(f"| {t['target']} | {value} | {t['op']} {t['threshold']:g} | **{t['verdict']}** |")
        add("")
    base = _cap_key(CAP_BASE) if CAP_BASE in caps else None
    for payload in cfg["payloads"]:
        add(f"### {_payload(payload)} messages")
        add("")
        add(
            "| ring | stream bytes/s | ÷ 4 MiB ring | ÷ iceoryx2 | round trip p50 µs | "
            "p99 µs | p99 ÷ 4 MiB ring |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|")
        rows: list[tuple[str, str]] = [(_payload(c), _cap_key(c)) for c in caps]
        rows.append(("iceoryx2 written + copied", CAP_ICEORYX))
        for name, key in rows:
            st = _cell(doc, "stream", key, payload)
            rt = _cell(doc, "rtt", key, payload)
            ours = key != CAP_ICEORYX
            vs_base = (
                same_run_ratio(
                    doc, (key, "stream", payload, "bytes_per_s"),
                    (base, "stream", payload, "bytes_per_s"),
                )
                if base and ours else None
            )  # fmt: skip
            vs_iox = same_run_ratio(
                doc,
                (key, "stream", payload, "bytes_per_s"),
                (CAP_ICEORYX, "stream", payload, "bytes_per_s"),
            )
            p99_base = (
                same_run_ratio(
                    doc, (key, "rtt", payload, "p99_us"), (base, "rtt", payload, "p99_us")
                )
                if base and ours else None
            )  # fmt: skip
            add(
                f"| {name} | {_si(st.get('bytes_per_s'), 'B/s')} | {_ratio(vs_base)} | "
                f"{_ratio(vs_iox) if ours else NONE} | {_us(rt.get('p50_us'))} | "
                f"{_us(rt.get('p99_us'))} | {_ratio(p99_base)} |"
            )
        add("")
    add("### Placement alone (one process)")
    add("")
    add(
        "The same written-and-copied messages through one ring in one process, with a receiver "
        "that always keeps up (`ivshmem.bench.placement`; also `benchmarks/bench_ring_window.py`"
        "): no second process, so no scheduling in the number, only where the bytes land. "
        "*Whole ring* sets the window to the capacity: records are placed as before the hot "
        "window existed. Each pair is measured one right after the other."
    )
    add("")
    add("| message | ring | hot window | whole ring (as before) | hot window ÷ whole ring |")
    add("|---|---|---:|---:|---:|")
    for payload in cfg["payloads"]:
        for cap in caps:
            win, whole = f"placement_window@{cap}", f"placement_whole@{cap}"
            a = _cell(doc, "placement", win, payload).get("bytes_per_s")
            b = _cell(doc, "placement", whole, payload).get("bytes_per_s")
            r = same_run_ratio(
                doc,
                (win, "placement", payload, "bytes_per_s"),
                (whole, "placement", payload, "bytes_per_s"),
            )
            add(
                f"| {_payload(payload)} | {_payload(cap)} | {_si(a, 'B/s')} | "
                f"{_si(b, 'B/s')} | {_ratio(r)} |"
            )
    add("")
    failures = [r for r in doc["runs"] if "error" in r]
    for r in failures:
        first = r["error"].splitlines()[0]
        add(f"- failed: {r['series']} {r['kind']} {_payload(r['payload'])} rep {r['rep']}: {first}")
    if failures:
        add("")
    add(CAPACITY_END)
    return "\n".join(lines)


def splice_capacity_section(text: str, section: str) -> str:
    """``text`` (a benchmarks.md) with its capacity section replaced by ``section`` (appended
    when it has none yet); an empty ``section`` keeps what ``text`` has."""
    start, end = text.find(CAPACITY_BEGIN), text.find(CAPACITY_END)
    if start >= 0 and end > start:
        if not section:
            return text
        return text[:start] + section + text[end + len(CAPACITY_END) :]
    if not section:
        return text
    return text.rstrip("\n") + "\n\n" + section + "\n"


def existing_capacity_section(text: str) -> str:
    """The capacity section of a benchmarks.md, or ''."""
    start, end = text.find(CAPACITY_BEGIN), text.find(CAPACITY_END)
    if start >= 0 and end > start:
        return text[start : end + len(CAPACITY_END)]
    return ""


def render_markdown(doc: dict[str, Any], charts: dict[str, str] | None = None) -> str:
    """The whole report. ``charts`` maps chart names to image paths relative to the file."""
    if doc["config"].get("capacities"):
        return render_capacity_section(doc)
    cfg = doc["config"]
    m = doc["machine"]
    lines: list[str] = []
    add = lines.append
    add("# Benchmarks: messages between two Python processes")
    add("")
    add(
        "<!-- Generated by `scripts/bench-docs.sh` (`ivshmem bench --docs`); do not edit: "
        "rerun it. -->"
    )
    add("")
    add(
        f"Run of {doc['started']} on {m.get('cpu_model', '?')} ({m.get('cpus_online')} CPUs), "
        f"Linux {m.get('kernel')}, Python {m.get('python')}; {cfg['repetitions']} repetitions, "
        f"{cfg['duration_s']:g} s measured (+{cfg['warmup_s']:g} s warm-up) per number, "
        f"{doc.get('elapsed_s', '?')} s in all. Load average at start "
        f"{doc['load_average'].get('start')}, at end {doc['load_average'].get('end')}."
    )
    add("")
    add(
        "Every number is the median over the repetitions; every ratio is the median of "
        "**same-run ratios** (both numbers from the same repetition), written as *this ÷ that*. "
        "For throughput higher is better, for latency lower is better. *÷ pyzmq* divides by "
        "pyzmq at its better placement in that repetition (pinned or unpinned, see below)."
    )
    add("")

    add("## Targets")
    add("")
    add("| target | median same-run ratio | wanted | verdict |")
    add("|---|---:|---:|---|")
    for t in doc.get("targets") or evaluate_targets(doc):
        value = NONE if t["median"] is None else f"{t['median']:.3g}"
        add(f"| {t['target']} | {value} | {t['op']} {t['threshold']:g} | **{t['verdict']}** |")
    add("")

    add("## Stream throughput")
    add("")
    add(
        "One producer process sends as fast as it can, one consumer process receives and "
        "checks every message (sequence number at both ends of the payload; a stop message "
        "carries the count, so a lost, doubled or reordered message fails the run)."
    )
    add("")
    stream = doc["summary"].get("stream", {})
    for payload in cfg["payloads"]:
        keys = _series_order(doc, [k for k, v in stream.items() if str(payload) in v])
        if not keys:
            continue
        add(f"### {_payload(payload)}")
        add("")
        big = payload == MIB
        head = "| transport | messages/s | bytes/s | ÷ pyzmq | ÷ iceoryx2 |"
        rule = "|---|---:|---:|---:|---:|"
        if big:
            head += " ÷ memcpy (hot) | ÷ memcpy (cold) |"
            rule += "---:|---:|"
        add(head)
        add(rule)
        for key in keys:
            c = _cell(doc, "stream", key, payload)
            row = (
                f"| {_label(doc, key)} | {_si(c.get('msgs_per_s'))} | "
                f"{_si(c.get('bytes_per_s'), 'B/s')} | "
                f"{_ratio(same_run_ratio(doc, (key, 'stream', payload, 'msgs_per_s'), (PYZMQ, 'stream', payload, 'msgs_per_s')))} | "  # noqa: E501
                f"{_ratio(same_run_ratio(doc, (key, 'stream', payload, 'msgs_per_s'), (ICEORYX, 'stream', payload, 'msgs_per_s')))} |"  # noqa: E501
            )
            if big:
                for variant in ("memcpy_hot", "memcpy_cold"):
                    r = same_run_ratio(
                        doc,
                        (key, "stream", payload, "bytes_per_s"),
                        (MEMCPY, variant, MIB, "bytes_per_s"),
                    )
                    row += f" {_ratio(r)} |"
            add(row)
        add("")

    add("## Round trip")
    add("")
    add(
        "The pinger sends one message and waits for the ponger to send it back (same size); "
        "one sample per round trip, p50 and p99 over all samples of a repetition."
    )
    add("")
    add(
        "| transport | payload | p50 µs | p99 µs | p50 ÷ eventfd | p50 ÷ spin byte | "
        "p50 ÷ pyzmq | p50 ÷ iceoryx2 |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    rtt = doc["summary"].get("rtt", {})
    for payload in cfg["payloads"]:
        for key in _series_order(doc, [k for k in rtt if not k.startswith("ref_")]):
            c = _cell(doc, "rtt", key, payload)
            if not c:
                continue
            num = (key, "rtt", payload, "p50_us")
            add(
                f"| {_label(doc, key)} | {_payload(payload)} | {_us(c.get('p50_us'))} | "
                f"{_us(c.get('p99_us'))} | "
                f"{_ratio(same_run_ratio(doc, num, (EVENTFD, 'rtt', None, 'p50_us')))} | "
                f"{_ratio(same_run_ratio(doc, num, (SPIN, 'rtt', None, 'p50_us')))} | "
                f"{_ratio(same_run_ratio(doc, num, (PYZMQ, 'rtt', payload, 'p50_us')))} | "
                f"{_ratio(same_run_ratio(doc, num, (ICEORYX, 'rtt', payload, 'p50_us')))} |"
            )
    add("")

    add("## Physical references (same run)")
    add("")
    add("| reference | result |")
    add("|---|---|")
    for key in (EVENTFD, SPIN):
        c = _cell(doc, "rtt", key, None)
        if c:
            add(
                f"| {_label(doc, key)} | p50 {_us(c.get('p50_us'))} µs, "
                f"p99 {_us(c.get('p99_us'))} µs |"
            )
    for variant in ("hot", "cold"):
        c = _cell(doc, f"memcpy_{variant}", MEMCPY, MIB)
        if c.get("bytes_per_s"):
            add(
                f"| memcpy 1 MiB, {variant} | {c['bytes_per_s'] / 1e9:.3g} GB/s "
                f"(= {c['bytes_per_s'] / MIB:,.0f} messages of 1 MiB per second) |"
            )
    add("")

    if charts:
        add("## Charts")
        add("")
        for name, path in charts.items():
            add(f"![{name}]({path})")
            add("")

    add("## How it was measured")
    add("")
    pin = {
        "apart": "pinned to different CPUs with os.sched_setaffinity (except the *unpinned* "
        "rows): spinning sides that share a CPU wait for a scheduler tick, and blocking "
        "ones left free are bimodal (a wake-up on the same CPU is several times cheaper than "
        "one sent to the other CPU), which would make same-run ratios a matter of luck",
        "never": "not pinned",
    }.get(str(cfg["pin"]), str(cfg["pin"]))
    add(f"- Two fresh processes per number (fork), {pin}; the parent only coordinates.")
    add(
        "- Each side's link is opened, then both wait until the transport is connected "
        "(e.g. the iceoryx2 subscriber is attached, a zmq hello went through) before timing."
    )
    add(
        f"- Warm-up {cfg['warmup_s']:g} s, then {cfg['duration_s']:g} s measured; stream "
        "throughput is timed by the consumer over its window, round trips by the pinger."
    )
    add(
        "- Queues get the same byte budget: 256 messages, at least 1 MiB and at most 16 MiB "
        "(pipes are capped by pipe-max-size); the channel ring is the next power of two."
    )
    add(
        "- Zero-copy transports (the channel, iceoryx2) stamp and check the payload in place; "
        "their *written + copied* variant at 1 MiB writes the whole payload into the loaned "
        "buffer and copies it out before checking (each a single memmove: memoryview slice "
        "assignment on both sides), which is what the memcpy ratio compares."
    )
    add(
        f"- The blocking channel spins {cfg['block_spin_s']:g} s before sleeping on its "
        "doorbell; the spinning channel never sleeps."
    )
    add(
        "- Rate memcpy allows: 1 MiB copied within one process (numpy copyto or memoryview "
        "slice assignment, whichever is faster). *Hot* copies the same buffer again and again "
        "(cache-resident); *cold* writes into a 16 MiB ring like a producer filling a channel."
    )
    add("")
    add("Reading the numbers:")
    add("")
    add(
        "- Both sides of every transport run the same Python loop: one method call per message "
        "and side plus the two sequence-number stamps. The eventfd reference pays all of that "
        "too; the spin-byte reference pays the loop and the calls but has no payload to stamp, "
        "so a ratio against it charges the stamps to the transport."
    )
    add(
        "- The machine is shared and small (see the load average): a p99 of milliseconds is a "
        "process that was preempted, not a property of the transport. Compare medians and "
        "same-run ratios; single repetitions can differ by a factor of two or more."
    )
    add(
        "- libzmq moves messages in its own I/O thread (C++) and batches them onto the socket, "
        "so its small-message stream is limited by the Python calls on each side rather than "
        "by a system call per message."
    )
    add(
        "- The zero-copy rows hand over buffers without touching the payload (only its ends are "
        "stamped and checked): their bytes/s is a rate of handing over, not of copying. The "
        "*written + copied* and *bytes API* rows move every byte."
    )
    add("")
    add("Machine:")
    add("")
    add(f"- CPU: {m.get('cpu_model', '?')}, usable CPUs {m.get('cpus_usable')}")
    if m.get("caches"):
        add("- Caches: " + ", ".join(f"{k} {v}" for k, v in m["caches"].items()))
    add(f"- OS: {m.get('os', '?')}, kernel {m.get('kernel')}, {m.get('machine')}")
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    add(f"- Python {m.get('python')}; {versions}")
    if m.get("channel_core"):
        add(
            f"- Channel ring hot paths: {m['channel_core']} "
            "(`ivshmem.channel.ring.ACCELERATED`; the C core is built by pip install)"
        )
    add("")

    add("## Transports")
    add("")
    for key, info in doc["series"].items():
        state = "" if info["available"] else f" — **unavailable**: {info['reason']}"
        add(f"- **{info['label']}** (`{key}`): {info['notes']}{state}")
    add("")

    counted = [
        (r, side, name, value)
        for r in doc["runs"]
        for side, stats in enumerate(r.get("result", {}).get("link_stats", []))
        for name, value in stats.items()
        if value
    ]
    if counted:
        add("## Transport events")
        add("")
        for r, side, name, value in counted:
            add(
                f"- {_label(doc, r['series'])}, {r['kind']} {_payload(r['payload'])} rep "
                f"{r['rep']}: side {side} {name} {value}"
            )
        add("")

    failures = [r for r in doc["runs"] if "error" in r]
    if failures:
        add("## Failed measurements")
        add("")
        for r in failures:
            first = r["error"].splitlines()[0]
            add(f"- {r['series']} {r['kind']} {_payload(r['payload'])} rep {r['rep']}: {first}")
        add("")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# -- charts ---------------------------------------------------------------------------------

_OURS = "#d62728"
_OURS_COPY = "#ff9896"
_OTHERS = "#7f7f7f"
_ZERO_COPY_OTHERS = "#1f77b4"


def _color(doc: dict[str, Any], key: str) -> str:
    info = doc["series"].get(key, {})
    if key.startswith("ivshmem"):
        return _OURS if not info.get("variant") else _OURS_COPY
    return _ZERO_COPY_OTHERS if info.get("zero_copy") and not info.get("variant") else _OTHERS


def write_charts(doc: dict[str, Any], outdir: str) -> dict[str, str]:
    """PNG charts into ``outdir``; returns {title: path}. Empty when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    os.makedirs(outdir, exist_ok=True)
    out: dict[str, str] = {}
    payloads = doc["config"]["payloads"]

    def panels(
        kind: str,
        metric: str,
        title: str,
        xlabel: str,
        fname: str,
        fmt: Any,
        refs: list[tuple[str, float, int | None]],
        whisker: str | None = None,
    ) -> None:
        data = doc["summary"].get(kind, {})
        rows = []
        for p in payloads:
            keys = [
                k
                for k in _series_order(doc, data)
                if not k.startswith("ref_") and data[k].get(str(p), {}).get(metric)
            ]
            if keys:
                rows.append((p, keys))
        if not rows:
            return
        height = sum(0.32 * len(keys) + 0.9 for _, keys in rows) + 0.8
        fig, axes = plt.subplots(
            len(rows),
            1,
            figsize=(9, height),
            squeeze=False,
            gridspec_kw={"height_ratios": [len(keys) + 1 for _, keys in rows]},
        )
        for ax, (p, keys) in zip(axes[:, 0], rows, strict=True):
            values = [data[k][str(p)][metric] for k in keys]
            ys = list(range(len(keys)))[::-1]
            ax.barh(ys, values, color=[_color(doc, k) for k in keys], height=0.7)
            if whisker:
                marks = [
                    (top, y)
                    for k, y in zip(keys, ys, strict=True)
                    if (top := data[k][str(p)].get(whisker))
                ]
                ax.plot([m[0] for m in marks], [m[1] for m in marks], "k|", markersize=9)
            for y, v in zip(ys, values, strict=True):
                ax.annotate(
                    fmt(v),
                    (v, y),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
            for name, value, only in refs:
                if only is not None and only != p:
                    continue
                ax.axvline(value, linestyle="--", linewidth=1, color="black")
                ax.annotate(
                    name,
                    (value, len(keys) - 0.4),
                    xytext=(3, 0),
                    textcoords="offset points",
                    fontsize=7,
                )
            ax.set_yticks(ys, [_label(doc, k) for k in keys], fontsize=8)
            ax.set_xscale("log")
            ax.set_title(f"{_payload(p)} messages", fontsize=9, loc="left")
            ax.grid(axis="x", which="both", alpha=0.3)
            ax.margins(x=0.15)
        axes[-1, 0].set_xlabel(xlabel)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out[title] = path

    memcpy = _cell(doc, "memcpy_hot", MEMCPY, MIB).get("bytes_per_s")
    panels(
        "stream",
        "msgs_per_s",
        "Stream throughput, messages per second (log scale)",
        "messages/s",
        "stream_msgs.png",
        _si,
        [],
    )
    panels(
        "stream",
        "bytes_per_s",
        "Stream throughput, bytes per second (log scale)",
        "bytes/s",
        "stream_bytes.png",
        lambda v: _si(v, "B/s"),
        [("memcpy 1 MiB", memcpy, MIB)] if memcpy else [],
    )
    refs: list[tuple[str, float, int | None]] = []
    for key, name in ((EVENTFD, "eventfd"), (SPIN, "spin byte")):
        v = _cell(doc, "rtt", key, None).get("p50_us")
        if v:
            refs.append((name, v, None))
    panels(
        "rtt",
        "p50_us",
        "Round trip p50 in µs (log scale; | marks p99)",
        "µs",
        "rtt.png",
        _us,
        refs,
        whisker="p99_us",
    )
    return out

"""Smoke tests of the messaging benchmarks (ivshmem.bench): tiny counts, real processes.

These check that the harness runs every transport it can here, that every message is
counted and checked on both sides, that the results document has the promised structure,
and that a transport which loses a message fails its run. They do not time anything.
Third-party transports (the ``bench`` extra) are skipped when missing; the project's channels
and the stdlib transports never are.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ivshmem.bench import Plan, measure, render_markdown, run_suite, write_charts
from ivshmem.bench.harness import STOP, BenchError, MessageCheckError, Stamp, SuiteContext
from ivshmem.bench.report import evaluate_targets
from ivshmem.bench.suite import SERIES_BY_KEY, SuiteConfig
from ivshmem.bench.transports.ospipe import OsPipe, _PipeLink
from ivshmem.cli.main import main

MESSAGES = 40
MIB = 1 << 20

ALWAYS = [
    "ivshmem_spin",
    "ivshmem_block",
    "ivshmem_spin+copy",
    "ivshmem_block+copy",
    "ivshmem_spin+bytes",
    "ivshmem_block+bytes",
    "ivshmem_spin+batch",
    "ivshmem_block+batch",
    "pipe",
    "mp_pipe",
    "mp_queue",
    "ref_eventfd",
    "ref_spin",
    "ref_memcpy",
]
OPTIONAL = {
    "faster_fifo": "faster_fifo",
    "zmq_ipc": "zmq",
    "zmq_ipc+unpinned": "zmq",
    "iceoryx2": "iceoryx2",
    "iceoryx2+copy": "iceoryx2",
}


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _leftovers() -> set[str]:
    """Files a run could leave behind: shared memory, its temporary directory (sockets)."""
    shm = {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(("ivshmem", "iox2_"))}
    tmp = {f"/tmp/{n}" for n in os.listdir("/tmp") if n.startswith(("ivb-", "iceoryx2"))}
    return shm | tmp


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    """One suite run over every available series with MESSAGES messages per number."""
    keys = ALWAYS + [k for k, mod in OPTIONAL.items() if _installed(mod)]
    before = _leftovers()
    config = SuiteConfig(
        repetitions=1,
        plan=Plan(warmup=0.0, duration=60.0, max_messages=MESSAGES, slack=60.0),
        payloads=(64, MIB),
        only=frozenset(keys),
    )
    result = run_suite(config)
    # Nothing left behind: no region, no iceoryx2 segment, no socket directory.
    assert _leftovers() <= before
    return result


def test_every_message_counted_and_checked(doc: dict[str, Any]) -> None:
    failures = [
        (r["series"], r["kind"], r["payload"], r["error"]) for r in doc["runs"] if "error" in r
    ]
    assert failures == []
    seen = set()
    for run in doc["runs"]:
        res = run["result"]
        seen.add(run["series"])
        if run["kind"] == "stream":
            # The producer stopped after MESSAGES; the consumer saw each one, in order, with
            # its sequence number intact at both ends, and the stop message's count agreed.
            assert res["sent"] == res["received"] == res["checked"] == MESSAGES, run
            assert res["msgs_per_s"] > 0
            assert res["bytes_per_s"] == pytest.approx(res["msgs_per_s"] * run["payload"])
        elif run["kind"] == "rtt":
            assert res["sent"] == res["echoed"] == res["checked"] == MESSAGES, run
            assert res["round_trips"] == MESSAGES  # no warm-up: every round trip sampled
            assert 0 < res["min_us"] <= res["p50_us"] <= res["p99_us"] <= res["max_us"]
        else:
            assert run["kind"] in ("memcpy_hot", "memcpy_cold")
            assert res["bytes_per_s"] > 0
    expected = set(ALWAYS) | {k for k, mod in OPTIONAL.items() if _installed(mod)}
    assert seen == expected


def test_document_structure(doc: dict[str, Any]) -> None:
    # The document is plain JSON and survives a round trip unchanged.
    assert json.loads(json.dumps(doc)) == doc
    assert doc["schema"] == 1
    assert {"cpu_model", "kernel", "python", "versions"} <= set(doc["machine"])
    assert doc["config"]["payloads"] == [64, MIB]
    assert doc["config"]["pin"] == "apart"
    two_cpus = sorted(os.sched_getaffinity(0))[:2]
    for run in doc["runs"]:
        if run["series"] == "zmq_ipc+unpinned" or len(two_cpus) < 2:
            assert run["result"]["cpus"] == [None, None]
        elif not run["kind"].startswith("memcpy"):
            assert run["result"]["cpus"] == two_cpus, run
    for info in doc["series"].values():
        assert {"label", "notes", "available", "reason"} <= set(info)
    summary = doc["summary"]
    assert summary["stream"]["pipe"]["64"]["msgs_per_s"] > 0
    assert summary["stream"]["ivshmem_spin+copy"][str(MIB)]["bytes_per_s"] > 0
    assert "64" not in summary["stream"]["ivshmem_spin+copy"]  # copy variant: 1 MiB only
    assert summary["rtt"]["ref_eventfd"]["64"]["p50_us"] > 0
    assert summary["memcpy_hot"]["ref_memcpy"][str(MIB)]["bytes_per_s"] > 0
    # Every target could be evaluated (all its series ran) and has a verdict.
    verdicts = {t["target"]: t for t in doc["targets"]}
    assert len(verdicts) == len(evaluate_targets(doc))
    for t in verdicts.values():
        if "pyzmq" in t["target"] and not _installed("zmq"):
            continue
        if "iceoryx2" in t["target"] and not _installed("iceoryx2"):
            continue
        assert t["verdict"] in ("met", "missed"), t
        assert len(t["per_rep"]) == 1


def test_markdown_and_charts(doc: dict[str, Any], tmp_path: Path) -> None:
    text = render_markdown(doc, {"stream": "bench/stream_msgs.png"})
    for key in doc["series"]:
        assert doc["series"][key]["label"] in text
    assert "## Targets" in text and "| 64 B stream, spinning channel (zero-copy API)" in text
    assert "![stream](bench/stream_msgs.png)" in text
    charts = write_charts(doc, str(tmp_path))
    if not _installed("matplotlib"):
        assert charts == {}
        return
    assert len(charts) == 3
    for path in charts.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class _FaultyPipe(OsPipe):
    """os.pipe whose side ``side`` sends message 5 wrongly: ``skip`` drops it, else message 4
    goes out again in its place."""

    key = "faulty_pipe"

    def __init__(self, ctx: SuiteContext, kind: str, side: int, skip: bool) -> None:
        super().__init__(ctx, 64, kind)
        self.faulty_side = side
        self.skip = skip

    def open(self, side: int) -> _PipeLink:
        link = super().open(side)
        if side == self.faulty_side:
            send = link.send

            def faulty(seq: int) -> None:
                if seq != 5:
                    send(seq)
                elif not self.skip:
                    send(4)

            link.send = faulty  # type: ignore[method-assign]
        return link


@pytest.mark.parametrize(
    ("kind", "side", "skip", "error"),
    [
        ("stream", 0, True, "expected message 5, received message 6"),
        ("stream", 0, False, "expected message 5, received message 4"),
        ("rtt", 0, False, "expected message 5, received message 4"),
        ("rtt", 1, False, "sent round trip 5, the echo was message 4"),
    ],
)
def test_wrong_message_fails_the_run(
    kind: str, side: int, skip: bool, error: str, short_tmp: Path
) -> None:
    ctx = SuiteContext(str(short_tmp))
    plan = Plan(warmup=0.0, duration=60.0, max_messages=MESSAGES, slack=10.0)
    with pytest.raises(BenchError, match=error):
        measure(_FaultyPipe(ctx, kind, side, skip), plan)


def test_stamp_rejects_torn_and_short_messages() -> None:
    stamp = Stamp(64)
    buf = stamp.template()
    stamp.stamp(buf, 7)
    assert stamp.check(buf) == 7
    buf[-1] ^= 0xFF
    with pytest.raises(MessageCheckError, match="torn"):
        stamp.check(buf)
    with pytest.raises(MessageCheckError, match="63 bytes"):
        stamp.check(buf[:63])
    stamp.stamp(buf, STOP + 3)
    assert stamp.check(buf) == STOP + 3


def test_cli_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["bench", "--only", "pipe,ref_spin,ref_eventfd", "-r", "1", "--duration", "0.05",
            "--warmup", "0", "--payloads", "64", "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert {r["series"] for r in doc["runs"]} == {"pipe", "ref_spin", "ref_eventfd"}
    assert "os.pipe" in (out / "benchmarks.md").read_text()
    printed = capsys.readouterr().out
    assert "Target verdicts" in printed and "NOT MEASURED" in printed
    # Re-rendering the saved results needs no measurement.
    again = tmp_path / "again.md"
    assert main(["bench", "--from-json", str(out / "results.json"), "--markdown", str(again)]) == 0
    assert again.read_text() == render_markdown(doc) + "\n"


def test_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--only", "carrier_pigeon"]) == 2
    assert "unknown series carrier_pigeon" in capsys.readouterr().err
    assert main(["bench", "--payloads", "8"]) == 2
    assert "16-byte minimum" in capsys.readouterr().err


def test_smoke_covers_every_series() -> None:
    assert (set(ALWAYS) - {"ref_memcpy"}) | set(OPTIONAL) == set(SERIES_BY_KEY)


def test_capacity_axis_replaces_only_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--capacities`` measures the channel written + copied (stream and round trip) at each
    capacity and, into an existing report, writes only its own section; a full report keeps
    the section it finds."""
    from ivshmem.bench.report import (
        CAPACITY_BEGIN,
        CAPACITY_END,
        existing_capacity_section,
        splice_capacity_section,
    )

    md = tmp_path / "benchmarks.md"
    md.write_text(f"# main tables\n\nkept\n\n{CAPACITY_BEGIN}\nold numbers\n{CAPACITY_END}\n")
    js = tmp_path / "capacity.json"
    args = ["bench", "--capacities", "8K,64K", "--payloads", "1K", "--only", "ivshmem_spin+copy",
            "-r", "1", "--duration", "0.05", "--warmup", "0", "--markdown", str(md),
            "--json", str(js), "-q"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    doc = json.loads(js.read_text())
    assert not [r for r in doc["runs"] if "error" in r]
    got = {(r["series"], r["kind"], r.get("capacity")) for r in doc["runs"]}
    caps = (8192, 65536)
    assert got == {
        *((f"ivshmem_spin+copy@{cap}", kind, cap) for cap in caps for kind in ("stream", "rtt")),
        *((f"placement_{w}@{cap}", "placement", cap) for cap in caps for w in ("window", "whole")),
    }
    text = md.read_text()
    assert text.startswith("# main tables\n\nkept\n\n") and "old numbers" not in text
    section = existing_capacity_section(text)
    assert "## Ring capacity" in section and "| 64 KiB |" in section and "| 8 KiB |" in section
    assert "| 1 KiB | 64 KiB |" in section  # the placement table's row
    # A full run's report (rendered anew) keeps the capacity section of the file it replaces.
    assert existing_capacity_section(splice_capacity_section("# new\n", section)) == section
    assert splice_capacity_section("# new\n", "") == "# new\n"


def test_capacity_axis_rejects_bad_capacities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--capacities", "3M"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert main(["bench", "--capacities", "64K", "--payloads", "1M"]) == 2
    assert "at most half the ring" in capsys.readouterr().err

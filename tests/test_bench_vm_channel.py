"""Tests of the across-VM benchmark (``benchmarks/bench_vm_channel.py`` and its guest program
``benchmarks/vm_channel_guest.py``). They time nothing.

* On the host, in a second: the message check rejects a change in any byte and any other
  length, and the guest program's phases (both channel paths, TCP) move and verify every
  message over a real formatted region and a real socket pair (the TCP receiver fed in
  pieces that split messages), and stop at a corrupted, resized or missing message.
* In the lab (about 20-40 s: two guests boot once): the whole benchmark with tiny sizes. All
  three transports must have moved and verified every byte of every phase, and the printed
  table and the JSON document must have their promised structure.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivshmem.channel import Receiver, Sender, format_region
from ivshmem.endpoint import open_region
from ivshmem.memory import SharedMemory

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "bench_vm_channel.py"
sys.path.insert(0, str(BENCHMARKS))

import vm_channel_guest as guest  # noqa: E402
from vm_channel_guest import ACK, CheckError, Messages  # noqa: E402

PATTERN = guest.make_pattern(guest.parse_args(
    ["--role", "send", "--my-ip", "x", "--peer-ip", "y", "--sizes", "70000", "--counts", "1",
     "--warmups", "0", "--seed", "3"]
))  # fmt: skip


def in_thread(target: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``target`` in a thread; the returned function joins it and returns its result or
    re-raises its exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = target()
        except BaseException as err:  # handed to the joining test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(30)
        assert not thread.is_alive(), "the receiving side hung"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


# -- the messages and their check ------------------------------------------------------------


def test_messages_differ_within_the_spread_and_repeat_after_it() -> None:
    msgs = Messages(PATTERN, 64)
    assert msgs.spread == guest.MAX_SPREAD  # 16 MiB holds far more than 4096 such messages
    phase = msgs.phase(10, msgs.spread + 1)
    assert all(len(m) == 64 for m in phase)
    assert len(set(phase[:-1])) == msgs.spread  # neighbours (and all others) differ
    assert phase[-1] is phase[0]
    assert msgs.phase(10 + msgs.spread, 3) == phase[:3]  # the sequence carries on across phases
    assert Messages(PATTERN, 70000).spread == 239  # ~16 MiB of distinct 70000 B messages
    assert guest.spread_for(1 << 20) == guest.MIN_SPREAD


@pytest.mark.parametrize("size", [16, 17, 64, 1000])
def test_check_rejects_any_changed_byte_and_any_other_length(size: int) -> None:
    msgs = Messages(PATTERN, size)
    (want,) = msgs.phase(12345, 1)
    assert guest.same(want, want)
    assert guest.same(bytearray(want), want) and guest.same(memoryview(want), want)
    for i in range(size):
        bad = bytearray(want)
        bad[i] ^= 0x40
        assert not guest.same(bad, want)
    assert not guest.same(want[:-1], want)
    assert not guest.same(want + b"x", want)
    assert not guest.same(msgs.phase(12346, 1)[0], want)  # a repeated or skipped message


def test_locate_names_the_first_wrong_message() -> None:
    msgs = Messages(PATTERN, 100)
    due = msgs.phase(50, 4)
    got = [due[0], due[1], due[2][:-1], b"x" * 100]
    assert str(msgs.locate(got, due, 50)) == "message 52 of 100 bytes: 99 bytes arrived"
    got[2] = due[2]
    assert str(msgs.locate(got, due, 50)) == "message 53 of 100 bytes: payload differs"
    assert "3 arrived where 4 were due" in str(msgs.locate(due[:3], due, 50))


def test_sizes_below_the_minimum_are_refused() -> None:
    with pytest.raises(SystemExit, match="minimum"):
        Messages(PATTERN, 15)
    with pytest.raises(SystemExit, match="pattern is too short"):
        Messages(PATTERN[:1000], 900)


def test_schedule_warms_up_then_takes_turns() -> None:
    c, z, t = guest.TRANSPORTS
    assert (c, z, t) == ("channel", "zero_copy", "tcp")
    assert guest.schedule(4, 10, 2) == [
        (-1, c, 2), (-1, z, 2), (-1, t, 2),
        (0, c, 10), (0, z, 10), (0, t, 10),
        (1, z, 10), (1, t, 10), (1, c, 10),
        (2, t, 10), (2, c, 10), (2, z, 10),
        (3, c, 10), (3, z, 10), (3, t, 10),
    ]  # fmt: skip
    assert guest.schedule(1, 5, 0) == [(0, c, 5), (0, z, 5), (0, t, 5)]


# -- the guest program's phases, on the host --------------------------------------------------


@pytest.fixture
def two_ends() -> Iterator[tuple[Any, Any]]:
    """Peers 0 and 1 of a formatted memfd region with a static membership table."""
    shm = SharedMemory.memfd(16 << 20, "ivshmem-test-vmbench")
    a = open_region(shm.fd, id=0)
    b = open_region(shm.fd, id=1)
    try:
        format_region(a, max_peers=2, peers=[0, 1])
        yield a, b
    finally:
        a.close()
        b.close()
        shm.close()


@pytest.fixture
def channels(two_ends: tuple[Any, Any]) -> Iterator[tuple[Sender, Receiver, Sender, Receiver]]:
    """(bench sender, bench receiver, ack sender, ack receiver) as the guests open them."""
    a, b = two_ends
    rx = Receiver(b, guest.CHANNEL, sender=0, capacity=1 << 20, timeout=10)
    ack_rx = Receiver(a, guest.ACK_CHANNEL, sender=1, capacity=4096, timeout=10)
    tx = Sender(a, guest.CHANNEL, receiver=1, timeout=10)
    ack_tx = Sender(b, guest.ACK_CHANNEL, receiver=0, timeout=10)
    try:
        yield tx, rx, ack_tx, ack_rx
    finally:
        for end in (tx, ack_tx, rx, ack_rx):
            end.close()


PATHS = [pytest.param(path, id=path) for path in ("channel", "zero_copy")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", [64, 65536])
def test_channel_phase_moves_and_checks_every_message(
    channels: tuple[Sender, Receiver, Sender, Receiver], path: str, size: int
) -> None:
    tx, rx, ack_tx, ack_rx = channels
    msgs = Messages(PATTERN, size)
    for first, count in ((0, 40), (40, 25)):  # the sequence carries on across phases
        join = in_thread(functools.partial(guest.RECV[path], rx, ack_tx, msgs, first, count))
        assert guest.SEND[path](tx, ack_rx, msgs, first, count) > 0
        assert join() >= 0


def send_raw(tx: Sender, messages: list[bytes]) -> None:
    for m in messages:
        tx.send(m)


def _flip_a_byte(sent: list[bytes]) -> list[bytes]:
    third = bytearray(sent[2])
    third[100] ^= 1
    return [sent[0], sent[1], bytes(third), *sent[3:]]


WRONG = {
    "corrupted": (_flip_a_byte, "message 2 of 256 bytes: payload differs"),
    "longer": (lambda s: [s[0], s[1] + b"!", *s[2:]], "message 1 of 256 bytes: 257 bytes arrived"),
    "shorter": (lambda s: [s[0], s[1][:-1], *s[2:]], "message 1 of 256 bytes: 255 bytes arrived"),
    # A lost message shifts everything after it: the next one is not the one due.
    "missing": (lambda s: [*s[:2], *s[3:], s[0]], "message 2 of 256 bytes: payload differs"),
    "repeated": (lambda s: [s[0], s[0], *s[2:]], "message 1 of 256 bytes: payload differs"),
}


@pytest.mark.parametrize("wrong", list(WRONG))
@pytest.mark.parametrize("path", PATHS)
def test_channel_receivers_stop_at_the_first_wrong_message(
    channels: tuple[Sender, Receiver, Sender, Receiver], path: str, wrong: str
) -> None:
    tx, rx, ack_tx, _ = channels
    msgs = Messages(PATTERN, 256)
    change, message = WRONG[wrong]
    send_raw(tx, change(msgs.phase(0, 5)))
    with pytest.raises(CheckError, match=f"^{message}$"):
        guest.RECV[path](rx, ack_tx, msgs, 0, 5)


@pytest.mark.parametrize(("size", "piece"), [(64, 1000), (3000, 1777), (70000, 65536)])
def test_tcp_receiver_reassembles_messages_split_anywhere(size: int, piece: int) -> None:
    msgs = Messages(PATTERN, size)
    count, first = 37, 1000
    stream = b"".join(msgs.phase(first, count))
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(10)
        right.settimeout(10)
        join = in_thread(lambda: guest.recv_tcp(right, msgs, first, count))
        for start in range(0, len(stream), piece):
            left.sendall(stream[start : start + piece])
        guest.confirm(guest.recv_exactly(left, ACK.size), msgs, count)
        assert join() >= 0
        # Back to back with the sender's own code path.
        join = in_thread(lambda: guest.recv_tcp(right, msgs, first + count, count))
        assert guest.send_tcp(left, msgs, first + count, count) > 0
        join()


@pytest.mark.parametrize("offset", [0, 1499, 1500, 3 * 500 + 250, 4 * 500 - 1])
def test_tcp_receiver_rejects_a_corrupted_byte(offset: int) -> None:
    msgs = Messages(PATTERN, 500)
    stream = bytearray(b"".join(msgs.phase(0, 4)))
    stream[offset] ^= 0x80
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(10)
        left.sendall(stream)
        with pytest.raises(CheckError, match=f"^message {offset // 500} of 500 bytes: payload"):
            guest.recv_tcp(right, msgs, 0, 4)


def test_acknowledgements_must_match_what_was_sent() -> None:
    msgs = Messages(PATTERN, 64)
    guest.confirm(ACK.pack(10, 640), msgs, 10)
    with pytest.raises(CheckError, match="verified 9 messages / 576 bytes, 10 / 640 were sent"):
        guest.confirm(ACK.pack(9, 576), msgs, 10)
    with pytest.raises(CheckError, match="acknowledgement of 3 bytes"):
        guest.confirm(b"abc", msgs, 10)


# -- the whole benchmark in two lab guests ----------------------------------------------------


@pytest.mark.lab
@pytest.mark.timeout(240)
def test_benchmark_in_two_guests(qemu_binary: str, short_tmp: Path) -> None:
    out_json = short_tmp / "result.json"
    env = dict(os.environ, TMPDIR=str(short_tmp))
    reps = 2
    proc = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--sizes", "64", "4K", "--bytes", "16K",
            "--reps", str(reps), "--min-messages", "3", "--max-messages", "40",
            "--json", str(out_json), "--timeout", "150",
        ],
        capture_output=True, text=True, env=env, timeout=200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out_json.read_text())

    # Every byte moved and verified, over both transports, warm-ups included.
    plan = {64: 40, 4096: 3}  # 16K / 2 reps / size, clamped to 3..40
    assert [r["size"] for r in data["results"]] == [64, 4096]
    for row in data["results"]:
        size, count = row["size"], row["messages"]
        assert count == plan[size]
        total = row["warmup_messages"] + reps * count
        for transport in ("channel", "zero_copy", "tcp"):
            t = row[transport]
            assert t["verified_messages"] == total, (transport, size, t)
            assert t["verified_bytes"] == total * size, (transport, size, t)
            assert len(t["rep_messages_per_s"]) == reps
            assert all(rate > 0 for rate in t["rep_messages_per_s"])
            assert t["messages_per_s"] == statistics.median(t["rep_messages_per_s"])
            assert t["mb_per_s"] == pytest.approx(t["messages_per_s"] * size / 1e6)
        for path in ("channel", "zero_copy"):
            vs = row["vs_tcp"][path]
            assert vs["rep_ratios"] == [
                c / t
                for c, t in zip(
                    row[path]["rep_messages_per_s"], row["tcp"]["rep_messages_per_s"], strict=True
                )
            ]
            assert vs["ratio"] == statistics.median(vs["rep_ratios"])
            assert vs["meets_target"] == (vs["ratio"] >= data["target_ratio"])
    assert data["target_ratio"] == 5.0
    assert data["tcg"] is True and "TCG" in data["note"]
    env_info = data["environment"]
    assert "vfio" in env_info["sender_endpoint"] and "vfio" in env_info["receiver_endpoint"]
    assert all(b > 0 for b in env_info["guest_boot_seconds"])
    verdict = data["verdict"]
    assert verdict["sizes"] == 2
    for path in ("channel", "zero_copy"):
        met = sum(r["vs_tcp"][path]["meets_target"] for r in data["results"])
        assert verdict[path]["sizes_meeting_target"] == met

    # The printed table: the TCG caveat, one line per size with both ratios, the verdicts.
    text = proc.stdout
    assert "TCG software emulation" in text
    assert "every byte of every message verified" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("size"))
    assert "ratio to TCP, target >= 5x" in lines[header - 1]
    assert lines[header].split()[-3:] == ["send/recv_many", "zero", "copy"]
    for line, row in zip(lines[header + 2 : header + 4], data["results"], strict=True):
        cells = line.split()
        assert cells[0] == {64: "64B", 4096: "4K"}[row["size"]]
        assert float(cells[3].replace(",", "")) == round(row["channel"]["messages_per_s"])
        vs = [row["vs_tcp"][p] for p in ("channel", "zero_copy")]
        marks = " ".join(
            f"{v['ratio']:.2f}x {'met' if v['meets_target'] else 'NOT met'}" for v in vs
        )
        assert " ".join(line.split("|")[-1].split()) == marks, line
    assert "verdict, send/recv_many: >= 5x TCP for" in text
    assert "verdict, zero copy: >= 5x TCP for" in text

    # Nothing left behind: guests, their job directories and sockets are gone.
    assert os.listdir(short_tmp) == ["result.json"]
    leftover = subprocess.run(
        ["pgrep", "-f", "ivshmem-lab-vm(send|recv)"], capture_output=True, check=False
    )
    assert leftover.returncode == 1, leftover.stdout

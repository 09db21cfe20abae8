"""Tests of the across-VM benchmark (``benchmarks/bench_vm_channel.py`` and its guest program
``benchmarks/vm_channel_guest.py``). They time nothing.

* On the host, in a second: the message checker rejects a change in any byte, and the guest
  program's channel and TCP phases move and verify every message over a real formatted
  region and a real socket pair (the TCP receiver fed in pieces that split messages).
* In the lab (about 20-40 s: two guests boot once): the whole benchmark with tiny sizes. Both
  transports must have moved and verified every byte of every phase, and the printed table
  and the JSON document must have their promised structure.
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


# -- the message checker ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 17, 64, 1000])
def test_checker_rejects_any_changed_byte(size: int) -> None:
    msgs = Messages(PATTERN, size)
    message = bytearray(size)
    msgs.fill(message, 12345)
    msgs.check(message, 12345)
    msgs.check(memoryview(message), 12345)
    for i in range(size):
        bad = bytearray(message)
        bad[i] ^= 0x40
        with pytest.raises(CheckError):
            msgs.check(bad, 12345)
    with pytest.raises(CheckError, match="stamped"):
        msgs.check(message, 12346)  # a repeated or skipped message
    with pytest.raises(CheckError, match="bytes, expected"):
        msgs.check(message[:-1], 12345)


def test_consecutive_messages_differ_in_the_body() -> None:
    """A receiver shown a stale message with a fresh stamp must notice: the bodies of
    neighbouring sequence numbers come from different pattern offsets."""
    msgs = Messages(PATTERN, 64)
    a, b = bytearray(64), bytearray(64)
    msgs.fill(a, 1)
    msgs.fill(b, 2)
    assert a[8:56] != b[8:56]
    b[8:56] = a[8:56]
    with pytest.raises(CheckError, match="payload differs"):
        msgs.check(b, 2)


def test_sizes_below_two_stamps_are_refused() -> None:
    with pytest.raises(SystemExit, match="minimum"):
        Messages(PATTERN, 15)


def test_schedule_warms_up_then_alternates() -> None:
    assert guest.schedule(3, 10, 2) == [
        (-1, "channel", 2), (-1, "tcp", 2),
        (0, "channel", 10), (0, "tcp", 10),
        (1, "tcp", 10), (1, "channel", 10),
        (2, "channel", 10), (2, "tcp", 10),
    ]  # fmt: skip
    assert guest.schedule(1, 5, 0) == [(0, "channel", 5), (0, "tcp", 5)]


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


@pytest.mark.parametrize("size", [64, 65536])
def test_channel_phase_moves_and_checks_every_message(two_ends: tuple[Any, Any], size: int) -> None:
    a, b = two_ends
    msgs = Messages(PATTERN, size)
    rx = Receiver(b, guest.CHANNEL, sender=0, capacity=1 << 20, timeout=10)
    ack_rx = Receiver(a, guest.ACK_CHANNEL, sender=1, capacity=4096, timeout=10)
    tx = Sender(a, guest.CHANNEL, receiver=1, timeout=10)
    ack_tx = Sender(b, guest.ACK_CHANNEL, receiver=0, timeout=10)
    try:
        for first, count in ((0, 40), (40, 25)):  # the sequence carries on across phases
            join = in_thread(functools.partial(guest.recv_channel, rx, ack_tx, msgs, first, count))
            assert guest.send_channel(tx, ack_rx, msgs, first, count) > 0
            assert join() >= 0
    finally:
        for end in (tx, ack_tx, rx, ack_rx):
            end.close()


def test_channel_receiver_rejects_a_corrupted_message(two_ends: tuple[Any, Any]) -> None:
    a, b = two_ends
    msgs = Messages(PATTERN, 256)
    with (
        Receiver(b, guest.CHANNEL, sender=0, capacity=1 << 16, timeout=10) as rx,
        Sender(a, guest.CHANNEL, receiver=1, timeout=10) as tx,
        Receiver(a, guest.ACK_CHANNEL, sender=1, capacity=4096, timeout=10),
        Sender(b, guest.ACK_CHANNEL, receiver=0, timeout=10) as ack_tx,
    ):
        for seq in range(3):
            view = tx.reserve(256)
            msgs.fill(view, seq)
            if seq == 2:
                view[100] ^= 1
            tx.commit()
        with pytest.raises(CheckError, match="message 2 of 256 bytes: payload differs"):
            guest.recv_channel(rx, ack_tx, msgs, 0, 3)


@pytest.mark.parametrize(("size", "piece"), [(64, 1000), (3000, 1777), (70000, 65536)])
def test_tcp_receiver_reassembles_messages_split_anywhere(size: int, piece: int) -> None:
    msgs = Messages(PATTERN, size)
    count, first = 37, 1000
    stream = bytearray(size * count)
    for i in range(count):
        msgs.fill(memoryview(stream)[i * size : (i + 1) * size], first + i)
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


def test_tcp_receiver_rejects_a_corrupted_byte() -> None:
    msgs = Messages(PATTERN, 500)
    stream = bytearray(500 * 4)
    for i in range(4):
        msgs.fill(memoryview(stream)[i * 500 : (i + 1) * 500], i)
    stream[3 * 500 + 250] ^= 0x80
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(10)
        left.sendall(stream)
        with pytest.raises(CheckError, match="message 3 of 500 bytes"):
            guest.recv_tcp(right, msgs, 0, 4)


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
        for transport in ("channel", "tcp"):
            t = row[transport]
            assert t["verified_messages"] == total, (transport, size, t)
            assert t["verified_bytes"] == total * size, (transport, size, t)
            assert len(t["rep_messages_per_s"]) == reps
            assert all(rate > 0 for rate in t["rep_messages_per_s"])
            assert t["messages_per_s"] == statistics.median(t["rep_messages_per_s"])
            assert t["mb_per_s"] == pytest.approx(t["messages_per_s"] * size / 1e6)
        assert row["ratio"] == statistics.median(row["rep_ratios"])
        assert row["meets_target"] == (row["ratio"] >= data["target_ratio"])
    assert data["target_ratio"] == 5.0
    assert data["tcg"] is True and "TCG" in data["note"]
    env_info = data["environment"]
    assert "vfio" in env_info["sender_endpoint"] and "vfio" in env_info["receiver_endpoint"]
    assert all(b > 0 for b in env_info["guest_boot_seconds"])
    verdict = data["verdict"]
    assert verdict["sizes"] == 2
    assert verdict["sizes_meeting_target"] == sum(r["meets_target"] for r in data["results"])

    # The printed table: the TCG caveat, one line per size with its ratio, the verdict.
    text = proc.stdout
    assert "TCG software emulation" in text
    assert "every byte of every message verified" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("size"))
    assert "channel/TCP" in lines[header] and "target >= 5x" in lines[header]
    for line, row in zip(lines[header + 2 : header + 4], data["results"], strict=True):
        cells = line.split()
        assert cells[0] == {64: "64B", 4096: "4K"}[row["size"]]
        verdict_cell = "met" if row["meets_target"] else "NOT met"
        assert line.endswith(f"{row['ratio']:.2f}x  {verdict_cell}"), line
    assert "verdict: channel >= 5x TCP for" in text

    # Nothing left behind: guests, their job directories and sockets are gone.
    assert os.listdir(short_tmp) == ["result.json"]
    leftover = subprocess.run(
        ["pgrep", "-f", "ivshmem-lab-vm(send|recv)"], capture_output=True, check=False
    )
    assert leftover.returncode == 1, leftover.stdout

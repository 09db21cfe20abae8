"""The sample programs (ivshmem.samples): ping-pong, bandwidth, shared counter.

* Between host processes on a real ``ivshmem-server --format``: every sample runs as separate
  ``python -m`` processes (one through the ``ivshmem sample`` command), and the tests check
  their exit status and their ``--json`` results (every reply checked, every byte checked,
  the counter exact).
* On a plain shared file formatted by one participant (``--format``), no server.
* Against a misbehaving peer, played by the test over real channels: each sample notices a
  damaged, lost or repeated message and fails with status 1, saying which message.
* In the VM lab (marked ``lab``): two guests and host processes on three servers and a plain
  file, the same sample code everywhere: ping-pong guest<->host, the counter round host,
  guest, guest, a bandwidth stream guest->host, and ping-pong between an ivshmem-plain device
  and a host process on its file. Two boots, in parallel.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import qemu_path, require
from serverproc import ServerProcess

from ivshmem import connect, open_region
from ivshmem.channel import Receiver, Sender, format_region
from ivshmem.samples import bandwidth, counter, pingpong

TIMEOUT = 60.0  # only to turn a hang into a failure


# -- helpers ----------------------------------------------------------------------------------


def sample_argv(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"ivshmem.samples.{name}", *args]


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ivshmem.cli.main", *args]


def host_args(server: ServerProcess) -> list[str]:
    return ["--socket", server.socket_path, "--vectors", str(server.vectors), "--json"]


class Proc:
    """A sample process; ``finish()`` gives its status and parsed JSON result."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_seen = ""  # read by wait_for_stderr, before communicate() takes the rest

    def wait_for_stderr(self, text: str, timeout: float = TIMEOUT) -> None:
        """Block until stderr contains ``text`` (e.g. the progress line)."""
        assert self.popen.stderr is not None
        fd = self.popen.stderr.fileno()  # raw reads: nothing stays in a buffer communicate skips
        deadline = time.monotonic() + timeout
        while text not in self.stderr_seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.argv}: no {text!r} on stderr: {self.stderr_seen}"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"{self.argv} ended early: {self.stderr_seen}"
                self.stderr_seen += chunk.decode(errors="replace")

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, dict[str, Any], str]:
        out, err = self.popen.communicate(timeout=timeout)
        err = self.stderr_seen + err
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(results) <= 1, out
        return self.popen.returncode, (results[0] if results else {}), f"{out}\n{err}"

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate()


@pytest.fixture
def procs() -> Iterator[Callable[[Sequence[str]], Proc]]:
    """Start sample processes; any still running at the end is killed."""
    started: list[Proc] = []

    def start(argv: Sequence[str]) -> Proc:
        proc = Proc(argv)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    with ServerProcess(short_tmp, size="4M", vectors=2, extra_args=["--format"]) as srv:
        yield srv


# -- between host processes, real server ------------------------------------------------------


def test_pingpong_between_two_host_processes(
    server: ServerProcess, procs: Callable[[Sequence[str]], Proc]
) -> None:
    pong = procs(sample_argv("pingpong", "pong", *host_args(server)))
    ping = procs(
        sample_argv(
            "pingpong",
            "ping",
            "--count",
            "300",
            "--warmup",
            "20",
            "--size",
            "100",
            *host_args(server),
        )
    )
    status, result, text = ping.finish()
    assert status == 0, text
    assert result["checked"] == 320 and result["count"] == 300 and result["size"] == 100
    rtt = result["rtt_us"]
    assert 0 < rtt["min"] <= rtt["p50"] <= rtt["p99"] <= rtt["max"], rtt
    assert rtt["min"] <= rtt["mean"] <= rtt["max"]
    status, echo, text = pong.finish()
    assert status == 0, text
    assert echo["echoed"] == echo["checked"] == 320
    # Each found the other in the membership table.
    assert (result["id"], result["peer"]) == (echo["peer"], echo["id"])
    server.wait_until(lambda: server.peer_ids() == [], what="both peers to leave")


def test_bandwidth_between_two_host_processes(
    server: ServerProcess, procs: Callable[[Sequence[str]], Proc]
) -> None:
    recv = procs(sample_argv("bandwidth", "recv", *host_args(server)))
    send = procs(
        sample_argv("bandwidth", "send", "--size", "65000", "--count", "300", *host_args(server))
    )
    status, sent, text = send.finish()
    assert status == 0, text
    status, got, text = recv.finish()
    assert status == 0, text
    assert got["ok"] is True and got["messages"] == 300
    assert got["checked_bytes"] == got["bytes"] == 300 * 65000
    assert got["mb_per_s"] > 0 and got["seconds"] > 0
    # The sender prints the receiver's checked verdict, plus its own sending time.
    for key in ("ok", "messages", "bytes", "checked_bytes", "mb_per_s", "sender", "receiver"):
        assert sent[key] == got[key], key
    assert (got["sender"], got["receiver"]) == (sent["id"], got["id"])
    assert sent["send_seconds"] > 0


def test_counter_three_host_processes_is_exact(
    server: ServerProcess, procs: Callable[[Sequence[str]], Proc]
) -> None:
    # One of them through the umbrella command: `ivshmem sample counter`.
    common = ["--peers", "3", "--increments", "200", *host_args(server)]
    runners = [procs(sample_argv("counter", *common)) for _ in range(2)]
    runners.append(procs(cli_argv("sample", "counter", *common)))
    results = []
    for runner in runners:
        status, result, text = runner.finish()
        assert status == 0, text
        results.append(result)
    assert all(r["value"] == r["expected"] == 600 and r["exact"] for r in results)
    ring = results[0]["ring"]
    assert all(r["ring"] == ring for r in results) and len(set(ring)) == 3
    assert sorted(r["position"] for r in results) == [0, 1, 2]
    assert sorted(r["id"] for r in results) == sorted(ring)


# -- a plain region, no server ------------------------------------------------------------------


def test_counter_and_pingpong_on_a_plain_region(
    short_tmp: Path, procs: Callable[[Sequence[str]], Proc]
) -> None:
    region = str(short_tmp / "region")
    plain = ["--endpoint", "plain", "--region", region, "--json"]
    # The formatting participant starts first; its progress line says it is past formatting.
    first = procs(
        sample_argv("counter", *plain, "--region-size", "1M", "--id", "5", "--format", "5,9")
    )
    first.wait_for_stderr("ring [5, 9]")
    second = procs(sample_argv("counter", *plain, "--id", "9", "--increments", "1000"))
    for proc in (first, second):
        status, result, text = proc.finish()
        assert status == 0, text
        assert result["value"] == 2000 and result["ring"] == [5, 9]
        assert "polling" in result["endpoint"]
    # The region stays formatted: a ping-pong with spinning waits finds the same static table.
    pong = procs(sample_argv("pingpong", "pong", *plain, "--id", "9", "--spin", "inf"))
    ping = procs(sample_argv("pingpong", "ping", *plain, "--id", "5", "--count", "200"))
    status, result, text = ping.finish()
    assert status == 0, text
    assert result["peer"] == 9 and result["checked"] == 300
    status, echo, text = pong.finish()
    assert status == 0, text
    assert echo["echoed"] == 300


# -- usage errors -------------------------------------------------------------------------------


def test_a_server_without_format_is_explained(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1):
        status = pingpong.main(["ping", "--socket", str(short_tmp / "ivshmem.sock")])
    assert status == 1
    err = capsys.readouterr().err
    assert "not formatted" in err and "--format" in err


def test_plain_region_needs_an_id(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--endpoint", "plain", "--region", str(short_tmp / "r"), "--region-size", "1M"]
    assert counter.main(args) == 1
    assert "needs --id" in capsys.readouterr().err


def test_too_many_peers_in_the_table_asks_for_peer(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    with connect(server.socket_path, vectors=2) as a, connect(server.socket_path, vectors=2) as b:
        status = bandwidth.main(["send", "--socket", server.socket_path, "--vectors", "2"])
        assert status == 1
        err = capsys.readouterr().err
        assert f"lists [{a.id}, {b.id}]" in err and "choose with --peer" in err


def test_waiting_for_a_peer_times_out_with_the_table(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--socket", server.socket_path, "--vectors", "2", "--peers", "3", "--timeout", "0.3"]
    assert counter.main(args) == 1
    assert "waited 0.3 s for 2 other peer(s)" in capsys.readouterr().err


# -- against a misbehaving peer (the test plays it over real channels) ----------------------------


@pytest.fixture
def plain_pair(short_tmp: Path) -> Iterator[tuple[Any, list[str]]]:
    """A plain region formatted for peers 0 and 1: the test's endpoint (peer 0) and the
    arguments that make a sample peer 1."""
    path = str(short_tmp / "region")
    with open_region(path, id=0, size="1M") as ep:
        format_region(ep, max_peers=2, peers=[0, 1])
        yield ep, ["--endpoint", "plain", "--region", path, "--id", "1", "--timeout", "20"]


class SampleThread(threading.Thread):
    """Runs a sample's main() in this process, as peer 1."""

    def __init__(self, main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self._main, self._argv = main, list(argv)
        self.status: int | None = None

    def run(self) -> None:
        self.status = self._main(self._argv)

    def result(self) -> int | None:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the sample did not end"
        return self.status


def test_bandwidth_receiver_finds_one_damaged_byte(
    plain_pair: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    ep, args = plain_pair
    sample = SampleThread(bandwidth.main, ["recv", *args, "--json"])
    sample.start()
    size, count, seed = 1000, 10, 1234
    block = bandwidth.pattern(seed, size)
    with (
        Receiver(ep, bandwidth.REPORT, 1, timeout=20) as reports,
        Sender(ep, bandwidth.DATA, 1, timeout=20) as tx,
    ):
        tx.send(struct.pack("<8sQQQ", b"IVBW\x00\x00\x00\x01", size, count, seed))
        for seq in range(count):
            at = bandwidth.offset(seq)
            message = bytearray(struct.pack("<Q", seq) + block[at : at + size - 8])
            if seq == 4:
                message[500] ^= 0x01  # one bit of one byte
            tx.send(message)
        report = json.loads(reports.recv(timeout=20))
    assert sample.result() == 1
    assert report["ok"] is False and "message 4 " in report["error"]
    assert "CHECK FAILED: message 4 " in capsys.readouterr().err


def test_bandwidth_receiver_finds_a_repeated_message(
    plain_pair: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    ep, args = plain_pair
    sample = SampleThread(bandwidth.main, ["recv", *args])
    sample.start()
    size, seed = 64, 99
    block = bandwidth.pattern(seed, size)
    with (
        Receiver(ep, bandwidth.REPORT, 1, timeout=20) as reports,
        Sender(ep, bandwidth.DATA, 1, timeout=20) as tx,
    ):
        tx.send(struct.pack("<8sQQQ", b"IVBW\x00\x00\x00\x01", size, 5, seed))
        for seq in (0, 1, 1, 2, 3):  # message 1 twice, so message 2 is missing where expected
            at = bandwidth.offset(seq)
            tx.send(struct.pack("<Q", seq) + block[at : at + size - 8])
        report = json.loads(reports.recv(timeout=20))
    assert sample.result() == 1
    assert report["ok"] is False and "message 2 (sequence number 1" in report["error"]
    capsys.readouterr()


def test_counter_notices_a_lost_increment(
    plain_pair: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    ep, args = plain_pair
    sample = SampleThread(counter.main, [*args, "--increments", "3"])
    sample.start()
    token = struct.Struct("<QQII")  # kind, value, N, M
    # The test is peer 0, first in the ring [0, 1]: it creates the token.
    with (
        Receiver(ep, counter.CHANNEL, 1, timeout=20) as rx,
        Sender(ep, counter.CHANNEL, 1, timeout=20) as tx,
    ):
        tx.send(token.pack(counter.TOKEN, 1, 2, 3))
        assert token.unpack(rx.recv(timeout=20)) == (counter.TOKEN, 2, 2, 3)  # it added one
        tx.send(token.pack(counter.TOKEN, 4, 2, 3))  # claims an increment that never happened
        assert sample.result() == 1
    err = capsys.readouterr().err
    assert "CHECK FAILED: lap 1: received TOKEN 4, expected TOKEN 3" in err


def test_pong_notices_a_lost_ping(
    plain_pair: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    ep, args = plain_pair
    sample = SampleThread(pingpong.main, ["pong", *args])
    sample.start()
    seq = struct.Struct("<Q")
    with (
        Receiver(ep, pingpong.CHANNEL, 1, timeout=20) as rx,
        Sender(ep, pingpong.CHANNEL, 1, timeout=20) as tx,
    ):
        message = pingpong.payload(64)
        tx.send(message)
        assert rx.recv(timeout=20) == message  # echoed byte for byte
        seq.pack_into(message, 0, 2)  # message 1 never sent
        tx.send(message)
        assert sample.result() == 1
    assert "CHECK FAILED: message 1: sequence number 2" in capsys.readouterr().err


# -- the VM lab: the same code in guests ----------------------------------------------------------

LAB_TIMEOUT = 150.0  # generous, only to turn a hang into a failure (boots take 5-20 s)
INCREMENTS = 100


@dataclass
class LabRun:
    guest_status: dict[str, int | None]
    guest_output: dict[str, str]
    host_status: dict[str, int]
    host_output: dict[str, str]
    #: Every JSON result, by (participant, sample): participant "host", "g1" or "g2".
    results: dict[tuple[str, str], dict[str, Any]]
    qemu_left: list[str]


def _json_results(who: str, output: str) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for line in output.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            found[(who, result["sample"])] = result
    return found


def _guest_code(*runs: tuple[str, list[str]]) -> str:
    """A guest program that runs samples one after the other (the next runs even if one
    failed, so its peers are not left waiting) and exits with 1 if any failed."""
    lines = [
        "import sys",
        "import ivshmem.samples.bandwidth, ivshmem.samples.counter",
        "import ivshmem.samples.pingpong",
        "status = 0",
    ]
    for name, args in runs:
        lines.append(f"status |= ivshmem.samples.{name}.main({args!r})")
    lines.append("sys.exit(status)")
    return "\n".join(lines) + "\n"


def _run_lab(qemu: str, tmp: Path) -> LabRun:
    from ivshmem.lab import Doorbell, Lab, PlainRegion

    wait = ["--json", "--timeout", "120"]
    guest = ["--endpoint", "pci", *wait]
    count = ["--peers", "3", "--increments", str(INCREMENTS)]
    region = str(tmp / "plain")
    plain = ["--endpoint", "plain", "--region", region, "--region-size", "4M", "--id", "7"]
    with (
        ServerProcess(tmp, "4M", 2, ["--format"], name="a.sock") as a,
        ServerProcess(tmp, "4M", 2, ["--format"], name="b.sock") as b,
        ServerProcess(tmp, "16M", 2, ["--format"], name="c.sock") as c,
    ):
        hosts = {
            "pingpong": Proc(sample_argv("pingpong", "pong", *host_args(a), *wait)),
            "counter": Proc(sample_argv("counter", *count, *host_args(b), *wait)),
            "bandwidth": Proc(sample_argv("bandwidth", "recv", *host_args(c), *wait)),
            "plain": Proc(sample_argv("pingpong", "pong", *plain, "--format", "3,7", *wait)),
        }
        try:
            # The plain region's formatter must be done before the guest looks at the file.
            hosts["plain"].wait_for_stderr("pingpong pong: plain region")
            with Lab(iommu=True, qemu=qemu) as lab:
                # PCI order is the order of the devices, so --device N picks the server.
                # g1: ping-pong with the host (server a), then the counter (server b).
                # g2: the counter (server b), a bandwidth stream to the host (server c), then
                #     ping-pong with the host over ivshmem-plain and a file (no server).
                g1 = lab.start(
                    code=_guest_code(
                        ("pingpong", ["ping", *guest, "--device", "0", "--count", "300"]),
                        ("counter", [*guest, "--device", "1", *count]),
                    ),
                    name="g1",
                    devices=[Doorbell(a.socket_path, 2), Doorbell(b.socket_path, 2)],
                    timeout=LAB_TIMEOUT,
                )
                stream = ["--size", "64K", "--count", "200"]
                g2 = lab.start(
                    code=_guest_code(
                        ("counter", [*guest, "--device", "0", *count]),
                        ("bandwidth", ["send", *guest, "--device", "1", *stream]),
                        ("pingpong", ["ping", *guest, "--device", "2", "--id", "3"]),
                    ),
                    name="g2",
                    devices=[
                        Doorbell(b.socket_path, 2),
                        Doorbell(c.socket_path, 2),
                        PlainRegion(region),
                    ],
                    timeout=LAB_TIMEOUT,
                )
                guests = {"g1": g1.wait(LAB_TIMEOUT), "g2": g2.wait(LAB_TIMEOUT)}
                pids = [str(g1.pid), str(g2.pid)]
            finished = {name: proc.finish(LAB_TIMEOUT) for name, proc in hosts.items()}
        finally:
            for proc in hosts.values():
                proc.kill()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name, res in guests.items():
        results.update(_json_results(name, res.output))
    for sample_name, (_, result, _) in finished.items():
        if result:
            results[("host", sample_name)] = result
    return LabRun(
        guest_status={name: res.returncode for name, res in guests.items()},
        guest_output={name: res.describe() for name, res in guests.items()},
        host_status={name: status for name, (status, _, _) in finished.items()},
        host_output={name: text for name, (_, _, text) in finished.items()},
        results=results,
        qemu_left=[pid for pid in pids if Path(f"/proc/{pid}").exists()],
    )


@pytest.fixture(scope="module")
def lab_run() -> Iterator[LabRun]:
    # Module-scoped twin of conftest's qemu_binary fixture: skip locally, fail in CI.
    qemu = qemu_path()
    require(qemu, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    assert qemu is not None
    tmp = Path(tempfile.mkdtemp(prefix="ivs-", dir="/tmp"))  # short: Unix socket paths
    try:
        yield _run_lab(qemu, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_lab_everyone_succeeded(lab_run: LabRun) -> None:
    for name, status in lab_run.guest_status.items():
        assert status == 0, lab_run.guest_output[name]
    for name, status in lab_run.host_status.items():
        assert status == 0, lab_run.host_output[name]
    assert lab_run.qemu_left == []


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_lab_pingpong_guest_to_host(lab_run: LabRun) -> None:
    ping = lab_run.results[("g1", "pingpong")]
    pong = lab_run.results[("host", "pingpong")]
    assert "guest device" in ping["endpoint"] and "doorbells on 2 vector(s)" in ping["endpoint"]
    assert "host peer" in pong["endpoint"]
    assert (ping["id"], ping["peer"]) == (pong["peer"], pong["id"])
    assert ping["checked"] == pong["echoed"] == 400
    rtt = ping["rtt_us"]
    assert 0 < rtt["min"] <= rtt["p50"] <= rtt["p99"] <= rtt["max"]


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_lab_counter_round_host_and_two_guests(lab_run: LabRun) -> None:
    results = [lab_run.results[(who, "counter")] for who in ("host", "g1", "g2")]
    assert all(r["value"] == 3 * INCREMENTS and r["exact"] for r in results)
    assert all(r["ring"] == results[0]["ring"] for r in results)
    assert sorted(r["position"] for r in results) == [0, 1, 2]
    assert all("guest device" in r["endpoint"] for r in results[1:])


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_lab_bandwidth_guest_to_host(lab_run: LabRun) -> None:
    sent = lab_run.results[("g2", "bandwidth")]
    got = lab_run.results[("host", "bandwidth")]
    assert got["ok"] and sent["ok"]
    assert got["checked_bytes"] == 200 * 65536 == sent["checked_bytes"]
    assert (got["sender"], got["receiver"]) == (sent["id"], got["id"])
    assert got["mb_per_s"] > 0


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_lab_pingpong_over_ivshmem_plain_and_a_host_file(lab_run: LabRun) -> None:
    ping = lab_run.results[("g2", "pingpong")]
    pong = lab_run.results[("host", "plain")]
    assert "(plain)" in ping["endpoint"] and "polling" in ping["endpoint"]
    assert "plain region" in pong["endpoint"]
    assert (ping["id"], ping["peer"], pong["id"], pong["peer"]) == (3, 7, 7, 3)
    assert ping["checked"] == pong["echoed"] == 1100

"""End to end: one program (tests/e2e_program.py) as a host peer and inside two lab guests.

A real ``ivshmem-server`` (3 vectors per peer), one host process running the program with
``ivshmem.connect`` and two QEMU guests (TCG, emulated IOMMU) running the very same file with
``ivshmem.open_pci`` over VFIO, all three on one server. The program's choreography (see its
docstring) rings every other participant on a vector that names the ringer, so each receiver's
list of ringing seats shows every direction: host->guest, guest->host, guest->guest. Every
participant writes 256 KiB of a seeded pattern and checks the other two blocks byte for byte.
The host instance waits until both guests' peer ids leave the server, which happens only when
a guest powers off and its QEMU exits.

The two guests boot in parallel, once for the whole module (``scenario``): the run happens in
that fixture, including its teardown and the checks that nothing is left behind, and each test
asserts one aspect of what it recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import e2e_program
import pytest
from conftest import qemu_path, require
from serverproc import ServerProcess

from ivshmem.lab import Lab
from ivshmem.lab.guest import GuestResult
from ivshmem.peer import connect

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]  # above 2 x TIMEOUT: see below

PROGRAM = Path(e2e_program.__file__).resolve()
SEATS = 3  # seat 0: the host process; seats 1 and 2: the guests
HOST, GUEST1, GUEST2 = range(SEATS)
NAMES = {HOST: "host", GUEST1: "guest1", GUEST2: "guest2"}
BLOCK = 256 * 1024
# Generous, only to turn a hang into a failure: a guest boots in 5-20 s on a busy 2-core host,
# but the host program's --timeout also covers both guests' boots, which take several times
# longer when other TCG guests share the cores. The test may wait TIMEOUT for the guests and
# then TIMEOUT for the host program, hence pytest's 600 s.
TIMEOUT = 240.0


@dataclass
class Scenario:
    run: int
    reports: dict[int, dict[str, Any]]  # by seat
    guest_results: dict[int, GuestResult]
    host_returncode: int
    host_output: str
    #: What a fourth host peer, connected after everyone left, reads in each seat's block.
    late_digests: dict[int, str]
    peers_after_run: list[int]
    qemu_pids: list[int]
    #: /proc/PID/cmdline of those pids after the lab closed (absent: no such process).
    cmdlines_after: dict[int, str]
    lab_dir: Path
    shm_before: set[str]
    shm_after: set[str]


def parse_report(output: str, who: str) -> dict[str, Any]:
    match = re.search(r"^E2E-RESULT (\{.*\})$", output, re.MULTILINE)
    assert match is not None, f"{who} printed no E2E-RESULT line:\n{output}"
    report: dict[str, Any] = json.loads(match.group(1))
    return report


def program_args(seat: int, run: int) -> list[str]:
    args = {"--seat": seat, "--seats": SEATS, "--run": run, "--block": BLOCK}
    args["--timeout"] = int(TIMEOUT - 10)  # the program gives up before the test does
    return [word for flag, value in args.items() for word in (flag, str(value))]


def _run_scenario(qemu: str, tmp: Path) -> Scenario:
    run = random.randrange(1, 1 << 32)
    shm_before = set(os.listdir("/dev/shm"))
    with ServerProcess(tmp, size="1M", vectors=SEATS) as server:
        host = subprocess.Popen(
            [
                *(sys.executable, str(PROGRAM), "--endpoint", "host"),
                *("--socket", server.socket_path, "--vectors", str(SEATS), "--await-leaves"),
                *program_args(HOST, run),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            with Lab(iommu=True, qemu=qemu) as lab:
                # Both start() calls return at once: the guests boot side by side.
                guests = {
                    seat: lab.start(
                        PROGRAM,
                        ["--endpoint", "pci", *program_args(seat, run)],
                        name=NAMES[seat],
                        server_socket=server.socket_path,
                        vectors=SEATS,
                        timeout=TIMEOUT,
                    )
                    for seat in (GUEST1, GUEST2)
                }
                results = {seat: guest.wait(TIMEOUT) for seat, guest in guests.items()}
                qemu_pids = [guest.pid for guest in guests.values()]
                lab_dir = guests[GUEST1].job_dir.parent
            host_output, _ = host.communicate(timeout=TIMEOUT)
        finally:
            if host.poll() is None:
                host.kill()
                host.communicate()
        peers_after_run = server.peer_ids()
        late_digests = {}
        with connect(server.socket_path, vectors=SEATS) as late:
            for seat in range(SEATS):
                start = e2e_program.block_offset(seat, BLOCK)
                late_digests[seat] = hashlib.sha256(late.memory[start : start + BLOCK]).hexdigest()
    reports = {HOST: parse_report(host_output, "the host process")}
    for seat, result in results.items():
        reports[seat] = parse_report(result.output, f"guest {result.name}\n{result.describe()}")
    return Scenario(
        run=run,
        reports=reports,
        guest_results=results,
        host_returncode=host.returncode,
        host_output=host_output,
        late_digests=late_digests,
        peers_after_run=peers_after_run,
        qemu_pids=qemu_pids,
        cmdlines_after={pid: c for pid in qemu_pids if (c := _cmdline(pid)) is not None},
        lab_dir=lab_dir,
        shm_before=shm_before,
        shm_after=set(os.listdir("/dev/shm")),
    )


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    # The module-scoped twin of conftest's qemu_binary fixture (a function-scoped fixture
    # cannot feed a module-scoped one): skip locally, fail in CI.
    qemu = qemu_path()
    require(qemu, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    assert qemu is not None
    tmp = Path(tempfile.mkdtemp(prefix="ive-", dir="/tmp"))  # short: Unix socket paths
    try:
        yield _run_scenario(qemu, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ids(scenario: Scenario) -> dict[int, int]:
    """Peer id by seat, as each participant reported its own."""
    return {seat: report["id"] for seat, report in scenario.reports.items()}


def test_everyone_ran_to_the_end(scenario: Scenario) -> None:
    for result in scenario.guest_results.values():
        assert result.returncode == 0, result.describe()
    assert scenario.host_returncode == 0, scenario.host_output
    for seat, report in scenario.reports.items():
        assert report["seat"] == seat
        assert report["ok"] is True
    assert "<Peer id=" in scenario.reports[HOST]["endpoint"]
    for seat in (GUEST1, GUEST2):
        assert "<PciEndpoint" in scenario.reports[seat]["endpoint"]
        assert "vfio vectors=3" in scenario.reports[seat]["endpoint"]
        assert scenario.reports[seat]["vectors"] == SEATS
        assert scenario.reports[seat]["size"] == 1 << 20


def test_ids_shared_through_the_region(scenario: Scenario) -> None:
    by_seat = ids(scenario)
    assert len(set(by_seat.values())) == SEATS
    roster = [by_seat[seat] for seat in range(SEATS)]
    # Each guest's id is its IVPosition; everyone read the same roster from memory.
    for report in scenario.reports.values():
        assert report["roster"] == roster
    # The host peer knows the guests from the server; a guest cannot know its peers.
    assert scenario.reports[HOST]["peers_at_ready"] == sorted([by_seat[GUEST1], by_seat[GUEST2]])
    for seat in (GUEST1, GUEST2):
        assert scenario.reports[seat]["peers_at_ready"] is None


DIRECTIONS = [
    (HOST, GUEST1),
    (HOST, GUEST2),
    (GUEST1, HOST),
    (GUEST2, HOST),
    (GUEST1, GUEST2),
    (GUEST2, GUEST1),
]


@pytest.mark.parametrize(
    ("ringer", "receiver"), DIRECTIONS, ids=[f"{NAMES[a]}->{NAMES[b]}" for a, b in DIRECTIONS]
)
def test_doorbell(scenario: Scenario, ringer: int, receiver: int) -> None:
    # The receiver saw the vector numbered after the ringer's seat ring: only the ringer rings it.
    assert ringer in scenario.reports[receiver]["rung_by"]


def test_nobody_rings_itself(scenario: Scenario) -> None:
    for seat, report in scenario.reports.items():
        assert report["rung_by"] == sorted(set(range(SEATS)) - {seat})


def test_memory_coherence_across_three_peers(scenario: Scenario) -> None:
    expected = {
        seat: hashlib.sha256(e2e_program.pattern(scenario.run, seat, BLOCK)).hexdigest()
        for seat in range(SEATS)
    }
    assert len(set(expected.values())) == SEATS  # the patterns differ from seat to seat
    for seat, report in scenario.reports.items():
        assert report["own_sha256"] == expected[seat], f"seat {seat} read back its own block"
        assert sorted(report["verified"]) == [str(s) for s in range(SEATS) if s != seat]
        for other, check in report["verified"].items():
            assert check["first_bad_page"] is None, f"seat {seat} checking seat {other}: {check}"
            assert check["sha256"] == check["published"] == expected[int(other)]
            assert check["ok"] is True
        # Each seat published which blocks it verified; everyone read all three masks.
        full = [sum(1 << o for o in range(SEATS) if o != s) for s in range(SEATS)]
        assert report["masks"] == full
    # A fourth host peer, connected after all three left, maps the same bytes.
    assert scenario.late_digests == expected


def test_guest_poweroff_seen_as_leave(scenario: Scenario) -> None:
    by_seat = ids(scenario)
    host = scenario.reports[HOST]
    assert sorted(host["left"]) == sorted([by_seat[GUEST1], by_seat[GUEST2]])
    assert host["peers_at_end"] == []
    # The guests left because they powered off: their programs ended, QEMU exited.
    for result in scenario.guest_results.values():
        assert result.returncode == 0 and result.program_seconds is not None
    assert scenario.peers_after_run == []


def test_nothing_left_behind(scenario: Scenario) -> None:
    # Other tests may run QEMUs at the same time, so look for ours by pid and command line (a
    # reused pid would not name this lab's directory).
    for pid in scenario.qemu_pids:
        assert str(scenario.lab_dir) not in scenario.cmdlines_after.get(pid, ""), (
            f"QEMU {pid} still runs after the lab closed"
        )
    assert not scenario.lab_dir.exists(), "the lab left its directory behind"
    assert scenario.host_returncode is not None
    # The server (stopped by ServerProcess, which asserts a clean exit and its socket gone) had
    # a memfd region: nothing may appear in /dev/shm. Other tests running meanwhile could add
    # their own objects, so only names of this run's kind count.
    assert not {n for n in scenario.shm_after - scenario.shm_before if n.startswith("ivshmem")}

"""This project's ivshmem device (``ivshmem-device`` over vfio-user) seen from lab guests, end
to end, under QEMU >= 10.1 (:mod:`ivshmem.lab.qemu11`), next to QEMU's own device and a host
peer on one server and one region.

Boots are few (each takes 10-30 s under TCG on a loaded machine), so each boot checks much:

* ``mixed`` (one lab run, three guests): g1 and g2 on our device (MSI-X), both served by one
  device process (``Lab.device_process``), g3 on QEMU's ``ivshmem-doorbell``, and the host peer
  ring each other in every direction (one ring at a time along a circuit through every ordered
  pair, so a lost ring is a timeout at a known edge; g1 and g2 ring each other straight through
  their device process, which counts it), exchange channel messages (g1 with g3, g2 with the
  host), g1 and g2 see the membership in their registers, and g1 sees a new peer join and leave
  through the membership interrupt; then the samples run on our device on each guest's other
  devices: ``counter --peers 3`` round g1, g2 and a host peer (server b), and a ``bandwidth``
  stream from g2 to a host peer (server c);
* ``intx`` (one guest on our device in legacy INTx mode): the ping-pong sample with the host,
  then a restart of the server: the guest keeps BAR2 and its content, is told (events, state
  register, interrupt), and doorbells work again once the device has reconnected.

The lab and QEMU 11 plumbing that needs no boot is checked at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import device_guest
import pytest
from conftest import require
from serverproc import ServerProcess

from ivshmem.lab import Doorbell, Lab, LabError, LabUsageError, VfioUser
from ivshmem.lab.guest import device_arguments
from ivshmem.peer import connect

Popen = subprocess.Popen[str]

LAB_TIMEOUT = 400.0
GUEST_PROGRAM = str(Path(device_guest.__file__).resolve())
#: The vector our device rings on membership events in these tests.
EVENT_VECTOR = 2
OURS = ("--event-vector", str(EVENT_VECTOR))


def report(output: str, tag: str) -> dict[str, Any]:
    match = re.search(rf"^{tag} (\{{.*\}})$", output, re.MULTILINE)
    assert match is not None, f"no {tag} line in the guest's output:\n{output}"
    value: dict[str, Any] = json.loads(match.group(1))
    return value


def qemu11_ready() -> None:
    """Skip (fail in CI) unless a QEMU >= 10.1 is here or can be prepared."""
    from ivshmem.lab import qemu11
    from ivshmem.lab.vmm import qemu11_command

    try:
        qemu11_command(qemu11.prepare())  # found, and runnable by this user (root: chroot)
    except LabError as err:
        require(False, f"no QEMU >= 10.1 for lab guests: {err}")


def wait_for_new_peer(host: Any, known: set[int], timeout: float = 60.0) -> int:
    """The id of the next peer the host sees join (a guest's QEMU or device process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        host.wait(timeout=0.05)  # serves the server's messages
        new = set(host.peers) - known
        if new:
            (peer,) = new
            known.add(peer)
            return int(peer)
    raise AssertionError(f"no new peer joined within {timeout} s (known {sorted(known)})")


# -- the mixed run ---------------------------------------------------------------------------


@dataclass
class MixedRun:
    ids: dict[str, int]
    ready: dict[str, dict[str, Any]]
    #: ``ivshmem info --json`` in each guest, before anything opened a device.
    info: dict[str, list[dict[str, Any]]]
    done: dict[str, dict[str, Any]]
    host_rings: int
    host_channel_ok: bool
    joiner: int | None
    outputs: dict[str, str]
    status: dict[str, int | None]
    leftovers: list[int]
    left_with_their_guests: bool
    #: (who, sample) -> the sample's JSON result; who is "host", "g1" or "g2".
    samples: dict[tuple[str, str], dict[str, Any]]
    host_samples: dict[str, tuple[int | None, str]]
    #: What the device process serving g1 and g2 logged.
    pair_log: str


#: name: (device, channel partner's name)
MIXED_PLAN = {"g1": ("vfio-user", "g3"), "g2": ("vfio-user", "host"), "g3": ("qemu", "g1")}
#: Increments each of the counter's three peers adds.
INCREMENTS = 100
#: The bandwidth sample's stream from g2 to the host: messages, and bytes each.
STREAM = (100, 65536)
SAMPLE_WAIT = ["--json", "--timeout", "300"]


def _sample_results(output: str) -> dict[str, dict[str, Any]]:
    found = {}
    for line in output.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            if "sample" in result:
                found[str(result["sample"])] = result
    return found


def _guest_samples(name: str) -> list[list[Any]]:
    """What a guest of the mixed run runs on its devices 1 (server b) and 2 (server c)."""
    guest = ["--endpoint", "pci", *SAMPLE_WAIT]
    runs: list[list[Any]] = []
    if name in ("g1", "g2"):
        count = ["--peers", "3", "--increments", str(INCREMENTS)]
        runs.append(["counter", [*guest, "--device", "1", *count]])
    if name == "g2":
        stream = ["--count", str(STREAM[0]), "--size", str(STREAM[1])]
        runs.append(["bandwidth", ["send", *guest, "--device", "2", *stream]])
    return runs


def _run_mixed(tmp: Path, plan: dict[str, tuple[str, str]] = MIXED_PLAN) -> MixedRun:
    vectors = 3  # 0: the ring circuit; 1: GO, then channels; 2: membership events (ours)
    with (
        ServerProcess(tmp, "4M", vectors, ["--format"]) as server,
        ServerProcess(tmp, "4M", 2, ["--format"], name="b.sock") as b,
        ServerProcess(tmp, "16M", 2, ["--format"], name="c.sock") as c,
        _host_samples(b, c) as host_samples,
        connect(server.socket_path, vectors=vectors) as host,
        Lab(iommu=True) as lab,
    ):
        assert host.id == 0
        known = {0}
        # g1 and g2 share one device process, which joins the server for both at once: their
        # ids come from its log. Then g3's QEMU connects (id 3), so the partners can be given
        # in advance.
        pair = lab.device_process(
            [Doorbell(server.socket_path, vectors, "vfio-user", OURS) for _ in ("g1", "g2")],
            name="pair",
        )
        ids = _served_ids(lab.device_log_path("pair"), ["g1", "g2"])
        while not set(ids.values()) <= set(host.peers):
            host.wait(timeout=0.1)
        known |= set(ids.values())
        guests = {}
        for number, (name, (kind, partner)) in enumerate(plan.items(), start=1):
            options = {
                "participants": 4,
                # Not known yet: g3's, which connects after the pair (3).
                "partner": 0 if partner == "host" else ids.get(partner, 3),
                "channel": "g2-host" if "host" in (name, partner) else "g1-g3",
                "watch_joins": name == "g1",
                "expect_id": number,
                "samples": _guest_samples(name),
            }
            # Devices 1 and 2 (ours too) for the samples, as many as this guest runs.
            servers = (b, c)[: len(_guest_samples(name))]
            extra = [Doorbell(s.socket_path, 2, "vfio-user") for s in servers]
            guests[name] = lab.start(
                GUEST_PROGRAM,
                ["main", json.dumps(options)],
                name=name,
                devices=[
                    pair[int(name[1:]) - 1]
                    if name in ids
                    else Doorbell(server.socket_path, vectors, kind),  # type: ignore[arg-type]
                    *extra,
                ],
                qemu11=True,  # QEMU's device under the same QEMU as ours
                timeout=LAB_TIMEOUT,
            )
            if name not in ids:
                ids[name] = wait_for_new_peer(host, known)
        ready = {
            name: report(g.wait_for_output("READY-END", LAB_TIMEOUT), "READY")
            for name, g in guests.items()
        }
        info = {
            name: report(g.wait_for_output("INFO-END", LAB_TIMEOUT), "INFO")["devices"]
            for name, g in guests.items()
        }
        for name in guests:
            host.notify(ids[name], device_guest.GO)
        everyone = [0, *ids.values()]
        host_rings = device_guest.travel(host, 0, device_guest.circuit(everyone))
        from ivshmem.channel import Duplex

        with Duplex(host, "g2-host", ids["g2"], vector=1, timeout=device_guest.WAIT) as link:
            for n in range(device_guest.CHANNEL_MESSAGES):
                link.send(f"0->{ids['g2']} #{n}".encode())
            got = [link.recv(timeout=device_guest.WAIT).decode() for _ in range(200)]
        host_channel_ok = got == [
            f"{ids['g2']}->0 #{n}" for n in range(device_guest.CHANNEL_MESSAGES)
        ]
        # g1 watches a peer join and leave: one more host peer comes and goes.
        joiner_id = None
        if plan["g1"][0] == "vfio-user":
            guests["g1"].wait_for_output("WATCHING", LAB_TIMEOUT)
            with connect(server.socket_path, vectors=vectors) as joiner:
                joiner_id = joiner.id
                guests["g1"].wait_for_output("SAW-JOIN", LAB_TIMEOUT)
        results = {name: g.wait(LAB_TIMEOUT) for name, g in guests.items()}
        pids = [g.pid for g in guests.values()]
        # A guest's device process stops when its QEMU exits, so the guest leaves the server
        # then, as with QEMU's device (whose QEMU is the peer), not when the lab closes.
        deadline = time.monotonic() + 30
        while set(host.peers) & set(ids.values()) and time.monotonic() < deadline:
            host.wait(timeout=0.1)
        left_with_their_guests = not set(host.peers) & set(ids.values())
        device_pids = list(lab._device_hosts.pids) if lab._device_hosts is not None else []
        host_finished = {name: _finish(proc) for name, proc in host_samples.items()}
        pair_log = lab.device_log_path("pair").read_text(errors="replace")
    leftovers = [pid for pid in [*pids, *device_pids] if Path(f"/proc/{pid}").exists()]
    done = {}
    samples: dict[tuple[str, str], dict[str, Any]] = {}
    for name, res in results.items():
        if "DONE {" in res.output:
            done[name] = report(res.output, "DONE")
        for sample, result in _sample_results(res.output).items():
            samples[(name, sample)] = result
    for _, text in host_finished.values():
        for found, result in _sample_results(text).items():
            samples[("host", found)] = result
    return MixedRun(
        ids=ids,
        ready=ready,
        info=info,
        done=done,
        host_rings=host_rings,
        host_channel_ok=host_channel_ok,
        joiner=joiner_id,
        outputs={name: res.describe() for name, res in results.items()},
        status={name: res.returncode for name, res in results.items()},
        leftovers=leftovers,
        left_with_their_guests=left_with_their_guests,
        samples=samples,
        host_samples=host_finished,
        pair_log=pair_log,
    )


def _served_ids(log: Path, names: list[str], timeout: float = 60.0) -> dict[str, int]:
    """The peer ids a device process serving one VM per name got (``vmN: serving ... peer
    N)`` lines of its log, in --vm order)."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(r"\bvm(\d+): serving \S+ \(.*peer (\d+)\)$", log.read_text(), re.M)
        if len(found) == len(names):
            by_index = {int(vm): int(peer) for vm, peer in found}
            return {name: by_index[i] for i, name in enumerate(names)}
        assert time.monotonic() < deadline, f"the device process said:\n{log.read_text()}"
        time.sleep(0.05)


@contextlib.contextmanager
def _host_samples(b: ServerProcess, c: ServerProcess) -> Iterator[dict[str, Popen]]:
    """The host's side of the samples: the counter's third peer on b, bandwidth's receiver on
    c; killed if still running at the end."""
    count = ["--peers", "3", "--increments", str(INCREMENTS)]
    procs = {
        "counter": _start_sample("counter", b, *count),
        "bandwidth": _start_sample("bandwidth", c, "recv"),
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _finish(proc: Popen) -> tuple[int | None, str]:
    try:
        out, _ = proc.communicate(timeout=LAB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


@pytest.fixture(scope="module")
def mixed() -> Iterator[MixedRun]:
    qemu11_ready()
    tmp = Path(tempfile.mkdtemp(prefix="ivd-", dir="/tmp"))  # short: Unix socket paths
    try:
        yield _run_mixed(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_every_guest_succeeded(mixed: MixedRun) -> None:
    for name, status in mixed.status.items():
        assert status == 0, mixed.outputs[name]
    assert mixed.ids == {"g1": 1, "g2": 2, "g3": 3}
    assert mixed.leftovers == []
    assert mixed.left_with_their_guests


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_rings_in_every_direction(mixed: MixedRun) -> None:
    # 4 participants: 12 ordered pairs; each participant takes one ring per other participant.
    assert len(device_guest.circuit([0, 1, 2, 3])) == 12
    assert mixed.host_rings == 3
    assert {name: d["rings"] for name, d in mixed.done.items()} == {"g1": 3, "g2": 3, "g3": 3}


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_channels_between_devices(mixed: MixedRun) -> None:
    assert mixed.done["g1"]["channel_ok"] and mixed.done["g3"]["channel_ok"]
    assert mixed.done["g2"]["channel_ok"] and mixed.host_channel_ok


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_devices_as_the_guests_see_them(mixed: MixedRun) -> None:
    from ivshmem import registers as reg

    for name in ("g1", "g2"):
        ready = mixed.ready[name]
        assert ready["ours"] and ready["mode"] == "msix" and ready["vectors"] == 3
        assert ready["features"] & reg.FEATURE_MEMBERSHIP
        assert ready["features"] & reg.FEATURE_SERVER
        assert ready["event_vector"] == EVENT_VECTOR
        assert ready["server_state"] == "connected"
        others = sorted({0, 1, 2, 3} - {mixed.ids[name]})
        # The registers and the server's table in the region agree.
        assert ready["registers_peers"] == ready["table_peers"] == others
    qemus = mixed.ready["g3"]
    assert not qemus["ours"] and qemus["mode"] == "msix" and qemus["registers_peers"] is None
    assert qemus["table_peers"] == [0, 1, 2]


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_sample_counter_round_two_guests_on_our_device_and_the_host(mixed: MixedRun) -> None:
    for name, (status, text) in mixed.host_samples.items():
        assert status == 0, f"host {name}:\n{text}"
    results = [mixed.samples[(who, "counter")] for who in ("host", "g1", "g2")]
    assert all(r["value"] == 3 * INCREMENTS and r["exact"] for r in results)
    assert all(r["ring"] == results[0]["ring"] for r in results)
    assert sorted(r["position"] for r in results) == [0, 1, 2]
    assert all("guest device" in r["endpoint"] for r in results[1:])


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_sample_bandwidth_from_our_device_to_the_host(mixed: MixedRun) -> None:
    sent = mixed.samples[("g2", "bandwidth")]
    got = mixed.samples[("host", "bandwidth")]
    assert got["ok"] and sent["ok"]
    assert got["checked_bytes"] == STREAM[0] * STREAM[1] == sent["checked_bytes"]
    assert (got["sender"], got["receiver"]) == (sent["id"], got["id"])
    assert got["mb_per_s"] > 0


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_two_guests_of_one_device_process_ring_each_other_directly(
    mixed: MixedRun,
) -> None:
    # The circuit has one ring g1 -> g2 and one g2 -> g1: each went straight through the
    # process; every other ring of theirs (to g3 and the host, GO, channels) through the
    # server. Each VM logs its counts when its QEMU goes away.
    counts = re.findall(
        r"\b(vm\d): vfio-user connection closed: .*\(doorbells so far: (\d+) direct, (\d+) "
        r"through the server\)",
        mixed.pair_log,
    )
    assert sorted(vm for vm, _, _ in counts) == ["vm0", "vm1"], mixed.pair_log
    assert {vm: int(direct) for vm, direct, _ in counts} == {"vm0": 1, "vm1": 1}
    assert all(int(through) >= 2 for _, _, through in counts)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_ivshmem_info_tells_the_devices_apart(mixed: MixedRun) -> None:
    for name in ("g1", "g2"):
        first, *samples = mixed.info[name]
        assert first["device"] == "ours" and first["interrupts"] == "msix"
        assert first["id"] == mixed.ids[name] and first["vectors"] == 3
        ext = first["extension"]
        assert ext["features"] == ["membership", "membership-irq", "reconnect", "server"]
        assert ext["event_vector"] == EVENT_VECTOR and ext["server_state"] == "connected"
        assert isinstance(ext["peers"], int) and 1 <= ext["peers"] <= 3  # others still booting
        assert [d["device"] for d in samples] == ["ours"] * len(_guest_samples(name))
        assert all(d["extension"]["event_vector"] is None for d in samples)
    (qemus,) = mixed.info["g3"]
    assert qemus["device"] == "qemu" and qemus["extension"] is None
    assert qemus["interrupts"] == "msix" and qemus["id"] == mixed.ids["g3"]


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_mixed_join_and_leave_interrupt(mixed: MixedRun) -> None:
    from ivshmem import registers as reg

    watched = mixed.done["g1"]
    assert watched["joined"] == [mixed.joiner]
    assert watched["events"] & reg.EVENT_JOINED and watched["events"] & reg.EVENT_LEFT


# -- INTx, a sample, and a server restart ----------------------------------------------------


@dataclass
class IntxRun:
    devices: list[list[Any]]
    pong: dict[str, Any]
    pong_status: int
    intx: dict[str, Any]
    intx_host: dict[str, Any]
    host_got: int | None
    before: dict[str, Any]
    host_saw_marker: bool
    after: dict[str, Any]
    restarted_host_got: int | None
    done: dict[str, Any]
    status: int | None
    output: str


def _start_sample(name: str, server: ServerProcess, *args: str) -> Popen:
    """A sample as a host peer of ``server`` (its output and errors merged, JSON result)."""
    argv = [sys.executable, "-m", f"ivshmem.samples.{name}", *args, "--socket"]
    argv += [server.socket_path, "--vectors", str(server.vectors), *SAMPLE_WAIT]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _start_pong(server: ServerProcess) -> Popen:
    return _start_sample("pingpong", server, "pong")


def _run_intx(tmp: Path) -> IntxRun:
    region = tmp / "restart.mem"
    # Server "s" (formatted) serves the INTx device; "r" (a named file, so a restarted "r"
    # shares the same memory) the device whose server is restarted.
    with ServerProcess(tmp, "4M", 2, ["--format"], name="s.sock") as s:
        pong = _start_pong(s)
        try:
            with Lab(iommu=True) as lab:
                with (
                    ServerProcess(tmp, "1M", 2, ["--file", str(region)], name="r.sock") as r,
                    connect(r.socket_path, vectors=2) as watcher,
                ):
                    guest = lab.start(
                        GUEST_PROGRAM,
                        ["intx", json.dumps({"pong": 0})],
                        devices=[
                            Doorbell(s.socket_path, 2, "vfio-user", ("--intx",)),
                            Doorbell(r.socket_path, 2, "vfio-user", ("--event-vector", "1")),
                        ],
                        timeout=LAB_TIMEOUT,
                    )
                    intx = report(guest.wait_for_output("INTX-END", LAB_TIMEOUT), "INTX")
                    with connect(s.socket_path, vectors=2) as host:
                        host_got = host.wait(0, timeout=60)
                        host.notify(intx["id"], 0)
                        guest.wait_for_output("INTX-HOST-END", LAB_TIMEOUT)
                    before = report(guest.wait_for_output("BEFORE-END", LAB_TIMEOUT), "BEFORE")
                    marker = f"written by guest {before['id']} before the restart".encode()
                    host_saw_marker = bytes(watcher.memory[4096 : 4096 + len(marker)]) == marker
                # "r" stopped: the device loses its server; then a new "r" on the same file.
                with (
                    ServerProcess(tmp, "1M", 2, ["--file", str(region)], name="r.sock") as r2,
                    connect(r2.socket_path, vectors=2) as again,
                ):
                    after = report(guest.wait_for_output("AFTER-END", LAB_TIMEOUT), "AFTER")
                    restarted_host_got = again.wait(0, timeout=60)
                    deadline = time.monotonic() + 30
                    while after["id"] not in again.peers and time.monotonic() < deadline:
                        again.wait(timeout=0.1)
                    again.notify(after["id"], 0)
                    result = guest.wait(LAB_TIMEOUT)
        finally:
            if pong.poll() is None:
                pong.kill()
            pong_out, _ = pong.communicate(timeout=30)
    pong_results = [json.loads(x) for x in pong_out.splitlines() if x.startswith("{")]
    return IntxRun(
        devices=report(result.output, "DEVICES")["devices"],
        pong=pong_results[0] if pong_results else {"output": pong_out},
        pong_status=pong.returncode,
        intx=intx,
        intx_host=report(result.output, "INTX-HOST"),
        host_got=host_got,
        before=before,
        host_saw_marker=host_saw_marker,
        after=after,
        restarted_host_got=restarted_host_got,
        done=report(result.output, "DONE") if "DONE {" in result.output else {},
        status=result.returncode,
        output=result.describe(),
    )


@pytest.fixture(scope="module")
def intx_run() -> Iterator[IntxRun]:
    qemu11_ready()
    tmp = Path(tempfile.mkdtemp(prefix="ivx-", dir="/tmp"))
    try:
        yield _run_intx(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_intx_guest_succeeded(intx_run: IntxRun) -> None:
    assert intx_run.status == 0, intx_run.output
    # Device 0 in INTx mode: pin 1, no MSI-X, still a doorbell device; device 1 MSI-X.
    assert intx_run.devices == [["doorbell", 1, None], ["doorbell", 0, 2]]


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_intx_sample_pingpong(intx_run: IntxRun) -> None:
    assert intx_run.pong_status == 0, intx_run.pong
    assert intx_run.pong["echoed"] > 200 and intx_run.pong["peer"] == intx_run.intx["id"]


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_intx_doorbells_both_ways(intx_run: IntxRun) -> None:
    assert intx_run.intx["mode"] == "intx"
    assert intx_run.intx["self"] == [1, 0]  # IntrStatus told the two vectors apart
    assert intx_run.host_got == 0
    assert intx_run.intx_host["got"] == 0


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_server_restart_seen_from_the_guest(intx_run: IntxRun) -> None:
    from ivshmem import registers as reg

    assert intx_run.before["state"] == "connected" and intx_run.host_saw_marker
    after = intx_run.after
    assert after["kept"], "BAR2 lost its content across the restart"
    assert after["events"] & reg.EVENT_SERVER_LOST and after["events"] & reg.EVENT_RECONNECTED
    assert after["state"] == "connected"
    assert intx_run.restarted_host_got == 0  # the guest's ring reached the new server's peer
    assert intx_run.done["ring_after_restart"] == 0  # and the new peer's ring reached it


# -- plumbing without a boot -----------------------------------------------------------------


def test_vfio_user_device_arguments(short_tmp: Path) -> None:
    import socket

    path = short_tmp / "dev.sock"
    with pytest.raises(LabUsageError, match="no vfio-user socket at"):
        device_arguments([VfioUser(path)])
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        args = device_arguments([VfioUser(path)], lambda p: "/inside" + p)
    assert args[0] == "-device"
    assert json.loads(args[1]) == {
        "driver": "vfio-user-pci",
        "id": "ivshmem0",
        "socket": {"type": "unix", "path": f"/inside{path}"},
    }
    with pytest.raises(LabUsageError, match="served by an ivshmem-device process"):
        device_arguments([Doorbell(path, 1, "vfio-user")])


def test_lab_refuses_bad_device_choices(short_tmp: Path) -> None:
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is not installed")
    with Lab() as lab:
        with pytest.raises(LabUsageError, match="device must be one of qemu, vfio-user"):
            lab.start(code="pass", device="pci")  # type: ignore[arg-type]
        with pytest.raises(LabUsageError, match=r"needs QEMU >= 10\.1"):
            lab.start(
                code="pass",
                server_socket=short_tmp / "none.sock",
                device="vfio-user",
                qemu11=False,
            )
        with pytest.raises(LabUsageError, match="no ivshmem server socket"):
            lab.start(code="pass", server_socket=short_tmp / "none.sock", device="vfio-user")
        assert lab.guests == []


def test_qemu11_runner_sees_the_host_under_one_directory() -> None:
    from ivshmem.lab import qemu11
    from ivshmem.lab.vmm import HOST_MOUNT, qemu11_command

    chrooted = qemu11.Qemu11((11, 1, 3), "/usr/bin/qemu-system-x86_64", Path("/srv/root"))
    if os.geteuid() != 0:
        with pytest.raises(LabError, match="needs root"):
            qemu11_command(chrooted)
        return
    command = qemu11_command(chrooted)
    assert command.prefix[:4] == ("unshare", "-m", "--propagation", "private")
    assert command.prefix[-2:] == ("/srv/root", "/usr/bin/qemu-system-x86_64")
    assert command.path("/") == HOST_MOUNT
    assert command.path("/tmp/x.sock") == f"{HOST_MOUNT}/tmp/x.sock"
    on_path = qemu11_command(qemu11.Qemu11((11, 0, 0), "/usr/local/bin/qemu-system-x86_64"))
    assert on_path.prefix == ("/usr/local/bin/qemu-system-x86_64",)
    assert on_path.path("/tmp/x") == "/tmp/x"


def test_lab_run_cli_offers_the_device_choice() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ivshmem.cli.main", "lab", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--device {qemu,vfio-user}" in done.stdout and "--qemu11" in done.stdout


def test_a_device_that_cannot_start_is_reported_with_its_log(short_tmp: Path) -> None:
    qemu11_ready()
    with ServerProcess(short_tmp, "1M", 1) as server, Lab(iommu=True) as lab:
        with pytest.raises(LabError, match=r"ivshmem-device for g0-0 exited with status 2") as err:
            lab.start(
                code="pass",
                devices=[Doorbell(server.socket_path, 1, "vfio-user", ("--event-vector", "5"))],
            )
        assert "--event-vector 5 is not one of the device's vectors" in str(err.value)
        assert lab.guests == []


def test_a_failing_guest_names_what_its_device_logged(short_tmp: Path) -> None:
    # Broken on purpose, and fast (QEMU stops while realizing its devices, before any boot):
    # a second vfio-user-pci on the socket of the guest's device process, which turns the
    # second client away and logs it; QEMU then cannot set that device up and exits.
    qemu11_ready()
    with ServerProcess(short_tmp, "1M", 1) as server, Lab(iommu=True) as lab:
        socket = lab._job_root() / "devices" / "g0-0.sock"  # where the lab puts g0's device
        second = {
            "driver": "vfio-user-pci",
            "id": "second",
            "socket": {"type": "unix", "path": lab.qemu11_command().path(str(socket))},
        }
        guest = lab.start(
            code="pass",
            devices=[Doorbell(server.socket_path, 1, "vfio-user")],
            extra_args=["-device", json.dumps(second)],
            timeout=120,
        )
        with pytest.raises(LabError) as err:
            guest.wait(120)
    message = str(err.value)
    assert "QEMU exited with status" in message
    assert "--- ivshmem-device g0-0 (last lines) ---" in message
    assert "a second vfio-user client was turned away" in message
    # The device's lines come after QEMU's, which say why QEMU stopped.
    assert message.index("--- QEMU (last lines) ---") < message.index("--- ivshmem-device")


def test_one_device_process_for_several_guests_without_a_boot(short_tmp: Path) -> None:
    from ivshmem.lab.devicehost import shared_command

    with ServerProcess(short_tmp, "1M", 2) as server:
        ours = Doorbell(server.socket_path, 2, "vfio-user", ("--event-vector", "1"))
        with pytest.raises(LabUsageError, match="serves Doorbell"):
            shared_command([Doorbell(server.socket_path, 2)], ["/tmp/x.sock"])
        with pytest.raises(LabUsageError, match="'--size' cannot be given"):
            shared_command([Doorbell(server.socket_path, 2, "vfio-user", ("--size", "1M"))], ["x"])
        argv = shared_command(
            [ours, Doorbell(server.socket_path, 2, "vfio-user", ("--intx",))],
            ["/a.sock", "/b.sock"],
        )
        assert argv[-4:] == [
            "--vm",
            f"socket=/a.sock,server={server.socket_path},vectors=2,event-vector=1",
            "--vm",
            f"socket=/b.sock,server={server.socket_path},vectors=2,intx=1",
        ]
        with Lab() as lab:
            with pytest.raises(LabUsageError, match="no ivshmem server socket"):
                lab.device_process([Doorbell(short_tmp / "none.sock", 2, "vfio-user")])
            with pytest.raises(LabUsageError, match="at least one device"):
                lab.device_process([], name="empty")
            sockets = lab.device_process([ours, ours], name="two")
            assert len(sockets) == 2 and all(Path(s.socket).is_socket() for s in sockets)
            with connect(server.socket_path, vectors=2) as host:
                deadline = time.monotonic() + 30
                while len(host.peers) < 2 and time.monotonic() < deadline:
                    host.wait(timeout=0.1)
                assert len(host.peers) == 2  # one process, two peers of the server
            with pytest.raises(LabUsageError, match="'two' was started already"):
                lab.device_process([ours], name="two")
            (pid,) = lab._device_hosts.pids if lab._device_hosts is not None else [None]
            log = lab.device_log_path("two")
        # No guest used it: it stops with the lab, which removes its sockets and log.
        assert not Path(f"/proc/{pid}").exists() and not log.exists()
        assert not any(Path(s.socket).exists() for s in sockets)

"""The guest driver's side of this project's device: the register extension (membership,
events, server state), the legacy INTx interrupt turned into vector counts, and detection of
an INTx device in sysfs.

Register semantics that a file cannot have (PeerSelect choosing what PeerAt shows, reads that
clear) are played by :class:`DeviceModel`, a small model of the documented register block
(``ivshmem.registers``); the real device answers the same way in tests/test_device_lab.py.
Eventfds, mappings and the endpoint's wait machinery are real.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import FakeSysfs

from ivshmem import registers as reg
from ivshmem.errors import DeviceError, PeersUnknownError, UsageError
from ivshmem.pci import MembershipEvent, PciEndpoint, find_devices, open_pci
from ivshmem.pci._endpoint import _Intx
from ivshmem.pci._extension import probe, read_membership
from ivshmem.pci._mmio import BarMapping, Registers


class DeviceModel(Registers):
    """The extension's registers as documented: PeerSelect/PeerAt, read-to-clear Events and
    IntrStatus. ``on_read`` runs before each read (to change membership mid-snapshot)."""

    def __init__(self, peers: list[int], *, ivposition: int = 1, event_vector: int = 1) -> None:
        self.peers = sorted(peers)
        self.generation = 1
        self.position = ivposition
        self.select = 0
        self.events = 0
        self.status = 0
        self.mask = 0
        self.state = reg.SERVER_CONNECTED
        self.features = (
            reg.FEATURE_MEMBERSHIP
            | reg.FEATURE_MEMBERSHIP_IRQ
            | reg.FEATURE_SERVER
            | reg.FEATURE_RECONNECT
        )
        self.event_vector = event_vector
        self.reads: list[int] = []
        self.on_read: Callable[[int], None] | None = None
        self.closed = False

    def change(self, peers: list[int]) -> None:
        self.peers = sorted(peers)
        self.generation += 1

    def read32(self, offset: int) -> int:
        self.reads.append(offset)
        if self.on_read is not None:
            self.on_read(offset)
        if offset == reg.INTRSTATUS:
            value, self.status = self.status, 0
            return value
        if offset == reg.EVENTS:
            value, self.events = self.events, 0
            return value
        if offset == reg.PEER_AT:
            return self.peers[self.select] if self.select < len(self.peers) else reg.NO_PEER
        return {
            reg.INTRMASK: self.mask,
            reg.IVPOSITION: self.position,
            reg.EXT_MAGIC: reg.EXT_MAGIC_VALUE,
            reg.EXT_FEATURES: self.features,
            reg.PEER_COUNT: len(self.peers),
            reg.GENERATION: self.generation,
            reg.PEER_SELECT: self.select,
            reg.EVENT_VECTOR: self.event_vector,
            reg.SERVER_STATE: self.state,
        }.get(offset, 0)

    def write32(self, offset: int, value: int) -> None:
        if offset == reg.PEER_SELECT:
            self.select = value
        elif offset == reg.INTRMASK:
            self.mask = value

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


# -- sysfs -----------------------------------------------------------------------------------


def test_an_intx_device_is_a_doorbell_device(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:04.0", kind="intx")
    fake.add_device("0000:00:05.0")  # QEMU's ivshmem-doorbell: pin 0
    intx, qemu = find_devices(str(fake.root))
    assert intx.kind == "doorbell" and intx.intx and intx.interrupt_pin == 1
    assert intx.msix_vectors is None and intx.bars[1] is None
    assert qemu.kind == "doorbell" and not qemu.intx


def test_the_pin_is_readable_without_root(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:04.0", kind="intx", config_readable=False)
    (dev,) = find_devices(str(fake.root))
    assert dev.kind == "doorbell" and dev.intx


def test_intx_argument_is_checked(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:04.0", kind="intx")
    with pytest.raises(UsageError, match="intx must be True, False or None"):
        open_pci(intx="yes", sysfs_root=str(fake.root))  # type: ignore[arg-type]


# -- the extension through a real (file) mapping of BAR0 -------------------------------------


def test_qemus_device_has_no_extension(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:04.0", ivposition=2)
    with open_pci(interrupts=False, sysfs_root=str(fake.root)) as ep:
        assert ep.extension is None
        with pytest.raises(PeersUnknownError):
            _ = ep.peers
        with pytest.raises(DeviceError, match="needs this project's ivshmem device"):
            ep.membership()
        with pytest.raises(DeviceError, match="QEMU's own ivshmem device has no such"):
            _ = ep.server_state


def test_extension_read_through_sysfs(fake: FakeSysfs) -> None:
    dev = fake.add_device("0000:00:04.0", ivposition=2)
    for offset, value in (
        (reg.EXT_MAGIC, reg.EXT_MAGIC_VALUE),
        (reg.EXT_FEATURES, reg.FEATURE_MEMBERSHIP | reg.FEATURE_SERVER),
        (reg.PEER_COUNT, 1),
        (reg.GENERATION, 7),
        (reg.PEER_AT, 5),
        (reg.EVENT_VECTOR, reg.NO_VECTOR),
        (reg.EVENTS, reg.EVENT_JOINED),
        (reg.SERVER_STATE, reg.SERVER_CONNECTED),
    ):
        dev.set_register(offset, value)
    with open_pci(interrupts=False, sysfs_root=str(fake.root)) as ep:
        ext = ep.extension
        assert ext is not None and ext.membership and ext.server
        assert not ext.membership_irq and ext.event_vector is None
        assert ep.peers == frozenset({5})
        snapshot = ep.membership()
        assert (snapshot.generation, snapshot.server_state) == (7, "connected")
        assert ep.generation == 7
        assert ep.server_state == "connected"
        assert ep.take_events() == MembershipEvent.JOINED
        assert dev.register(reg.PEER_SELECT) == 0  # the driver selected index 0
        with pytest.raises(DeviceError, match="rings no vector on membership events"):
            ep.wait_membership(timeout=0)
        # Someone else's fallback never hides the registers' answer.
        ep.set_peers_source(lambda: frozenset({9}))
        assert ep.peers == frozenset({5})


def test_a_bar0_too_small_for_the_extension_is_qemus() -> None:
    model = DeviceModel([])
    assert probe(model, 16) is None
    assert probe(model, 256) is not None


def test_unknown_server_state_is_an_error() -> None:
    model = DeviceModel([2])
    model.state = 7
    with pytest.raises(DeviceError, match="ServerState register reads 0x7"):
        read_membership(model)


# -- consistent snapshots --------------------------------------------------------------------


def test_snapshot_reads_every_id_in_order() -> None:
    model = DeviceModel([4, 0, 9])
    snapshot = read_membership(model)
    assert snapshot.peers == frozenset({0, 4, 9})
    assert snapshot.generation == 1 and snapshot.server_state == "connected"


def test_snapshot_starts_over_when_generation_changes_meanwhile() -> None:
    model = DeviceModel([0, 4])
    changes = iter([[0, 4, 6]])

    def join_once(offset: int) -> None:
        if offset == reg.PEER_AT and model.select == 1:
            nxt = next(changes, None)
            if nxt is not None:
                model.change(nxt)

    model.on_read = join_once
    snapshot = read_membership(model)
    assert snapshot.peers == frozenset({0, 4, 6})
    assert snapshot.generation == 2
    assert model.reads.count(reg.PEER_COUNT) == 2


def test_snapshot_starts_over_when_the_list_shrinks_under_it() -> None:
    model = DeviceModel([0, 4, 6])
    done = False

    def leave(offset: int) -> None:
        nonlocal done
        if offset == reg.PEER_AT and model.select == 1 and not done:
            done = True
            model.change([0])

    model.on_read = leave
    assert read_membership(model).peers == frozenset({0})


def test_snapshot_that_never_settles_is_an_error() -> None:
    model = DeviceModel([0, 4])
    model.on_read = lambda offset: model.change([0, 4]) if offset == reg.PEER_AT else None
    with pytest.raises(DeviceError, match="kept changing while being read"):
        read_membership(model)


def test_a_dead_device_is_an_error_not_a_huge_list() -> None:
    dead = DeviceModel([])
    dead.read32 = lambda offset: 0xFFFFFFFF  # type: ignore[method-assign]
    with pytest.raises(DeviceError, match="device process is gone"):
        read_membership(dead)


# -- INTx ------------------------------------------------------------------------------------


def test_intx_service_counts_vectors_then_unmasks() -> None:
    model = DeviceModel([])
    order: list[str] = []
    trigger = os.eventfd(0, os.EFD_NONBLOCK)
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        intx = _Intx(trigger, model, lambda: order.append(f"unmask status={model.status}"))
        assert intx.service(fds) == 0  # nothing signalled: IntrStatus is not even read
        assert reg.INTRSTATUS not in model.reads and order == []
        model.status = 0b1010  # vector 1, and vector 3 the endpoint does not have
        os.eventfd_write(trigger, 1)
        assert intx.service(fds) == 0b1010
        assert order == ["unmask status=0"]  # unmasked only after the read cleared it
        assert os.eventfd_read(fds[1]) == 1
        assert os.eventfd_read(fds[0]) == 1  # the unknown vector is not dropped
    finally:
        for fd in (trigger, *fds):
            os.close(fd)


def _intx_endpoint(fake: FakeSysfs, model: DeviceModel, vectors: int) -> tuple[PciEndpoint, int]:
    dev = fake.add_device("0000:00:04.0", kind="intx")
    (found,) = find_devices(str(fake.root))
    fd = os.open(dev.file("resource2"), os.O_RDWR)
    try:
        shared = BarMapping(fd, 1 << 20)
    finally:
        os.close(fd)
    trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    unmasked: list[int] = []
    ext = probe(model, 256)
    ep = PciEndpoint(
        found,
        model,
        shared,
        id=1,
        eventfds=[os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(vectors)],
        extension=ext,
        intx=_Intx(trigger, model, lambda: unmasked.append(1)),
    )
    return ep, trigger


def test_intx_endpoint_wait_sync_and_async(fake: FakeSysfs) -> None:
    model = DeviceModel([0], event_vector=1)
    before = set(os.listdir("/proc/self/fd"))
    ep, trigger = _intx_endpoint(fake, model, 2)
    assert ep.interrupt_mode == "intx" and ep.intx_fd == trigger
    assert "intx" in repr(ep)
    assert ep.wait(timeout=0) is None
    model.status = 1 << 0
    os.eventfd_write(trigger, 1)  # what vfio-pci does when the line rises
    assert ep.wait(timeout=5) == 0
    assert ep.wait(timeout=0) is None  # one ring, one count

    async def later() -> int | None:
        loop = asyncio.get_running_loop()

        def ring() -> None:
            model.status = 1 << 1
            os.eventfd_write(trigger, 1)

        loop.call_later(0.05, ring)
        return await ep.wait_async(timeout=5)

    assert asyncio.run(later()) == 1
    ep.close()
    assert model.mask == 0  # the line is left quiet for whoever comes next
    assert set(os.listdir("/proc/self/fd")) == before


def test_wait_membership_on_the_event_vector(fake: FakeSysfs) -> None:
    model = DeviceModel([0], event_vector=1, ivposition=1)
    ep, trigger = _intx_endpoint(fake, model, 2)
    with ep:
        assert ep.wait_membership(timeout=0.05) == MembershipEvent.NONE
        model.change([0, 2])
        model.events = reg.EVENT_JOINED
        model.status = 1 << 1
        os.eventfd_write(trigger, 1)
        assert ep.wait_membership(timeout=5) == MembershipEvent.JOINED
        assert ep.peers == frozenset({0, 2})
        # A server restart: new ids; the endpoint learns its own from IVPosition again.
        model.position = 0
        model.events = reg.EVENT_SERVER_LOST | reg.EVENT_RECONNECTED
        events = ep.take_events()
        assert events == MembershipEvent.SERVER_LOST | MembershipEvent.RECONNECTED
        assert ep.id == 0


def test_wait_membership_needs_the_vector(fake: FakeSysfs) -> None:
    model = DeviceModel([0], event_vector=3)
    ep, _ = _intx_endpoint(fake, model, 2)
    with ep, pytest.raises(Exception, match="vector 3"):
        ep.wait_membership(timeout=0)


# -- ivshmem info ------------------------------------------------------------------------------


def _ours(fake: FakeSysfs, address: str, kind: str, registers: dict[int, int]) -> None:
    dev = fake.add_device(address, kind=kind, ivposition=4)
    dev.set_register(reg.EXT_MAGIC, reg.EXT_MAGIC_VALUE)
    for offset, value in registers.items():
        dev.set_register(offset, value)


def _two_of_ours(fake: FakeSysfs) -> None:
    # An INTx device with the membership interrupt on vector 1 and two other peers, and an
    # MSI-X one whose server is gone (it is reconnecting); then QEMU's device.
    _ours(
        fake,
        "0000:00:04.0",
        "intx",
        {
            reg.EXT_FEATURES: reg.FEATURE_MEMBERSHIP
            | reg.FEATURE_MEMBERSHIP_IRQ
            | reg.FEATURE_INTX
            | reg.FEATURE_SERVER
            | reg.FEATURE_RECONNECT,
            reg.EVENT_VECTOR: 1,
            reg.PEER_COUNT: 2,
            reg.GENERATION: 5,
            reg.SERVER_STATE: reg.SERVER_CONNECTED,
        },
    )
    _ours(
        fake,
        "0000:00:05.0",
        "doorbell",
        {
            reg.EXT_FEATURES: reg.FEATURE_MEMBERSHIP | reg.FEATURE_SERVER | 1 << 9,
            reg.EVENT_VECTOR: reg.NO_VECTOR,
            reg.PEER_COUNT: 0,
            reg.GENERATION: 8,
            reg.SERVER_STATE: reg.SERVER_RECONNECTING,
        },
    )
    fake.add_device("0000:00:06.0", ivposition=2)


def _info(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from ivshmem.cli.main import main

    rc = main(["info", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_shows_our_devices_extension(
    fake: FakeSysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_of_ours(fake)
    rc, out, _ = _info(capsys, "--sysfs-root", str(fake.root), "--json")
    assert rc == 0
    intx, msix, qemu = json.loads(out)
    assert (intx["interrupts"], msix["interrupts"], qemu["interrupts"]) == ("intx", "msix", "msix")
    assert (intx["device"], msix["device"], qemu["device"]) == ("ours", "ours", "qemu")
    assert intx["extension"] == {
        "features": ["membership", "membership-irq", "intx", "reconnect", "server"],
        "event_vector": 1,
        "peers": 2,
        "generation": 5,
        "server_state": "connected",
    }
    assert msix["extension"] == {
        "features": ["membership", "server", "bit 9"],  # a bit this driver does not know
        "event_vector": None,
        "peers": 0,
        "generation": 8,
        "server_state": "reconnecting",
    }
    assert qemu["extension"] is None


def test_info_table_of_our_devices(fake: FakeSysfs, capsys: pytest.CaptureFixture[str]) -> None:
    _two_of_ours(fake)
    rc, out, _ = _info(capsys, "--sysfs-root", str(fake.root))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[-7:] == ["IRQ", "DRIVER", "IOMMU", "ID", "DEVICE", "PEERS", "SERVER"]
    assert lines[1].split()[5] == "intx" and lines[1].split()[-3:] == ["ours", "2", "connected"]
    assert lines[2].split()[5] == "msix"
    assert lines[2].split()[-3:] == ["ours", "0", "reconnecting"]
    assert lines[3].split()[-3:] == ["qemu", "-", "-"]
    assert lines[4] == ""
    assert lines[5:] == [
        "0000:00:04.0: ivshmem-device, features: membership, membership-irq on vector 1, intx, "
        "reconnect, server; generation 5",
        "0000:00:05.0: ivshmem-device, features: membership, server, bit 9; generation 8",
    ]


def test_info_on_a_plain_device_of_ours(
    fake: FakeSysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    # Plain mode: no server, no membership (the registers read 0), no interrupts.
    registers = {reg.EVENT_VECTOR: reg.NO_VECTOR, reg.SERVER_STATE: reg.SERVER_PLAIN}
    _ours(fake, "0000:00:04.0", "plain", registers)
    rc, out, _ = _info(capsys, "--sysfs-root", str(fake.root), "--json")
    assert rc == 0
    (plain,) = json.loads(out)
    assert plain["device"] == "ours" and plain["interrupts"] is None
    assert plain["extension"] == {
        "features": [],
        "event_vector": None,
        "peers": None,
        "generation": None,
        "server_state": "plain",
    }


def test_info_says_nothing_of_a_device_whose_registers_make_no_sense(
    fake: FakeSysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    # ServerState 7 is no state: the device is newer than this driver, or broken. The table
    # still lists it, without the extension's columns, and the command does not fail.
    _ours(fake, "0000:00:04.0", "doorbell", {reg.SERVER_STATE: 7})
    rc, out, _ = _info(capsys, "--sysfs-root", str(fake.root), "--json")
    assert rc == 0
    (dev,) = json.loads(out)
    assert dev["device"] is None and dev["extension"] is None

"""Our ivshmem device (vfio-user, ivshmem.device) under QEMU 11's qtest: config space, BARs,
every register, MSI-X and INTx, membership, a server restart, two VMs on one device process.

Each test starts the device in this process (devicehelp.serving), an ivshmem server as a
real process where the mode needs one (serverproc.ServerProcess), and a paused QEMU 11 with
``-accel qtest`` attached over ``vfio-user-pci``; the qtest driver plays the guest.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from devicehelp import attach, device_arg, new_fds, open_fds, serving
from qtest import (
    PCI_CAP_ID_MSIX,
    IvshmemDevice,
    Qemu,
    find_pci_devices,
    poll_until,
)
from serverproc import RawPeer, ServerProcess

from ivshmem import registers as reg
from ivshmem.device import VmSpec

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]

MIB = 1 << 20
PCI_STATUS = 0x06
STATUS_INTERRUPT = 0x08
COMMAND_INTX_DISABLE = 0x400
WAIT = 10.0  # hang catcher only


def ring_eventfd(fd: int) -> None:
    os.write(fd, (1).to_bytes(8, "little"))


def readable(fd: int, timeout: float = WAIT) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        os.read(fd, 8)
    return bool(ready)


def config_dump(qemu: Qemu) -> dict[str, int]:
    [dev] = find_pci_devices(qemu, 0x1AF4, 0x1110)
    info = {
        "ids": dev.config_read(0x00),
        "class_rev": dev.config_read(0x08),
        "subsystem": dev.config_read(0x2C),
        "pin": dev.config_read(0x3D, 1),
        "header": dev.config_read(0x0E, 1),
    }
    msix = dev.find_capability(PCI_CAP_ID_MSIX)
    info["msix"] = msix is not None
    if msix is not None:
        info["msix_size"] = (dev.config_read(msix + 2, 2) & 0x7FF) + 1
        info["msix_table"] = dev.config_read(msix + 4)
        info["msix_pba"] = dev.config_read(msix + 8)
    for index in range(6):
        bar = dev.probe_bar(index)
        info[f"bar{index}"] = 0 if bar is None else bar.size
        if bar is not None:
            info[f"bar{index}_64"] = bar.is_64bit
            info[f"bar{index}_prefetch"] = bar.prefetchable
    return info


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    with ServerProcess(short_tmp, size="1M", vectors=2) as proc:
        yield proc


# -- config space and BARs -------------------------------------------------------------------


def test_config_space_is_qemus_ivshmem_doorbell(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), server=server.socket_path, vectors=2)]):
        with attach(qemu11, short_tmp, sock, name="ours") as qemu:
            ours = config_dump(qemu)
        theirs_args = [
            "-chardev", f"socket,id=ivs,path={server.socket_path}",
            "-device", "ivshmem-doorbell,chardev=ivs,vectors=2",
        ]  # fmt: skip
        with Qemu(qemu11, short_tmp, theirs_args, name="qemus", accel="qtest") as qemu:
            theirs = config_dump(qemu)
    assert ours == theirs
    assert ours["ids"] == 0x1110_1AF4 and ours["class_rev"] == 0x0500_0001
    assert ours["subsystem"] == 0x1100_1AF4 and ours["pin"] == 0
    assert ours["bar0"] == 256 and ours["bar1"] == 4096 and ours["bar2"] == MIB
    assert ours["bar2_64"] and ours["bar2_prefetch"] and not ours["bar0_64"]
    assert ours["msix_size"] == 2 and ours["msix_table"] == 1 and ours["msix_pba"] == 0x801


def test_plain_config_space_is_qemus_ivshmem_plain(qemu11: list[str], short_tmp: Path) -> None:
    region = short_tmp / "region"
    region.write_bytes(b"\0" * (4 * MIB))
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), region=str(region))]):
        with attach(qemu11, short_tmp, sock, name="ours") as qemu:
            ours = config_dump(qemu)
    theirs_args = [
        "-object", f"memory-backend-file,id=m,mem-path={region},size=4M,share=on",
        "-device", "ivshmem-plain,memdev=m",
    ]  # fmt: skip
    with Qemu(qemu11, short_tmp, theirs_args, name="qemus", accel="qtest") as qemu:
        theirs = config_dump(qemu)
    assert ours == theirs
    assert not ours["msix"] and ours["bar1"] == 0 and ours["bar2"] == 4 * MIB


def test_plain_bar2_is_the_file(qemu11: list[str], short_tmp: Path) -> None:
    region = short_tmp / "region"
    region.write_bytes(b"\0" * MIB)
    with open(region, "r+b") as f:
        f.write(b"from the host")
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), region=str(region))]):
        with attach(qemu11, short_tmp, sock) as qemu:
            dev = IvshmemDevice.find(qemu, msix=False)
            assert dev.read(0, 13) == b"from the host"
            dev.write(MIB - 5, b"guest")
            assert dev.read_register(reg.EXT_MAGIC) == reg.EXT_MAGIC_VALUE
            assert dev.read_register(reg.EXT_FEATURES) == 0
            assert dev.read_register(reg.SERVER_STATE) == reg.SERVER_PLAIN
            assert dev.ivposition == 0
    assert region.read_bytes()[-5:] == b"guest"


# -- registers -----------------------------------------------------------------------------


def test_registers(qemu11: list[str], short_tmp: Path, server: ServerProcess) -> None:
    sock = short_tmp / "dev.sock"
    spec = VmSpec(socket=str(sock), server=server.socket_path, vectors=2, event_vector=1)
    with serving([spec]) as device, attach(qemu11, short_tmp, sock) as qemu:
        dev = IvshmemDevice.find(qemu)
        q, bar0 = qemu, dev.bar0
        assert dev.ivposition == device.vms[0].function.peer_id == server.peer_ids()[0]
        # IntrMask: read/write; narrower reads give its low bytes (QEMU's decoding).
        dev.write_register(reg.INTRMASK, 0x1234_5678)
        assert dev.read_register(reg.INTRMASK) == 0x1234_5678
        assert q.readb(bar0 + reg.INTRMASK) == 0x78 and q.readw(bar0 + reg.INTRMASK) == 0x5678
        assert q.readb(bar0 + reg.INTRMASK + 1) == 0  # not a register's offset
        # IntrStatus: writable, reading clears it.
        dev.write_register(reg.INTRSTATUS, 0x55)
        assert dev.read_register(reg.INTRSTATUS) == 0x55
        assert dev.read_register(reg.INTRSTATUS) == 0
        # Doorbell reads 0; unknown offsets read 0 and ignore writes.
        assert dev.read_register(reg.DOORBELL) == 0
        for offset in (0x34, 0x80, 0xFC):
            dev.write_register(offset, 0xFFFF_FFFF)
            assert dev.read_register(offset) == 0
        # A narrow write lands on the register at offset & 0xfc, zero-extended.
        q.writeb(bar0 + reg.INTRMASK + 2, 0xAB)
        assert dev.read_register(reg.INTRMASK) == 0xAB
        # 8-byte accesses are two 4-byte ones.
        dev.write_register(reg.INTRMASK, 7)
        assert q.readq(bar0 + reg.INTRMASK) == 7  # IntrMask | IntrStatus(0) << 32
        # The extension.
        assert dev.read_register(reg.EXT_MAGIC) == reg.EXT_MAGIC_VALUE
        features = dev.read_register(reg.EXT_FEATURES)
        assert features == (
            reg.FEATURE_MEMBERSHIP
            | reg.FEATURE_MEMBERSHIP_IRQ
            | reg.FEATURE_RECONNECT
            | reg.FEATURE_SERVER
        )
        assert dev.read_register(reg.SERVER_STATE) == reg.SERVER_CONNECTED
        assert dev.read_register(reg.EVENT_VECTOR) == 1
        assert dev.read_register(reg.PEER_COUNT) == 0
        assert dev.read_register(reg.PEER_AT) == reg.NO_PEER
        dev.write_register(reg.PEER_SELECT, 3)
        assert dev.read_register(reg.PEER_SELECT) == 3
        assert dev.read_register(reg.EVENTS) == 0


def test_no_event_vector_reads_no_vector(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), server=server.socket_path)]):
        with attach(qemu11, short_tmp, sock) as qemu:
            dev = IvshmemDevice.find(qemu)
            assert dev.read_register(reg.EVENT_VECTOR) == reg.NO_VECTOR
            assert not dev.read_register(reg.EXT_FEATURES) & reg.FEATURE_MEMBERSHIP_IRQ


# -- doorbells and MSI-X -------------------------------------------------------------------


def test_msix_delivery_and_doorbells_with_a_host_peer(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), server=server.socket_path, vectors=2)]) as device:
        with (
            attach(qemu11, short_tmp, sock) as qemu,
            RawPeer(server.socket_path, keep_fds=True) as host,
        ):
            dev = IvshmemDevice.find(qemu)
            me = dev.ivposition
            host.wait(lambda: host.complete({me}, 2))
            assert host.id is not None
            # Host rings the guest: each vector's MSI lands in guest RAM.
            for vector in (0, 1):
                ring_eventfd(host.peer_fds[me][vector])
                assert dev.take_msi(vector)
                assert dev.arrived_vectors() == set()
            # Masked: nothing arrives; QEMU holds it and delivers it on unmask.
            assert dev.msix is not None
            dev.msix.mask(1)
            ring_eventfd(host.peer_fds[me][1])
            time.sleep(0.3)
            qemu.command("endianness")  # let QEMU's main loop run
            assert not dev.msi_arrived(1)
            # QEMU 11 forwards PBA reads to the device, which never sees the mask bits
            # (QEMU emulates the MSI-X table): the device's PBA reads 0.
            assert not dev.msix.pending(1)
            dev.msix.unmask(1)
            assert dev.take_msi(1)
            # The guest rings the host, on each vector; bad targets are dropped quietly.
            for vector in (0, 1):
                dev.ring(host.id, vector)
                assert readable(host.own_fds[vector])
            dev.ring(host.id, 2)  # no such vector
            dev.ring(0x7FFF, 0)  # no such peer
            # Ringing itself raises its own vector.
            dev.ring(me, 1)
            assert dev.take_msi(1)
            assert device.vms[0].conn is not None  # still connected and answering
            assert dev.ivposition == me


def test_intx_mode(qemu11: list[str], short_tmp: Path, server: ServerProcess) -> None:
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), server=server.socket_path, intx=True)]):
        with (
            attach(qemu11, short_tmp, sock) as qemu,
            RawPeer(server.socket_path, keep_fds=True) as host,
        ):
            [pci] = find_pci_devices(qemu, 0x1AF4, 0x1110)
            assert pci.config_read(0x3D, 1) == 1  # INTA
            assert pci.find_capability(PCI_CAP_ID_MSIX) is None
            dev = IvshmemDevice(pci, msix=False)
            assert dev.read_register(reg.EXT_FEATURES) & reg.FEATURE_INTX
            me = dev.ivposition
            host.wait(lambda: host.complete({me}, 2))
            qemu.command("irq_intercept_in", "ioapic")
            # IntrMask 0: the ring sets IntrStatus but raises nothing.
            ring_eventfd(host.peer_fds[me][1])
            # (IntrStatus reads clear it: poll until the one read that sees vector 1's bit.)
            assert poll_until(lambda: dev.read_register(reg.INTRSTATUS) == 1 << 1, WAIT)
            assert not [e for e in qemu.irq_events if e.startswith("IRQ raise")]
            # Unmasked: a ring raises INTx, reading IntrStatus clears it, the line drops.
            dev.write_register(reg.INTRMASK, 0xFFFF_FFFF)
            ring_eventfd(host.peer_fds[me][0])
            assert poll_until(lambda: _irq(qemu, "raise"), WAIT)
            assert dev.read_register(reg.INTRSTATUS) == 1 << 0
            assert poll_until(lambda: _irq(qemu, "lower"), WAIT)
            assert dev.read_register(reg.INTRSTATUS) == 0
            # PCI 2.3 INTx masking, as a guest's vfio-pci driver uses it: Interrupt Status
            # shows the level, Interrupt Disable keeps the line down until it is cleared.
            assert not pci.config_read(PCI_STATUS, 2) & STATUS_INTERRUPT
            qemu.irq_events.clear()
            pci.command = pci.command | COMMAND_INTX_DISABLE
            ring_eventfd(host.peer_fds[me][1])
            assert poll_until(lambda: bool(pci.config_read(PCI_STATUS, 2) & STATUS_INTERRUPT), WAIT)
            assert not _irq(qemu, "raise")
            pci.command = pci.command & ~COMMAND_INTX_DISABLE
            assert poll_until(lambda: _irq(qemu, "raise"), WAIT)
            assert dev.read_register(reg.INTRSTATUS) == 1 << 1
            assert not pci.config_read(PCI_STATUS, 2) & STATUS_INTERRUPT
            # The guest still rings the host.
            assert host.id is not None
            dev.ring(host.id, 1)
            assert readable(host.own_fds[1])


def _irq(qemu: Qemu, kind: str) -> bool:
    qemu.command("endianness")  # collects the asynchronous IRQ lines
    return any(e.startswith(f"IRQ {kind}") for e in qemu.irq_events)


def test_a_system_reset_resets_the_registers_and_interrupts_work_again(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), server=server.socket_path)]) as device:
        with (
            attach(qemu11, short_tmp, sock) as qemu,
            RawPeer(server.socket_path, keep_fds=True) as host,
        ):
            dev = IvshmemDevice.find(qemu)
            me = dev.ivposition
            host.wait(lambda: host.complete({me}, 2))
            dev.write_register(reg.INTRMASK, 5)
            dev.write_register(reg.INTRSTATUS, 6)
            qemu.qmp("system_reset")  # QEMU sends DEVICE_RESET, as for its own device's reset
            [pci] = find_pci_devices(qemu, 0x1AF4, 0x1110)
            dev = IvshmemDevice(pci)  # BARs and MSI-X set up again, as firmware would
            assert dev.read_register(reg.INTRMASK) == 0
            assert dev.read_register(reg.INTRSTATUS) == 0
            assert dev.ivposition == me
            ring_eventfd(host.peer_fds[me][0])
            assert dev.take_msi(0)
            assert device.vms[0].conn is not None


# -- membership ----------------------------------------------------------------------------


def test_membership_interrupt_and_registers(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    sock = short_tmp / "dev.sock"
    spec = VmSpec(socket=str(sock), server=server.socket_path, vectors=3, event_vector=2)
    with serving([spec]), attach(qemu11, short_tmp, sock) as qemu:
        dev = IvshmemDevice.find(qemu)
        generation = dev.read_register(reg.GENERATION)
        dev.read_register(reg.EVENTS)
        with RawPeer(server.socket_path) as first, RawPeer(server.socket_path) as second:
            first.wait(lambda: first.id is not None)
            second.wait(lambda: second.id is not None)
            assert dev.take_msi(2)
            assert poll_until(lambda: dev.read_register(reg.PEER_COUNT) == 2, WAIT)
            assert dev.read_register(reg.EVENTS) == reg.EVENT_JOINED
            assert dev.read_register(reg.EVENTS) == 0  # reading cleared it
            assert dev.read_register(reg.GENERATION) == generation + 2
            ids = []
            for index in range(3):
                dev.write_register(reg.PEER_SELECT, index)
                ids.append(dev.read_register(reg.PEER_AT))
            assert first.id is not None and second.id is not None
            assert ids == [*sorted([first.id, second.id]), reg.NO_PEER]
            dev.clear_msi(2)
        # Both left.
        assert poll_until(lambda: dev.read_register(reg.PEER_COUNT) == 0, WAIT)
        assert dev.take_msi(2)
        assert dev.read_register(reg.EVENTS) == reg.EVENT_LEFT
        assert dev.read_register(reg.GENERATION) == generation + 4
        dev.write_register(reg.PEER_SELECT, 0)
        assert dev.read_register(reg.PEER_AT) == reg.NO_PEER
        # The membership vector is not one of the server's: the server gave 2 vectors.
        assert dev.arrived_vectors() == set()


# -- server restart ------------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["file", "memfd"])
def test_the_vm_survives_a_server_restart(qemu11: list[str], short_tmp: Path, backing: str) -> None:
    region = short_tmp / "region"
    extra = ["--file", str(region)] if backing == "file" else ["--memfd"]
    sock = short_tmp / "dev.sock"
    first = ServerProcess(short_tmp, size="1M", vectors=2, extra_args=extra).start()
    second: ServerProcess | None = None
    try:
        # A placeholder peer holds id 0 on the first server, so the device's id changes
        # when it reconnects alone to the second one.
        placeholder = RawPeer(first.socket_path)
        placeholder.wait(lambda: placeholder.id is not None)
        spec = VmSpec(socket=str(sock), server=first.socket_path, vectors=3, event_vector=2)
        with serving([spec]) as device, attach(qemu11, short_tmp, sock) as qemu:
            dev = IvshmemDevice.find(qemu)
            dev.write(0, b"kept across restarts")
            dev.read_register(reg.EVENTS)
            old_id = dev.ivposition
            placeholder.close()
            assert dev.take_msi(2)  # the placeholder left
            first.stop()
            assert dev.take_msi(2)
            assert dev.read_register(reg.SERVER_STATE) == reg.SERVER_RECONNECTING
            assert dev.read_register(reg.EVENTS) == reg.EVENT_LEFT | reg.EVENT_SERVER_LOST
            # BAR0 keeps answering at once while the server is away; doorbells go nowhere.
            start = time.monotonic()
            assert dev.read_register(reg.EXT_MAGIC) == reg.EXT_MAGIC_VALUE
            dev.ring(0, 0)
            assert time.monotonic() - start < 1.0
            second = ServerProcess(short_tmp, size="1M", vectors=2, extra_args=extra).start()
            assert poll_until(
                lambda: dev.read_register(reg.SERVER_STATE) == reg.SERVER_CONNECTED, WAIT
            )
            assert dev.take_msi(2)
            events = dev.read_register(reg.EVENTS)
            assert events & reg.EVENT_RECONNECTED
            new_id = dev.ivposition
            assert new_id == device.vms[0].function.peer_id != old_id
            # BAR2 is the memory QEMU mapped first, with its content.
            assert dev.read(0, 20) == b"kept across restarts"
            with RawPeer(second.socket_path, keep_fds=True) as host:
                host.wait(lambda: host.complete({new_id}, 2))
                assert host.id is not None and host.shm_fd is not None
                ring_eventfd(host.peer_fds[new_id][1])
                assert dev.take_msi(1)
                dev.ring(host.id, 0)
                assert readable(host.own_fds[0])
                shared = os.pread(host.shm_fd, 20, 0)
            if backing == "file":
                assert not events & reg.EVENT_REGION_CHANGED
                assert shared == b"kept across restarts"
            else:  # a memfd server starts over with memory this guest cannot see
                assert events & reg.EVENT_REGION_CHANGED
                assert shared != b"kept across restarts"
    finally:
        for proc in (first, second):
            if proc is not None and proc.alive:
                proc.stop(check=False)
        region.unlink(missing_ok=True)


def test_a_silent_server_does_not_hold_the_device(qemu11: list[str], short_tmp: Path) -> None:
    sock = short_tmp / "dev.sock"
    first = ServerProcess(short_tmp, size="1M", vectors=1).start()
    second: ServerProcess | None = None
    try:
        spec = VmSpec(socket=str(sock), server=first.socket_path)
        with serving([spec]) as device, attach(qemu11, short_tmp, sock) as qemu:
            vm = device.vms[0]
            vm.greeting_timeout = 0.5
            dev = IvshmemDevice.find(qemu)
            dev.read_register(reg.EVENTS)
            first.stop()
            # Something accepts connections at the server's path and never says a word.
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                silent.bind(first.socket_path)
                silent.listen(8)
                assert poll_until(lambda: "no greeting" in vm.link.lost if vm.link else False, WAIT)
                start = time.monotonic()
                assert dev.read_register(reg.SERVER_STATE) == reg.SERVER_RECONNECTING
                assert time.monotonic() - start < 1.0
            finally:
                silent.close()
                os.unlink(first.socket_path)
            second = ServerProcess(short_tmp, size="1M", vectors=1).start()
            assert poll_until(
                lambda: dev.read_register(reg.SERVER_STATE) == reg.SERVER_CONNECTED, WAIT
            )
            # The failed attempts told the guest nothing: one loss, one reconnection (to a
            # memfd server, hence new memory).
            events = dev.read_register(reg.EVENTS)
            assert events == (
                reg.EVENT_SERVER_LOST | reg.EVENT_RECONNECTED | reg.EVENT_REGION_CHANGED
            )
    finally:
        for proc in (first, second):
            if proc is not None and proc.alive:
                proc.stop(check=False)


# -- several VMs in one device process -----------------------------------------------------


def test_two_vms_on_one_device_ring_each_other_directly(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    a_sock, b_sock = short_tmp / "a.sock", short_tmp / "b.sock"
    specs = [
        VmSpec(socket=str(a_sock), server=server.socket_path, vectors=2, name="a"),
        VmSpec(socket=str(b_sock), server=server.socket_path, vectors=2, name="b"),
    ]
    with serving(specs) as device:
        with (
            attach(qemu11, short_tmp, a_sock, name="a") as qa,
            attach(qemu11, short_tmp, b_sock, name="b") as qb,
        ):
            a, b = IvshmemDevice.find(qa), IvshmemDevice.find(qb)
            a_id, b_id = a.ivposition, b.ivposition
            assert a_id != b_id
            assert poll_until(lambda: a.read_register(reg.PEER_COUNT) == 1, WAIT)
            vm_a, vm_b = device.vms
            a.ring(b_id, 1)
            assert b.take_msi(1)
            b.ring(a_id, 0)
            assert a.take_msi(0)
            assert vm_a.direct_rings == 1 and vm_b.direct_rings == 1
            assert vm_a.server_rings == 0 and vm_b.server_rings == 0
            # Same memory: one server region behind both BAR2s.
            a.write(100, b"a to b")
            assert b.read(100, 6) == b"a to b"


# -- the device process survives what QEMU does --------------------------------------------


def test_qemu_going_away_releases_everything(
    qemu11: list[str], short_tmp: Path, server: ServerProcess
) -> None:
    sock = short_tmp / "dev.sock"
    with serving([VmSpec(socket=str(sock), server=server.socket_path, vectors=2)]) as device:
        assert poll_until(lambda: len(device.vms[0].own_fds) == 2, WAIT)  # the server's vectors
        before = open_fds()
        for round_ in range(2):  # the same socket serves a restarted VM
            with attach(qemu11, short_tmp, sock, name=f"vm{round_}") as qemu:
                dev = IvshmemDevice.find(qemu)
                assert dev.read_register(reg.EXT_MAGIC) == reg.EXT_MAGIC_VALUE
            assert poll_until(lambda: device.vms[0].conn is None, WAIT)
            assert poll_until(lambda: not new_fds(before), WAIT), new_fds(before)


def test_device_arg_is_json() -> None:
    assert device_arg("/tmp/x.sock").startswith('{"driver": "vfio-user-pci"')

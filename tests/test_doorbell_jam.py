"""A peer that jams a doorbell (O_NONBLOCK cleared on the shared file description, counter set
to its maximum) must not hang the host peers and VMs that ring it: the server resets it."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qtest import IvshmemDevice, Qemu
from serverproc import RawPeer, ServerProcess

import ivshmem
from ivshmem.server.doorbells import saturated, unjam

_MAX = (1 << 64) - 2  # the largest count an eventfd holds


def _jam(fd: int) -> None:
    """What a hostile peer does to any doorbell it holds."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    os.eventfd_write(fd, _MAX)


def _hostile(server: ServerProcess, others: int) -> RawPeer:
    peer = RawPeer(server.socket_path, keep_fds=True)
    peer.wait(lambda: peer.own_fds != [] and len(peer.peer_fds) == others)
    return peer


def _in_thread(call: Callable[[], object]) -> threading.Event:
    """Run ``call`` in a daemon thread; the event is set when it returned."""
    done = threading.Event()

    def run() -> None:
        call()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_saturated_and_unjam_on_a_plain_eventfd() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert saturated([fd]) == []
        _jam(fd)
        assert saturated([fd]) == [fd]
        assert unjam(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert saturated([fd]) == []
        assert os.eventfd_read(fd) == 1  # the one ring put back for its owner
        assert not unjam(fd)  # nothing to read: not jammed, nothing written
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("whose", ["its own", "an honest peer's"])
def test_a_jammed_doorbell_stops_a_host_peers_notify_for_at_most_a_moment(
    short_tmp: Path, whose: str
) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1) as server:
        victim = ivshmem.connect(server.socket_path)
        ringer = ivshmem.connect(server.socket_path)
        hostile = _hostile(server, others=2)
        unblock = -1
        try:
            target = hostile.id if whose == "its own" else victim.id
            assert target is not None
            fd = hostile.own_fds[0] if whose == "its own" else hostile.peer_fds[victim.id][0]
            _jam(fd)
            unblock = fd
            t0 = time.monotonic()
            done = _in_thread(lambda: ringer.notify(target, 0))
            # Without the server's check this write waits for a reader forever.
            assert done.wait(10), "notify still blocked on the jammed doorbell"
            waited = time.monotonic() - t0
            assert waited < 5
            unblock = -1
            # The doorbell works again, for everyone, at once.
            for _ in range(3):
                ringer.notify(target, 0)
            if whose == "an honest peer's":
                assert victim.wait(0, timeout=5) == 0  # it still hears its rings
            server.wait_until(lambda: "jammed doorbell" in server.log(), what="the warning")
            assert f"peer {target} vector 0" in server.log()
            assert server.alive
        finally:
            if unblock >= 0:  # leave no thread blocked in a write behind
                os.eventfd_read(unblock)
            hostile.close()
            ringer.close()
            victim.close()


@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_a_vm_ringing_a_jammed_doorbell_is_not_frozen(qemu_binary: str, short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1) as server:
        chardev = f"socket,id=ivshmem,path={server.socket_path}"
        args = ("-chardev", chardev, "-device", "ivshmem-doorbell,chardev=ivshmem,vectors=1")
        with Qemu(qemu_binary, short_tmp, args, name="jam") as qemu:
            vm = IvshmemDevice.find(qemu)
            hostile = _hostile(server, others=1)
            unblock = -1
            try:
                assert hostile.id is not None
                # QEMU sets O_NONBLOCK on every eventfd it receives: let it take the hostile
                # peer's first (its ring arriving proves it has), then jam it.
                fd = hostile.own_fds[0]
                deadline = time.monotonic() + 20
                while True:
                    vm.ring(hostile.id, 0)
                    try:
                        os.eventfd_read(fd)
                        break
                    except BlockingIOError:
                        assert time.monotonic() < deadline, "QEMU never rang the new peer"
                        time.sleep(0.05)
                _jam(hostile.own_fds[0])
                unblock = hostile.own_fds[0]
                # QEMU writes the eventfd from the vCPU that wrote the doorbell register, under
                # its big lock: while the write blocks, the whole VM (and qtest) waits.
                hostile_id = hostile.id
                done = _in_thread(lambda: vm.ring(hostile_id, 0))
                assert done.wait(20), "QEMU still blocked in the write to the jammed doorbell"
                unblock = -1
                vm.ring(hostile.id, 0)
                vm.write(0, b"alive")
                assert vm.read(0, 5) == b"alive"
                assert qemu.alive and server.alive
            finally:
                if unblock >= 0:
                    os.eventfd_read(unblock)
                hostile.close()

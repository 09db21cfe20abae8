"""A peer that truncates (or reseals) the region must not kill the server or anyone else."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qtest import IvshmemDevice, Qemu
from serverproc import RawPeer, ServerProcess

import ivshmem
from ivshmem.channel import Membership, Receiver, Region, Sender, is_formatted
from ivshmem.channel.layout import read_arena
from ivshmem.memory import F_SEAL_FUTURE_WRITE, SharedMemory, format_size
from ivshmem.server.regionguard import RegionGuard, RegionMembership, ring_eventfd

SIZE = 1 << 20


def _hostile(server: ServerProcess) -> RawPeer:
    """An admitted peer that keeps the region's fd (and maps nothing: it only truncates)."""
    peer = RawPeer(server.socket_path, keep_fds=True)
    peer.wait(lambda: peer.shm_fd is not None and peer.complete(set(peer.peers), 1))
    return peer


def _region_copy(fd: int) -> bytearray:
    """The region's content, read without mapping it (a mapping of a truncated region
    would kill this test process the way it used to kill the server)."""
    return bytearray(os.pread(fd, SIZE, 0))


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"ivt-truncate-{os.getpid()}"
    try:
        yield name
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


def test_a_memfd_region_is_sealed_so_a_peer_cannot_resize_or_reseal_it(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=["--format"]) as server:
        a = ivshmem.connect(server.socket_path)
        b = ivshmem.connect(server.socket_path)
        hostile = _hostile(server)
        try:
            rx = Receiver(a, "after-attack", sender=b.id, capacity=4096)
            tx = Sender(b, "after-attack", receiver=a.id)
            fd = hostile.shm_fd
            assert fd is not None
            for attack in (
                lambda: os.ftruncate(fd, 0),
                lambda: os.ftruncate(fd, SIZE // 2),
                lambda: os.ftruncate(fd, SIZE * 2),  # growing is refused too
                # A peer's own seal would stop every later mmap(PROT_WRITE): no new peer.
                lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE),
                lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
            ):
                with pytest.raises(PermissionError) as info:
                    attack()
                assert info.value.errno == errno.EPERM
            assert os.fstat(fd).st_size == SIZE
            # The host peers touch the whole region (the last page included) and go on.
            a.memory[SIZE - 1] = 0x5A
            assert b.memory[SIZE - 1] == 0x5A
            tx.send(b"still here")
            assert rx.recv(timeout=10) == b"still here"
            with ivshmem.connect(server.socket_path) as c:
                assert Membership(c.memory).peers() == {a.id, b.id, hostile.id, c.id}
            assert server.alive
            shared = server.status()["shared_memory"]
            assert shared["sealed"] is True and shared["size_restores"] == 0
        finally:
            hostile.close()
            a.close()
            b.close()


@pytest.mark.parametrize("cut", [0, 4096, SIZE // 2], ids=["to-zero", "to-one-page", "to-half"])
def test_a_truncated_named_region_is_restored_and_the_server_survives(
    short_tmp: Path, shm_name: str, cut: int
) -> None:
    args = ["-M", shm_name, "--format"]
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=args) as server:
        first = _hostile(server)
        hostile = _hostile(server)
        try:
            assert hostile.shm_fd is not None and first.id is not None
            fd = hostile.shm_fd
            before = Region(_region_copy(fd))
            format_id = before.format_id
            os.ftruncate(fd, cut)  # allowed: -M cannot be sealed
            # The next join used to kill the server with SIGBUS in its membership write.
            with ivshmem.connect(server.socket_path) as newcomer:
                assert server.alive
                assert os.fstat(fd).st_size == SIZE
                assert newcomer.size == SIZE
                listed = {first.id, hostile.id, newcomer.id}
                assert Membership(newcomer.memory).peers() == listed
                region = Region(newcomer.memory)
                assert region.format_id == format_id  # the layout was written back, not redone
                for entry in region.membership.snapshot().entries.values():
                    # Every listed peer's arena says who owns it (lost headers written back).
                    assert read_arena(region, entry.slot).owner == entry.peer
            log = server.log()
            assert f"resized from 1M to {format_size(cut)}" in log, log
            assert "size restored" in log
            assert server.status()["shared_memory"]["size_restores"] == 1
            server.wait_until(
                lambda: Membership(_region_copy(fd)).peers() == {first.id, hostile.id},
                what="the newcomer unlisted",
            )
        finally:
            hostile.close()
            first.close()


def test_the_size_is_restored_without_a_join_or_format(short_tmp: Path, shm_name: str) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=["-M", shm_name]) as server:
        hostile = _hostile(server)
        try:
            assert hostile.shm_fd is not None
            os.ftruncate(hostile.shm_fd, 0)
            fd = hostile.shm_fd
            server.wait_until(lambda: os.fstat(fd).st_size == SIZE, what="size restored")
            # Grown by a peer: put back too (the layout and new QEMUs' BARs follow the size).
            os.ftruncate(fd, SIZE * 4)
            server.wait_until(lambda: os.fstat(fd).st_size == SIZE, what="growth undone")
            assert server.status()["shared_memory"]["size_restores"] == 2
            log = server.log()
            # One ERROR line a minute: a peer truncating in a loop cannot flood the log.
            assert "resized from 1M to 0B" in log and log.count("resized from") == 1, log
        finally:
            hostile.close()


def test_a_directory_backing_is_guarded_too(short_tmp: Path) -> None:
    directory = short_tmp / "backing"
    directory.mkdir()
    args = ["-m", str(directory), "--format"]
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=args) as server:
        hostile = _hostile(server)
        try:
            assert hostile.shm_fd is not None
            os.ftruncate(hostile.shm_fd, 0)
            with ivshmem.connect(server.socket_path) as newcomer:
                assert is_formatted(newcomer.memory)
                assert Membership(newcomer.memory).peers() == {hostile.id, newcomer.id}
            assert server.status()["shared_memory"]["sealed"] is False
        finally:
            hostile.close()


def test_a_peer_that_blocks_and_saturates_its_eventfd_cannot_hang_the_server(
    short_tmp: Path,
) -> None:
    args = ["--format", "--membership-vector", "0"]
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=args) as server:
        hostile = _hostile(server)
        try:
            (own,) = hostile.own_fds
            # O_NONBLOCK belongs to the open file, which the server shares: clear it, and
            # fill the counter so that the next write of 1 would wait for a reader.
            fcntl.fcntl(own, fcntl.F_SETFL, fcntl.fcntl(own, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            os.eventfd_write(own, (1 << 64) - 2)
            for _ in range(2):  # each join and leave rings the hostile peer's vector 0
                with ivshmem.connect(server.socket_path) as newcomer:
                    assert Membership(newcomer.memory).peers() == {hostile.id, newcomer.id}
                # The server sends a handshake while it may still be accepting: a newcomer
                # that leaves and the next one that connects at once can be taken in either
                # order. Its leave (which rings the hostile peer) is what is waited for.
                server.wait_until(
                    lambda: server.status(timeout=5)["membership"]["listed"] == [hostile.id],
                    what="the newcomer's leave",
                )
            assert server.status(timeout=5)["counters"]["joins"] == 3
        finally:
            hostile.close()


def test_a_peer_that_sets_o_append_on_the_region_cannot_misdirect_the_servers_writes(
    short_tmp: Path, shm_name: str
) -> None:
    with ServerProcess(short_tmp, size="1M", extra_args=["-M", shm_name, "--format"]) as server:
        hostile = _hostile(server)
        try:
            fd = hostile.shm_fd
            assert fd is not None
            # Status flags belong to the open file description, which the server shares
            # with every peer it sent the fd to: a pwrite on it would append at the end.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            with ivshmem.connect(server.socket_path) as newcomer:
                assert Membership(newcomer.memory).peers() == {hostile.id, newcomer.id}
            assert os.fstat(fd).st_size == SIZE
            assert server.status()["shared_memory"]["size_restores"] == 0
        finally:
            hostile.close()


def test_shared_memory_memfd_is_sealed_unless_asked_not_to() -> None:
    with SharedMemory.memfd(SIZE) as sealed, SharedMemory.memfd(SIZE, seal=False) as loose:
        assert sealed.sealed and not loose.sealed
        with pytest.raises(PermissionError):
            os.ftruncate(sealed.fd, 0)
        os.ftruncate(loose.fd, SIZE // 2)
        seals = fcntl.fcntl(sealed.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SEAL and not seals & fcntl.F_SEAL_WRITE


@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_a_qemu_and_a_host_peer_survive_a_truncate_attempt_on_a_sealed_region(
    qemu_binary: str, short_tmp: Path
) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=["--format"]) as server:
        chardev = f"socket,id=ivshmem,path={server.socket_path}"
        args = ("-chardev", chardev, "-device", "ivshmem-doorbell,chardev=ivshmem,vectors=1")
        with Qemu(qemu_binary, short_tmp, args, name="sealed") as qemu:
            vm = IvshmemDevice.find(qemu)
            host = ivshmem.connect(server.socket_path)
            hostile = _hostile(server)
            try:
                assert hostile.shm_fd is not None
                with pytest.raises(PermissionError):
                    os.ftruncate(hostile.shm_fd, 0)
                # Both touch the end of the region, which an unsealed truncate would have
                # taken away from under them (QEMU and the host peer would die of SIGBUS).
                vm.write(SIZE - 8, b"from-vm!")
                assert bytes(host.memory[SIZE - 8 :]) == b"from-vm!"
                host.memory[SIZE - 16 : SIZE - 8] = b"from-hp!"
                assert vm.read(SIZE - 16, 8) == b"from-hp!"
                assert qemu.alive and server.alive
                listed = Membership(host.memory).peers()
                assert listed == {vm.ivposition, host.id, hostile.id}
            finally:
                hostile.close()
                host.close()


# -- the server-side pieces, in process -------------------------------------------------------


def _shm(kind: str, tmp: Path) -> SharedMemory:
    if kind == "sealed":
        return SharedMemory.memfd(SIZE)
    if kind in ("unsealed", "procmem"):
        return SharedMemory.memfd(SIZE, seal=False)
    return SharedMemory.file(str(tmp / "region"), SIZE, follow_symlinks=False)


@pytest.mark.parametrize("kind", ["sealed", "unsealed", "file", "procmem"])
def test_the_region_mirrors_the_servers_membership_table(kind: str, tmp_path: Path) -> None:
    with _shm(kind, tmp_path) as shm:
        guard = RegionGuard(shm)
        assert guard.sealed == (kind == "sealed")
        # procmem: how a hugetlbfs backing (no write()) is written; forced on a memfd here.
        mode = "procmem" if kind == "procmem" else None
        table = RegionMembership.open(guard, shm, max_peers=8, reformat=False, mode=mode)
        try:
            assert table.mode == {"sealed": "map", "procmem": "procmem"}.get(kind, "pwrite")
            expected: dict[int, int] = {}
            for op, peer, vectors in [
                ("join", 5, 2), ("join", 9, 1), ("leave", 5, 0), ("join", 11, 3),
                ("join", 5, 2), ("leave", 9, 0), ("leave", 42, 0),
            ]:  # fmt: skip
                if op == "join":
                    table.joined(peer, vectors)
                    expected[peer] = vectors
                else:
                    assert table.left(peer) == (peer in expected)
                    expected.pop(peer, None)
                copy = _region_copy(shm.fd)
                region = Region(copy)
                snap = Membership(region).snapshot()
                assert {e.peer: e.vectors for e in snap.entries.values()} == expected
                assert snap.live and snap.generation == table.generation
                for entry in snap.entries.values():
                    assert read_arena(region, entry.slot).owner == entry.peer
                # Everything the layout's writer wrote reached the region, and nothing else
                # was written (a fresh region: it and the server's shadow start as zeros).
                assert copy == bytes(table._mem)
        finally:
            table.close()


def test_a_truncation_is_restored_and_written_back_and_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with SharedMemory.memfd(SIZE, seal=False) as shm:
        guard = RegionGuard(shm)
        table = RegionMembership.open(guard, shm, max_peers=4, reformat=False)
        try:
            table.joined(3, 1)
            table.joined(7, 1)
            before = bytes(_region_copy(shm.fd)[: 3 * 4096])
            assert guard.check() is None and not table.repair(resized=False)  # nothing to do
            with caplog.at_level("DEBUG", logger="ivshmem.server"):
                for _ in range(3):
                    os.ftruncate(shm.fd, 0)
                    assert guard.check() == 0 and os.fstat(shm.fd).st_size == SIZE
                    assert table.repair(resized=True)
            errors = [r for r in caplog.records if r.levelname == "ERROR"]
            assert len(errors) == 1 and "resized from 1M to 0B" in errors[0].getMessage()
            assert guard.restores == 3
            copy = _region_copy(shm.fd)
            assert bytes(copy[: 3 * 4096]) == before  # header and table as they were
            assert Membership(copy).peers() == {3, 7}
            table.joined(8, 1)  # and the table goes on from there
            assert Membership(_region_copy(shm.fd)).peers() == {3, 7, 8}
        finally:
            table.close()


@pytest.mark.parametrize("mode", ["pwrite", "procmem"])
def test_writing_into_a_truncated_region_fails_instead_of_faulting(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    with SharedMemory.memfd(SIZE, seal=False) as shm:
        guard = RegionGuard(shm)
        table = RegionMembership.open(guard, shm, max_peers=4, reformat=False, mode=mode)
        try:
            table.joined(3, 1)
            format_id = Region(_region_copy(shm.fd)).format_id
            os.ftruncate(shm.fd, 0)
            # Written before anyone looked at the size: a store into a mapping would have
            # killed this process; pwrite extends the file (so the guard then finds neither
            # 0 nor the full size), /proc/self/mem fails with EIO.
            table.joined(4, 1)
            assert table.left(3)
            assert guard.check() is not None
            assert table.repair(resized=True)
            assert os.fstat(shm.fd).st_size == SIZE
            region = Region(_region_copy(shm.fd))  # the header page is back, too
            assert region.format_id == format_id
            snapshot = Membership(region).snapshot()
            assert snapshot.peers == {4}
            (entry,) = snapshot.entries.values()
            assert read_arena(region, entry.slot).owner == 4
        finally:
            table.close()


def test_failed_writes_are_logged_once_and_written_again(caplog: pytest.LogCaptureFixture) -> None:
    with SharedMemory.memfd(SIZE, seal=False) as shm:
        guard = RegionGuard(shm)
        table = RegionMembership.open(guard, shm, max_peers=4, reformat=False)
        try:
            table.joined(1, 1)
            # RLIMIT_FSIZE makes every write past 4 KiB fail (EFBIG), as a full /dev/shm
            # would (ENOSPC): the table and the arenas are beyond.
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            try:
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
                with caplog.at_level("DEBUG", logger="ivshmem.server"):
                    table.joined(2, 1)
                    assert table.left(1)
                    table.joined(3, 1)
                    assert not table.repair(resized=False)  # still failing
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, previous)
            errors = [r for r in caplog.records if r.levelname == "ERROR"]
            assert len(errors) == 1 and "cannot write the membership table" in caplog.text
            with caplog.at_level("INFO", logger="ivshmem.server"):
                assert table.repair(resized=False)
            assert "written into the region again" in caplog.text
            copy = _region_copy(shm.fd)
            assert Membership(copy).peers() == {2, 3}
            assert copy == bytes(table._mem)  # the arenas handed out meanwhile too
        finally:
            table.close()


def test_ring_eventfd_never_blocks() -> None:
    fd = os.eventfd(0)  # blocking, as a peer can make any eventfd it holds
    try:
        assert ring_eventfd(fd)
        assert os.eventfd_read(fd) == 1
        os.eventfd_write(fd, (1 << 64) - 2)  # saturated: a plain write of 1 would wait
        assert not ring_eventfd(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("backing", ["-M", "--file"])
def test_stress_truncation_run_drops_nobody_and_restores_every_truncate(
    backing: str, tmp_path: Path
) -> None:
    """benchmarks/stress_server.py --truncate, briefly: a hostile peer truncates the region
    again and again while three peers ping-pong and another joins and leaves; nobody honest
    is dropped, no join fails, the server lives and restores every truncate."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "stress_server.py"
    args = [sys.executable, str(script), "--truncate", "20", "--quiet", "0.2"]
    if backing == "--file":
        args += ["--server-arg=--file", f"--server-arg={tmp_path / 'region'}"]
        args += ["--server-arg=--format"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "honest peers dropped: 0 of 3" in result.stdout
    assert "server alive: yes; size restored 20 times" in result.stdout
    assert ", 0 failed" in result.stdout
    assert not list(Path("/dev/shm").glob("ivs-truncate-*"))

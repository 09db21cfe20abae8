"""``ivshmem-device`` as a process, and the device against a server speaking QEMU's contrib
server's order of messages (written here: Debian ships no ivshmem-server binary)."""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from devicehelp import attach, serving
from qtest import IvshmemDevice, find_pci_devices, poll_until
from serverproc import ServerProcess

from ivshmem import registers as reg
from ivshmem.device import VmSpec

pytestmark = [pytest.mark.timeout(180)]

DEVICE = [sys.executable, "-m", "ivshmem.cli.device"]


def run_device(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEVICE, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no VM to serve"),
        (["--socket", "/tmp/x.sock"], "give --server PATH"),
        (["--socket", "/tmp/x.sock", "--plain", "--server", "/s"], "not both"),
        (["--socket", "/tmp/x.sock", "--server", "/s", "--size", "1M"], "are for --plain"),
        (["--socket", "/tmp/x.sock", "--server", "/s", "--event-vector", "1"], "--event-vector"),
        (["--socket", "/tmp/x.sock", "--server", "/s", "--vectors", "0"], "--vectors"),
        (["--socket", "/tmp/x.sock", "--plain", "--intx", "--size", "1M"], "no interrupts"),
        (["--vm", "socket=/tmp/x.sock,colour=red"], "KEY=VALUE"),
        (["--vm", "server=/s"], "no socket"),
        (["--server", "/s"], "add --socket"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    done = run_device(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_bad_region_sizes_and_missing_server(short_tmp: Path) -> None:
    sock = str(short_tmp / "d.sock")
    done = run_device("--socket", sock, "--plain", "--size", "3M")
    assert done.returncode == 2 and "power of two" in done.stderr
    done = run_device("--socket", sock, "--server", str(short_tmp / "nothing"))
    assert done.returncode == 2 and "is ivshmem-server running?" in done.stderr
    assert not os.path.exists(sock)


@pytest.mark.qemu
def test_the_command_serves_vms_until_sigterm(qemu11: list[str], short_tmp: Path) -> None:
    a, b = short_tmp / "a.sock", short_tmp / "b.sock"
    with ServerProcess(short_tmp, size="1M", vectors=2) as server:
        proc = subprocess.Popen(
            [
                *DEVICE,
                "--socket", str(a), "--server", server.socket_path, "--vectors", "2",
                "--vm", f"socket={b},size=2M,name=plainvm",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert poll_until(lambda: a.exists() and b.exists(), 30), proc.stderr
            with attach(qemu11, short_tmp, a, b) as qemu:
                devices = [IvshmemDevice(d) for d in find_pci_devices(qemu, 0x1AF4, 0x1110)]
                states = sorted(d.read_register(reg.SERVER_STATE) for d in devices)
                assert states == [reg.SERVER_PLAIN, reg.SERVER_CONNECTED]
                assert sorted(d.size for d in devices) == [1 << 20, 2 << 20]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr = proc.stderr.read() if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
    assert "vfio-user client connected" in stderr
    assert not a.exists() and not b.exists()


# -- QEMU's contrib server's order -----------------------------------------------------------


class ContribOrderServer:
    """One-client ivshmem server that sends what QEMU's contrib/ivshmem-server sends, in its
    order: version, id, shared memory, every other peer's vectors, then the client's own."""

    def __init__(self, path: Path, peer_id: int, others: list[int], vectors: int) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.peer_id, self.others, self.vectors = peer_id, others, vectors
        self.shm = os.memfd_create("contrib")
        os.ftruncate(self.shm, 1 << 20)
        #: eventfds by peer id (the client's own included), vector order.
        self.eventfds = {p: [os.eventfd(0) for _ in range(vectors)] for p in [peer_id, *others]}
        self.conn: socket.socket | None = None

    def send(self, value: int, fd: int | None = None) -> None:
        assert self.conn is not None
        data = struct.pack("<q", value)
        if fd is None:
            self.conn.sendall(data)
        else:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self.conn.sendmsg([data], rights)

    def greet(self) -> None:
        self.conn, _ = self.listener.accept()
        self.send(0)
        self.send(self.peer_id)
        self.send(-1, self.shm)
        for other in self.others:
            for fd in self.eventfds[other]:
                self.send(other, fd)
        for fd in self.eventfds[self.peer_id]:
            self.send(self.peer_id, fd)

    def join(self, peer: int) -> None:
        self.eventfds[peer] = [os.eventfd(0) for _ in range(self.vectors)]
        for fd in self.eventfds[peer]:
            self.send(peer, fd)

    def leave(self, peer: int) -> None:
        for fd in self.eventfds.pop(peer):
            os.close(fd)
        self.send(peer)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self.path.unlink(missing_ok=True)
        os.close(self.shm)
        for fds in self.eventfds.values():
            for fd in fds:
                os.close(fd)


@pytest.fixture
def contrib(short_tmp: Path) -> Iterator[ContribOrderServer]:
    server = ContribOrderServer(short_tmp / "contrib.sock", peer_id=7, others=[3], vectors=2)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.qemu
def test_against_qemus_server_order(
    qemu11: list[str], short_tmp: Path, contrib: ContribOrderServer
) -> None:
    greeter = threading.Thread(target=contrib.greet)
    greeter.start()
    sock = short_tmp / "dev.sock"
    spec = VmSpec(socket=str(sock), server=str(contrib.path), vectors=2, event_vector=1)
    try:
        with serving([spec]), attach(qemu11, short_tmp, sock) as qemu:
            greeter.join()
            dev = IvshmemDevice.find(qemu)
            assert dev.ivposition == 7
            assert dev.read_register(reg.PEER_COUNT) == 1
            dev.write_register(reg.PEER_SELECT, 0)
            assert dev.read_register(reg.PEER_AT) == 3
            # The guest rings peer 3's vector 1 through the eventfd the server handed out.
            dev.ring(3, 1)
            ready, _, _ = select.select([contrib.eventfds[3][1]], [], [], 10)
            assert ready
            # Our own vector 0, rung by someone holding it, reaches the guest.
            os.eventfd_write(contrib.eventfds[7][0], 1)
            assert dev.take_msi(0)
            contrib.join(12)
            assert dev.take_msi(1)  # the membership vector
            assert poll_until(lambda: dev.read_register(reg.PEER_COUNT) == 2, 10)
            contrib.leave(3)
            assert poll_until(lambda: dev.read_register(reg.PEER_COUNT) == 1, 10)
            assert dev.read_register(reg.EVENTS) == reg.EVENT_JOINED | reg.EVENT_LEFT
            dev.write_register(reg.PEER_SELECT, 0)
            assert dev.read_register(reg.PEER_AT) == 12
    finally:
        greeter.join(timeout=10)


def test_the_socket_path_is_checked(short_tmp: Path) -> None:
    not_a_socket = short_tmp / "file"
    not_a_socket.write_text("keep me")
    done = run_device("--socket", str(not_a_socket), "--plain", "--size", "1M")
    assert done.returncode == 2 and "is not a socket" in done.stderr
    assert not_a_socket.read_text() == "keep me"
    # A stale socket (nobody listening) is replaced; a live one is refused.
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with serving([VmSpec(socket=str(stale), size=1 << 20)]):
        done = run_device("--socket", str(stale), "--plain", "--size", "1M")
        assert done.returncode == 2 and "in use" in done.stderr
    assert not stale.exists()
    assert sorted(p.name for p in short_tmp.iterdir()) == ["file"]


def test_a_server_that_breaks_the_protocol_is_reported(short_tmp: Path) -> None:
    path = short_tmp / "liar.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def lie() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(struct.pack("<q", 5))  # protocol version 5
                conn.recv(1)

        liar = threading.Thread(target=lie)
        liar.start()
        try:
            done = run_device("--socket", str(short_tmp / "d.sock"), "--server", str(path))
        finally:
            liar.join(timeout=30)
    assert done.returncode == 2
    assert "protocol version 5" in done.stderr


def test_plain_regions_from_a_posix_name_a_new_file_and_a_memfd(short_tmp: Path) -> None:
    name = f"ivt-device-{os.getpid()}"
    new_file = short_tmp / "new-region"
    specs = [
        VmSpec(socket=str(short_tmp / "a.sock"), region=f"/{name}", size=1 << 20),
        VmSpec(socket=str(short_tmp / "b.sock"), region=str(new_file), size=2 << 20),
        VmSpec(socket=str(short_tmp / "c.sock"), size=4 << 20),
    ]
    try:
        with serving(specs) as device:
            sizes = [vm.function.region_size for vm in device.vms]
            assert sizes == [1 << 20, 2 << 20, 4 << 20]
            assert os.path.getsize(f"/dev/shm/{name}") == 1 << 20
            assert new_file.stat().st_size == 2 << 20
            links = [os.readlink(f"/proc/self/fd/{vm.function.region_fd}") for vm in device.vms]
            assert links[0] == f"/dev/shm/{name}" and links[1] == str(new_file)
            assert links[2].startswith("/memfd:")
    finally:
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)

"""Interoperability with real QEMU (Debian's qemu-system-x86_64 7.2), driven through qtest.

Every QEMU here is paused (no guest OS): the test plays the guest CPU through qtest
(``tests/qtest.py``), programs the ivshmem device's BARs, reads and writes BAR0 and BAR2, and
sees MSI-X interrupts as writes QEMU makes into guest RAM, or as pending bits.

First ``ivshmem-plain`` (a shared file, no server). Then ``ivshmem-doorbell`` against our own
``ivshmem-server``, run as a real process, with host peers from ``ivshmem.connect``.

QEMU behaviour these tests are written around (7.2, TCG):

* the device reads the version, id and shared-memory messages synchronously while QEMU
  starts, and every eventfd message afterwards asynchronously, 8 bytes per main-loop round;
  a doorbell written for a peer whose eventfds QEMU has not processed yet is dropped without
  a trace. Messages are processed in order, and a QEMU's own vectors come last in its
  handshake, so "an MSI for my last vector arrived" proves every earlier peer is known. For a
  peer that joins later there is no such proof; the tests then connect a host peer after it
  and have QEMU ring that host peer until one ring arrives: QEMU handled the later join, so
  it handled the earlier one too, and from then on every single ring must arrive. (Retrying
  only towards a host peer keeps counts exact: every retry is written before the read that
  sees it, so no late duplicate can surface afterwards, as it could as a second MSI.);
* a ring of a QEMU's vector while MSI-X is disabled is consumed and lost, so MSI-X is enabled
  before anyone rings it; while a vector is masked, the ring sets its pending bit and the MSI
  is sent when the vector is unmasked;
* QEMU sends an MSI as a 32-bit DMA write of the entry's data to the entry's address through
  the device's bus-master address space: bus mastering must be on, and an address in guest
  RAM turns an interrupt into a value the test can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qtest import IvshmemDevice, Qemu, QemuExitedError, poll_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

REGION = 1 << 20
VECTORS = 4
# Hang catchers only; every wait below returns as soon as the awaited thing happens.
WAIT = 10.0

StartQemu = Callable[..., Qemu]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def start_qemu(qemu_binary: str, short_tmp: Path) -> Iterator[StartQemu]:
    """Factory: start a paused QEMU with extra arguments; all are killed and reaped after."""
    started: list[Qemu] = []

    def start(*extra: str, name: str | None = None) -> Qemu:
        qemu = Qemu(qemu_binary, short_tmp, extra, name=name or f"vm{len(started)}")
        started.append(qemu)
        return qemu

    try:
        yield start
    finally:
        for qemu in started:
            qemu.close()


def doorbell_args(socket_path: Path, vectors: int = VECTORS) -> list[str]:
    return [
        "-chardev", f"socket,id=ivshmem,path={socket_path}",
        "-device", f"ivshmem-doorbell,chardev=ivshmem,vectors={vectors}",
    ]  # fmt: skip


def plain_args(path: Path, size: int = REGION) -> list[str]:
    return [
        "-object", f"memory-backend-file,id=shm,mem-path={path},size={size},share=on",
        "-device", "ivshmem-plain,memdev=shm",
    ]  # fmt: skip


class ServerProcess:
    """Our ``ivshmem-server`` as a real process (``python -m ivshmem.cli.server``)."""

    def __init__(self, workdir: Path, vectors: int = VECTORS, size: str = "1M") -> None:
        self.path = workdir / "ivshmem.sock"
        self._log_path = workdir / "server.log"
        argv = [
            sys.executable, "-m", "ivshmem.cli.server",
            "-F", "-S", str(self.path), "-l", size, "-n", str(vectors), "--memfd",
        ]  # fmt: skip
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            # Ready = listening. Checked in /proc/net/unix rather than by connecting, which
            # would make the probe a peer and take an id.
            if not poll_until(lambda: self._listening() or self.proc.poll() is not None, WAIT):
                raise AssertionError(f"ivshmem-server did not listen within {WAIT} s")
            if self.proc.poll() is not None:
                raise AssertionError(f"ivshmem-server exited at start:\n{self.log()}")
        except BaseException:
            self.kill()
            raise

    def _listening(self) -> bool:
        # Flags 00010000 (__SO_ACCEPTCON) marks a listening socket.
        target = str(self.path)
        with open("/proc/net/unix") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == target and fields[3] == "00010000":
                    return True
        return False

    def log(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"ivshmem-server ignored SIGTERM:\n{self.log()}") from None
        return self.proc.returncode


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    """Our server with a 1 MiB memfd region and 4 vectors per peer; stopped with SIGTERM."""
    proc = ServerProcess(short_tmp)
    try:
        yield proc
    finally:
        status = proc.stop()
    assert status == 0, f"ivshmem-server exited with {status} on SIGTERM:\n{proc.log()}"
    assert not proc.path.exists(), "ivshmem-server left its socket behind"


@pytest.fixture
def connect() -> Iterator[Callable[[Path], Any]]:
    """Factory: host peers via ``ivshmem.connect``; all closed after the test."""
    import ivshmem
    import ivshmem.peer

    # ivshmem.connect once the package exports it; the module that implements it until then.
    connect_to = getattr(ivshmem, "connect", ivshmem.peer.connect)
    endpoints: list[Any] = []

    def open_peer(path: Path) -> Any:
        endpoint = connect_to(str(path))
        endpoints.append(endpoint)
        return endpoint

    try:
        yield open_peer
    finally:
        for endpoint in endpoints:
            endpoint.close()


# -- helpers -------------------------------------------------------------------------------


def peers_become(endpoint: Any, predicate: Callable[[frozenset[int]], bool]) -> bool:
    """Wait until the host peer's view of the connected peers satisfies ``predicate``."""
    return poll_until(lambda: predicate(endpoint.peers), WAIT)


def start_doorbell_vm(start_qemu: StartQemu, server: ServerProcess, name: str) -> IvshmemDevice:
    return IvshmemDevice.find(start_qemu(*doorbell_args(server.path), name=name))


def ring_until_known(sender: IvshmemDevice, host: Any) -> None:
    """Ring the host peer's last vector until a ring arrives: ``sender`` has then processed
    the host peer's join and every message before it (QEMU drops rings for a peer whose join
    it has not processed yet, and processes messages in order).

    The doorbell write is synchronous, so every earlier retry is already counted on the
    eventfd when the successful ``wait`` reads (and resets) it: nothing is left over."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        sender.ring(host.id, VECTORS - 1)
        if host.wait(VECTORS - 1, timeout=0.05) is not None:
            return
    raise AssertionError(f"{sender.qemu.name} never learnt of peer {host.id} within {WAIT} s")


def sync_initial_peers(vm: IvshmemDevice, host: Any) -> None:
    """Return once ``vm`` has processed its whole handshake: ``host`` rings vm's last vector,
    whose eventfd comes after every other peer's in the handshake."""
    qemu_id = vm.ivposition
    assert peers_become(host, lambda peers: qemu_id in peers)
    host.notify(qemu_id, VECTORS - 1)
    assert vm.take_msi(VECTORS - 1, WAIT), f"{vm.qemu.name} never got its vector {VECTORS - 1}"


# -- ivshmem-plain: no server --------------------------------------------------------------


def make_region_file(path: Path, size: int = REGION) -> None:
    with open(path, "wb") as file:
        file.truncate(size)


def test_plain_device_layout(start_qemu: StartQemu, short_tmp: Path) -> None:
    make_region_file(short_tmp / "region")
    dev = IvshmemDevice.find(start_qemu(*plain_args(short_tmp / "region")), msix=False)
    bar0 = dev.pci.probe_bar(0)
    assert bar0 is not None and bar0.size == 256 and not bar0.is_io
    assert dev.bar2_info.size == REGION
    assert dev.bar2_info.is_64bit and dev.bar2_info.prefetchable
    assert dev.bar2 >= 1 << 32  # the upper half of the 64-bit BAR is honoured
    assert dev.pci.probe_bar(1) is None  # no MSI-X without a server
    assert dev.ivposition == 0


def test_plain_bytes_cross_between_host_and_qemu(start_qemu: StartQemu, short_tmp: Path) -> None:
    import ivshmem

    path = short_tmp / "region"
    make_region_file(path)
    dev = IvshmemDevice.find(start_qemu(*plain_args(path)), msix=False)
    with ivshmem.open_region(str(path)) as host:
        data = secrets.token_bytes(REGION)
        host.memory[:] = data
        assert dev.read(0, REGION) == data

        data = secrets.token_bytes(REGION)
        dev.write(0, data)
        assert bytes(host.memory) == data

        # Small writes at unaligned offsets, both ways, and the last byte of the region.
        dev.write(REGION - 1, b"\xa5")
        assert host.memory[REGION - 1] == 0xA5
        host.memory[4097:4100] = b"xyz"
        assert dev.read(4096, 5) == data[4096:4097] + b"xyz" + data[4100:4101]


def test_plain_two_vms_share_one_file(start_qemu: StartQemu, short_tmp: Path) -> None:
    path = short_tmp / "region"
    make_region_file(path)
    a = IvshmemDevice.find(start_qemu(*plain_args(path), name="a"), msix=False)
    b = IvshmemDevice.find(start_qemu(*plain_args(path), name="b"), msix=False)
    data = secrets.token_bytes(REGION)
    a.write(0, data)
    assert b.read(0, REGION) == data
    b.write(12345, b"from b")
    assert a.read(12345, 6) == b"from b"


# -- ivshmem-doorbell with our server and host peers ---------------------------------------


def test_ivposition_is_the_id_our_server_assigned(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    host = connect(server.path)
    assert host.peers == frozenset()

    first = start_doorbell_vm(start_qemu, server, "a")
    assert peers_become(host, lambda peers: len(peers) == 1)
    (first_id,) = host.peers
    assert first.ivposition == first_id
    assert first_id != host.id

    second = start_doorbell_vm(start_qemu, server, "b")
    assert peers_become(host, lambda peers: len(peers) == 2)
    (second_id,) = host.peers - {first_id}
    assert second.ivposition == second_id
    assert len({host.id, first_id, second_id}) == 3

    # The device sized BAR2 from the memfd the server handed out, and made one vector each.
    assert first.size == host.size == REGION
    assert first.vectors == second.vectors == VECTORS


def test_bar2_bytes_reach_a_host_peer_and_back(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    vm = start_doorbell_vm(start_qemu, server, "a")
    host = connect(server.path)

    data = secrets.token_bytes(REGION)
    vm.write(0, data)
    assert bytes(host.memory) == data

    data = secrets.token_bytes(REGION)
    host.memory[:] = data
    assert vm.read(0, REGION) == data

    vm.write(REGION - 8, b"tail-end")
    assert bytes(host.memory[REGION - 8 :]) == b"tail-end"


def test_qemu_rings_each_vector_of_a_host_peer(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    host = connect(server.path)
    vm = start_doorbell_vm(start_qemu, server, "a")
    sync_initial_peers(vm, host)  # the host peer was in vm's handshake: vm knows it now

    for vector in range(VECTORS):
        vm.ring(host.id, vector)
        assert host.wait(timeout=WAIT) == vector
    # Each doorbell write rang exactly one vector once.
    assert host.wait(timeout=0) is None

    # Rings before anyone waits are kept (eventfds count), and the order of waiting is free.
    vm.ring(host.id, 2)
    vm.ring(host.id, 0)
    assert host.wait(vector=2, timeout=WAIT) == 2
    assert host.wait(timeout=WAIT) == 0
    assert host.wait(timeout=0) is None


def test_host_peer_rings_each_vector_of_qemu_as_msix(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    vm = start_doorbell_vm(start_qemu, server, "a")
    host = connect(server.path)
    qemu_id = vm.ivposition
    assert qemu_id in host.peers  # the handshake listed every existing peer

    for vector in range(VECTORS):
        assert vm.arrived_vectors() == set()
        host.notify(qemu_id, vector)
        assert vm.take_msi(vector, WAIT), f"MSI-X vector {vector} never arrived"
    assert vm.arrived_vectors() == set()


def test_host_peer_ring_on_a_masked_vector_is_pending_until_unmasked(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    vm = start_doorbell_vm(start_qemu, server, "a")
    host = connect(server.path)
    assert vm.msix is not None
    qemu_id = vm.ivposition

    vm.msix.mask(1)
    assert not vm.msix.pending(1)
    host.notify(qemu_id, 1)
    assert poll_until(lambda: vm.msix is not None and vm.msix.pending(1), WAIT)
    assert vm.arrived_vectors() == set()  # masked: recorded, not sent

    vm.msix.unmask(1)  # QEMU sends the pending message now, synchronously
    assert vm.arrived_vectors() == {1}
    assert not vm.msix.pending(1)


def test_qemu_rings_another_qemu(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    host = connect(server.path)
    a = start_doorbell_vm(start_qemu, server, "a")
    b = start_doorbell_vm(start_qemu, server, "b")
    a_id, b_id = a.ivposition, b.ivposition
    assert a_id != b_id

    # b met a in its handshake; a hears of b asynchronously, before it hears of latecomer.
    sync_initial_peers(b, host)
    latecomer = connect(server.path)
    ring_until_known(a, latecomer)
    assert a.arrived_vectors() == b.arrived_vectors() == set()

    for vector in range(VECTORS):
        a.ring(b_id, vector)
        assert b.take_msi(vector, WAIT), f"a -> b vector {vector} never arrived"
        b.ring(a_id, vector)
        assert a.take_msi(vector, WAIT), f"b -> a vector {vector} never arrived"
        assert a.arrived_vectors() == b.arrived_vectors() == set()


class RawPeer:
    """A bare protocol client that keeps every eventfd it is given, even after a leave.

    It holds its own copies of other peers' eventfds, so after a peer has left it can still
    see whether anyone rings that peer's (now orphaned) eventfd."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.vectors: dict[int, list[int]] = {}
        self.left: set[int] = set()
        self._received = 0
        self.id = -1

    def pump(self) -> RawPeer:
        """Take every message already sent; returns self for use in conditions."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 8, 1)
            except BlockingIOError:
                return self
            assert len(data) == 8, "the test's raw peer expects whole messages"
            (value,) = struct.unpack("<q", data)
            fd = fds[0] if fds else None
            self._received += 1
            if self._received == 1:
                assert value == 0 and fd is None, "protocol version 0 expected"
            elif self._received == 2:
                self.id = value
            elif value == -1 or value == self.id:
                if fd is not None:
                    os.close(fd)  # shared memory and own vectors: not needed here
            elif fd is None:
                self.left.add(value)
            else:
                self.vectors.setdefault(value, []).append(fd)

    def rung(self, peer: int, vector: int) -> int:
        """Consume and return the count on our copy of ``peer``'s eventfd ``vector``."""
        try:
            return os.eventfd_read(self.vectors[peer][vector])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.sock.close()
        for fds in self.vectors.values():
            for fd in fds:
                os.close(fd)
        self.vectors.clear()


@pytest.mark.parametrize("how", ["killed", "quit"])
def test_departing_qemu_is_seen_by_the_others(
    how: str,
    start_qemu: StartQemu,
    server: ServerProcess,
    connect: Callable[[Path], Any],
) -> None:
    host = connect(server.path)
    raw = RawPeer(server.path)
    try:
        leaving = start_doorbell_vm(start_qemu, server, "leaving")
        staying = start_doorbell_vm(start_qemu, server, "staying")
        leaving_id, staying_id = leaving.ivposition, staying.ivposition
        sync_initial_peers(staying, host)  # staying knows leaving (and host) now
        assert poll_until(lambda: len(raw.pump().vectors.get(leaving_id, ())) == VECTORS, WAIT)

        # While leaving is alive, staying's doorbell reaches it. (The raw peer's copy of that
        # eventfd cannot show it: leaving's QEMU consumes the count.)
        staying.ring(leaving_id, 1)
        assert leaving.take_msi(1, WAIT)

        if how == "killed":
            leaving.qemu.kill()
        else:
            assert leaving.qemu.quit() == 0

        # The host peer and the raw client see it leave.
        assert peers_become(host, lambda peers: leaving_id not in peers)
        assert host.peers == frozenset({raw.id, staying_id})
        assert poll_until(lambda: leaving_id in raw.pump().left, WAIT)

        # staying has seen it too once it has processed the leave: a peer that joins after
        # the leave was announced is known to staying only after the leave, so once
        # staying can ring the newcomer, a ring for the departed peer must go nowhere.
        newcomer = connect(server.path)
        ring_until_known(staying, newcomer)
        staying.ring(leaving_id, 1)
        staying.ring(newcomer.id, 0)
        assert newcomer.wait(timeout=WAIT) == 0
        assert raw.rung(leaving_id, 1) == 0, "QEMU still rang a peer that had left"

        # And everyone left can still reach everyone.
        staying.ring(host.id, 2)
        assert host.wait(timeout=WAIT) == 2
        host.notify(staying_id, 0)
        assert staying.take_msi(0, WAIT)
    finally:
        raw.close()


# A separate process holding host peers: 100 peers in one process would need about 40 000
# fds (each keeps an eventfd per vector of every other peer), beyond the usual hard limit.
_HOLD_PEERS = """
import json, resource, sys
import ivshmem.peer
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
peers = [ivshmem.peer.connect(sys.argv[1]) for _ in range(int(sys.argv[2]))]
print(json.dumps([p.id for p in peers]), flush=True)
sys.stdin.read()
for p in peers:
    p.close()
"""


@contextlib.contextmanager
def peers_in_subprocess(path: Path, count: int) -> Iterator[list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_PEERS, str(path), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the peer-holding process failed (status {proc.wait()})")
        yield json.loads(line)
    finally:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_qemu_joining_after_100_peers_receives_all_its_vectors(
    start_qemu: StartQemu, server: ServerProcess, connect: Callable[[Path], Any]
) -> None:
    """QEMU's own ivshmem-server loses this client: its handshake is 400 eventfd messages
    plus its own 4, far more than a Unix socket buffers, and that server gives up on a client
    whose socket is full. Ours queues and sends as QEMU reads."""
    with contextlib.ExitStack() as stack:
        ids: list[int] = []
        for _ in range(4):
            ids += stack.enter_context(peers_in_subprocess(server.path, 25))
        host = connect(server.path)  # the 101st peer, which also checks the messages' order
        assert len(set(ids) | {host.id}) == 101

        vm = start_doorbell_vm(start_qemu, server, "late")
        qemu_id = vm.ivposition
        assert qemu_id not in ids and qemu_id != host.id
        assert peers_become(host, lambda peers: qemu_id in peers)
        assert len(host.peers) == 101

        for vector in range(VECTORS):
            host.notify(qemu_id, vector)
        for vector in range(VECTORS):
            assert vm.take_msi(vector, WAIT), f"QEMU never received its vector {vector}"

        # Its own vectors came last, so QEMU knows every peer before it: the last one, too.
        for vector in range(VECTORS):
            vm.ring(host.id, vector)
            assert host.wait(timeout=WAIT) == vector
        assert vm.qemu.alive


def test_qemu_fails_to_start_without_a_server(start_qemu: StartQemu, short_tmp: Path) -> None:
    """The harness reports a QEMU that dies while starting, with QEMU's own message."""
    with pytest.raises(QemuExitedError, match=r"Failed to connect to .*nobody-listens"):
        start_qemu(*doorbell_args(short_tmp / "nobody-listens"))
    assert not any(name.endswith((".qtest", ".qmp", ".log")) for name in os.listdir(short_tmp))

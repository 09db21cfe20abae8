"""A hostile vfio-user client on one VM's socket while QEMU 11 keeps using another VM of the
same device process: every bad message gets an error reply or closes only that connection,
the other VM keeps answering, and no fd is left behind."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from devicehelp import attach, new_fds, open_fds, serving
from qtest import IvshmemDevice, poll_until

from ivshmem import registers as reg
from ivshmem.device import DeviceServer, VmSpec
from ivshmem.device import vfio_user as vu
from ivshmem.device.model import MAX_DMA_MAPS

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]

HEADER = struct.Struct("<HHIII")


class RawClient:
    """A vfio-user client that sends whatever the test says."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(10)
        self.msg_id = 0

    def send(
        self, command: int, payload: bytes = b"", fds: list[int] | None = None, **kw: int
    ) -> None:
        self.msg_id += 1
        size = kw.get("size", 16 + len(payload))
        flags = kw.get("flags", 0)
        data = HEADER.pack(self.msg_id, command, size, flags, 0) + payload
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        else:
            self.sock.sendall(data)

    def reply(self) -> tuple[int, int, bytes]:
        """(flags, error, payload) of the next reply."""
        header = self._exactly(16)
        _msg_id, _command, size, flags, error = HEADER.unpack(header)
        return flags, error, self._exactly(size - 16)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the device")
            data += chunk
        return data

    def closed_by_device(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def version(self) -> None:
        caps = json.dumps({"capabilities": {"max_msg_fds": 16}}).encode() + b"\0"
        self.send(vu.VERSION, struct.pack("<HH", 0, 0) + caps)
        flags, error, _payload = self.reply()
        assert flags & vu.FLAG_REPLY and not flags & vu.FLAG_ERROR and error == 0

    def close(self) -> None:
        self.sock.close()


def dma_map(address: int) -> bytes:
    return struct.pack("<IIQQQ", 32, 3, 0, address, 4096)


@pytest.fixture
def setup(qemu11: list[str], short_tmp: Path) -> Iterator[tuple[DeviceServer, IvshmemDevice, Path]]:
    good, bad = short_tmp / "good.sock", short_tmp / "bad.sock"
    specs = [
        VmSpec(socket=str(good), size=1 << 20, name="good"),
        VmSpec(socket=str(bad), size=1 << 20, name="bad"),
    ]
    with serving(specs) as device, attach(qemu11, short_tmp, good) as qemu:
        yield device, IvshmemDevice.find(qemu, msix=False), bad


def still_fine(dev: IvshmemDevice) -> None:
    start = time.monotonic()
    assert dev.read_register(reg.EXT_MAGIC) == reg.EXT_MAGIC_VALUE
    dev.write(0, b"ok")
    assert dev.read(0, 2) == b"ok"
    assert time.monotonic() - start < 2.0  # far below QEMU's 5 s x-msg-timeout


def closing_case(bad: Path, send: object) -> None:
    client = RawClient(bad)
    try:
        assert callable(send)
        send(client)
        assert client.closed_by_device()
    finally:
        client.close()


def test_malformed_messages_close_only_that_connection(
    setup: tuple[DeviceServer, IvshmemDevice, Path],
) -> None:
    device, dev, bad = setup
    bad_vm = device.vms[1]
    before = open_fds()
    memfd = os.memfd_create("hostile")
    try:
        cases = {
            "first message not VERSION": lambda c: c.send(vu.REGION_READ, bytes(16)),
            "size below the header": lambda c: c.send(vu.VERSION, b"", size=8),
            "size beyond the limit": lambda c: c.send(vu.REGION_WRITE, b"", size=1 << 30),
            "a reply from the client": lambda c: (c.version(), c.send(1, b"", flags=1)),
            "write count mismatch": lambda c: (
                c.version(),
                c.send(vu.REGION_WRITE, struct.pack("<QII", 0, 0, 100) + b"abcd"),
            ),
            "short region read": lambda c: (c.version(), c.send(vu.REGION_READ, bytes(8))),
            "SET_IRQS fd count": lambda c: (
                c.version(),
                c.send(vu.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x24, 2, 0, 3), [memfd]),
            ),
            "fds on a read": lambda c: (
                c.version(),
                c.send(vu.REGION_READ, struct.pack("<QII", 0, 0, 4), [memfd, memfd]),
            ),
            "too many fds": lambda c: (c.version(), c.send(vu.DMA_MAP, dma_map(0), [memfd] * 20)),
            "bad VERSION JSON": lambda c: c.send(vu.VERSION, b"\0\0\0\0{not json"),
        }
        for name, send in cases.items():
            closing_case(bad, send)
            assert poll_until(lambda: bad_vm.conn is None, 10), name
            still_fine(dev)
        # Half a message, then the client hangs up.
        client = RawClient(bad)
        client.sock.sendall(HEADER.pack(1, vu.VERSION, 100, 0, 0)[:10])
        client.close()
        assert poll_until(lambda: bad_vm.conn is None, 10)
        still_fine(dev)
    finally:
        os.close(memfd)
    assert poll_until(lambda: not new_fds(before), 10), new_fds(before)


def test_bad_requests_get_error_replies(setup: tuple[DeviceServer, IvshmemDevice, Path]) -> None:
    device, dev, bad = setup
    client = RawClient(bad)
    try:
        client.version()
        checks = [
            (99, b"", errno.ENOTSUP),  # unknown command
            (vu.REGION_READ, struct.pack("<QII", 0, 6, 4), errno.EINVAL),  # no such region
            (vu.REGION_READ, struct.pack("<QII", 0x100, 0, 4), errno.EINVAL),  # past BAR0
            (vu.REGION_READ, struct.pack("<QII", 0, 0, 3), errno.EINVAL),  # 3-byte access
            (vu.REGION_READ, struct.pack("<QII", (1 << 64) - 1, 7, 4), errno.EINVAL),
            (vu.DEVICE_GET_REGION_INFO, struct.pack("<IIII", 32, 0, 50, 0), errno.EINVAL),
            (vu.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 9, 0), errno.EINVAL),
            # MSI-X on a plain device (it has none)
            (vu.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x21, 2, 0, 1), errno.EINVAL),
        ]
        for command, payload, expected in checks:
            client.send(command, payload)
            flags, error, _ = client.reply()
            assert flags & vu.FLAG_ERROR and error == expected, (command, payload)
        # BAR2 through messages (QEMU traps it while an INTx is pending): the shared memory.
        client.send(vu.REGION_WRITE, struct.pack("<QII", 4096, 2, 5) + b"trap!")
        assert not client.reply()[0] & vu.FLAG_ERROR
        client.send(vu.REGION_READ, struct.pack("<QII", 4094, 2, 9))
        flags, _, payload = client.reply()
        assert not flags & vu.FLAG_ERROR and payload[16:] == b"\0\0trap!\0\0"
        client.send(vu.REGION_READ, struct.pack("<QII", (1 << 20) - 4, 2, 8))  # past the end
        assert client.reply()[1] == errno.EINVAL
        # The connection is still usable.
        client.send(vu.REGION_READ, struct.pack("<QII", reg.EXT_MAGIC, 0, 4))
        flags, error, payload = client.reply()
        assert not flags & vu.FLAG_ERROR
        assert struct.unpack_from("<I", payload, 16)[0] == reg.EXT_MAGIC_VALUE
        still_fine(dev)
        assert device.vms[1].conn is not None
    finally:
        client.close()


def test_dma_map_flood(setup: tuple[DeviceServer, IvshmemDevice, Path]) -> None:
    _device, dev, bad = setup
    before = open_fds()
    memfd = os.memfd_create("flood")
    client = RawClient(bad)
    try:
        client.version()
        errors = 0
        for i in range(MAX_DMA_MAPS + 100):
            client.send(vu.DMA_MAP, dma_map(i * 4096), [memfd] if i % 2 else None)
            flags, error, _ = client.reply()
            if flags & vu.FLAG_ERROR:
                assert error == errno.ENOSPC
                errors += 1
        assert errors == 100
        still_fine(dev)
        # Unmapping makes room again.
        client.send(vu.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0, 4096))
        flags, _, payload = client.reply()
        assert not flags & vu.FLAG_ERROR and len(payload) == 24
        client.send(vu.DMA_MAP, dma_map(1 << 40))
        assert not client.reply()[0] & vu.FLAG_ERROR
    finally:
        client.close()
        os.close(memfd)
    assert poll_until(lambda: not new_fds(before), 10), new_fds(before)


def test_a_client_that_never_reads_is_dropped(
    setup: tuple[DeviceServer, IvshmemDevice, Path],
) -> None:
    device, dev, bad = setup
    client = RawClient(bad)
    try:
        client.version()
        client.sock.setblocking(False)
        request = HEADER.pack(7, vu.REGION_READ, 32, 0, 0) + struct.pack("<QII", 0, 2, 1 << 20)
        deadline = time.monotonic() + 30
        while device.vms[1].conn is not None and time.monotonic() < deadline:
            try:
                client.sock.send(request)
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert device.vms[1].conn is None
        still_fine(dev)
    finally:
        client.close()


def test_a_second_client_is_turned_away(
    setup: tuple[DeviceServer, IvshmemDevice, Path],
) -> None:
    _device, dev, bad = setup
    first, second = RawClient(bad), None
    try:
        first.version()
        second = RawClient(bad)
        assert second.closed_by_device()
        first.send(vu.REGION_READ, struct.pack("<QII", reg.EXT_MAGIC, 0, 4))
        assert not first.reply()[0] & vu.FLAG_ERROR
        still_fine(dev)
    finally:
        first.close()
        if second is not None:
            second.close()

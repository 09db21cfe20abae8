"""The vfio-user codec and the PCI function without any socket or QEMU (sans I/O)."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest

from ivshmem import registers as reg
from ivshmem.device import DeviceOptions, IvshmemFunction
from ivshmem.device import vfio_user as vu

HEADER = struct.Struct("<HHIII")


def message(command: int, payload: bytes = b"", msg_id: int = 1, flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


def feed_all(conn: vu.Connection, data: bytes, fds: list[int] | None = None) -> list[vu.Request]:
    """Feed ``data`` in reads of at most ``wanted()`` bytes, fds with the first read."""
    out = []
    first = True
    while data:
        n = conn.wanted()
        request = conn.feed(data[:n], fds if first and fds else ())
        first = False
        data = data[n:]
        if request is not None:
            out.append(request)
    return out


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- the codec ---------------------------------------------------------------------------


def test_header_then_payload_one_byte_at_a_time() -> None:
    conn = vu.Connection()
    data = message(vu.REGION_WRITE, struct.pack("<QII", 12, 0, 4) + b"\1\0\2\0", msg_id=9)
    requests = []
    for i in range(len(data)):
        assert conn.wanted() >= 1
        got = conn.feed(data[i : i + 1])
        if got is not None:
            requests.append(got)
    assert requests == [vu.RegionWrite(9, vu.REGION_WRITE, 12, 0, b"\1\0\2\0")]
    assert conn.wanted() == 16  # ready for the next header


def test_every_command_parses() -> None:
    conn = vu.Connection()
    caps = json.dumps({"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"
    data = b"".join(
        [
            message(vu.VERSION, struct.pack("<HH", 0, 0) + caps, 1),
            message(vu.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 0x2000), 2),
            message(vu.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0x1000, 0x2000), 3),
            message(vu.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), 4),
            message(vu.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 2, 0, 0, 0), 5),
            message(vu.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 2, 0), 6),
            message(vu.REGION_READ, struct.pack("<QII", 8, 0, 4), 7),
            message(vu.DEVICE_RESET, b"", 8),
            message(77, b"whatever", 9),
        ]
    )
    requests = feed_all(conn, data)
    assert [type(r).__name__ for r in requests] == [
        "Version",
        "DmaMap",
        "DmaUnmap",
        "GetDeviceInfo",
        "GetRegionInfo",
        "GetIrqInfo",
        "RegionRead",
        "Reset",
        "Unknown",
    ]
    version = requests[0]
    assert isinstance(version, vu.Version) and version.capabilities == {"max_msg_fds": 8}
    assert requests[4] == vu.GetRegionInfo(5, vu.DEVICE_GET_REGION_INFO, 32, 2)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (HEADER.pack(1, vu.VERSION, 8, 0, 0), "less than its header"),
        (HEADER.pack(1, vu.REGION_WRITE, vu.MAX_MESSAGE + 1, 0, 0), "at most"),
        (HEADER.pack(1, vu.VERSION, 16, vu.FLAG_REPLY, 0), "not a command"),
        (message(vu.REGION_WRITE, struct.pack("<QII", 0, 0, 8) + b"1234"), "says 8 bytes"),
        (message(vu.REGION_READ, b"\0" * 8), "needs 16"),
        (message(vu.DMA_MAP, b"\0" * 8), "needs 32"),
        (message(vu.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x3C, 2, 0, 1)), "flags"),
        (message(vu.VERSION, b"\0\0\0\0{bad"), "JSON is invalid"),
        (message(vu.REGION_READ, struct.pack("<QII", 0, 2, vu.MAX_DATA + 1)), "REGION_READ"),
    ],
)
def test_malformed_messages_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(vu.VfioUserError, match=problem):
        feed_all(vu.Connection(), data)


def test_fds_of_a_bad_message_are_closed() -> None:
    r, w = os.pipe()
    conn = vu.Connection()
    with pytest.raises(vu.VfioUserError, match="unexpected fds"):
        feed_all(conn, message(vu.REGION_READ, struct.pack("<QII", 0, 0, 4)), [r, w])
    assert not is_open(r) and not is_open(w)


def test_too_many_fds_are_closed() -> None:
    fds = [fd for _ in range(9) for fd in os.pipe()]  # 18 > MAX_FDS
    with pytest.raises(vu.VfioUserError, match="fds arrived"):
        vu.Connection().feed(b"\0" * 4, fds)
    assert not any(is_open(fd) for fd in fds)


def test_a_dma_map_fd_is_closed_at_once() -> None:
    r, w = os.pipe()
    try:
        payload = struct.pack("<IIQQQ", 32, 3, 0, 0, 4096)
        [request] = feed_all(vu.Connection(), message(vu.DMA_MAP, payload), [r])
        assert isinstance(request, vu.DmaMap)
        assert not is_open(r)
    finally:
        os.close(w)


def test_a_partial_message_closes_its_fds_on_close() -> None:
    r, w = os.pipe()
    conn = vu.Connection()
    conn.feed(HEADER.pack(1, vu.DEVICE_SET_IRQS, 40, 0, 0), [r, w])
    conn.close()
    assert not is_open(r) and not is_open(w)


def test_a_read_past_the_message_boundary_is_refused() -> None:
    conn = vu.Connection()
    with pytest.raises(vu.VfioUserError, match="crosses"):
        conn.feed(b"\0" * 17)


def test_version_reply_never_exceeds_the_request() -> None:
    request = vu.Version(1, vu.VERSION, 0, 0, {}, size=24)
    caps: dict[str, object] = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}
    assert len(vu.version_reply(request, caps)) <= 24
    big = vu.Version(1, vu.VERSION, 0, 0, {}, size=400)
    text = vu.version_reply(big, caps)[20:].rstrip(b"\0")
    assert json.loads(text) == {"capabilities": caps}


def test_error_reply_header() -> None:
    data = vu.reply_error(vu.Reset(5, vu.DEVICE_RESET), errno.EINVAL)
    assert HEADER.unpack(data) == (5, vu.DEVICE_RESET, 16, vu.FLAG_REPLY | vu.FLAG_ERROR, 22)


# -- the PCI function ----------------------------------------------------------------------


@pytest.fixture
def function() -> IvshmemFunction:
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 1 << 20)
        func = IvshmemFunction("t", DeviceOptions(vectors=4, event_vector=3), fd, 1 << 20)
    finally:
        os.close(fd)
    return func


def read(func: IvshmemFunction, region: int, offset: int, count: int) -> bytes:
    payload, _fds = func.handle(vu.RegionRead(1, vu.REGION_READ, offset, region, count))
    assert payload is not None
    flags = HEADER.unpack_from(payload)[3]
    assert not flags & vu.FLAG_ERROR
    return payload[32:]


def test_config_space_bytes(function: IvshmemFunction) -> None:
    config = read(function, 7, 0, 256)
    assert config[0:4] == bytes.fromhex("f41a1011")
    assert config[8:12] == bytes.fromhex("01000005")
    assert config[0x18] == 0x0C  # BAR2: 64-bit prefetchable memory
    assert config[0x3D] == 0  # no INTx pin with MSI-X
    assert config[0x34] == 0x40 and config[0x40] == 0x11
    assert struct.unpack_from("<H", config, 0x42)[0] == 3  # 4 vectors
    function.close()


def test_bar_sizing_through_config_writes(function: IvshmemFunction) -> None:
    write = vu.RegionWrite(1, vu.REGION_WRITE, 0x18, 7, b"\xff" * 8)
    function.handle(write)
    low, high = struct.unpack("<II", read(function, 7, 0x18, 8))
    assert (high << 32 | low) & ~0xF == (~((1 << 20) - 1)) & 0xFFFF_FFFF_FFFF_FFF0
    assert low & 0xF == 0x0C  # type bits are read-only
    function.handle(vu.RegionWrite(1, vu.REGION_WRITE, 0x10, 7, b"\xff" * 4))
    assert struct.unpack("<I", read(function, 7, 0x10, 4))[0] == 0xFFFF_FF00
    function.close()


def test_registers_sans_io(function: IvshmemFunction) -> None:
    rang: list[tuple[int, int]] = []
    function.ring = lambda peer, vector: rang.append((peer, vector))
    function.handle(vu.RegionWrite(1, vu.REGION_WRITE, reg.DOORBELL, 0, b"\x07\x01\x05\x00"))
    assert rang == [(5, 7)]  # vector is the low 8 bits, as QEMU's device
    function.handle(vu.RegionWrite(1, vu.REGION_WRITE, reg.DOORBELL + 1, 0, b"\x02"))
    assert rang[-1] == (0, 2)  # a 1-byte write at 0x0D is a Doorbell write of 2
    function.membership_event(reg.EVENT_JOINED)
    assert int.from_bytes(read(function, 0, reg.EVENTS, 4), "little") == reg.EVENT_JOINED
    assert int.from_bytes(read(function, 0, reg.EVENTS, 4), "little") == 0
    assert int.from_bytes(read(function, 0, reg.GENERATION, 4), "little") == 1
    function.close()


def test_msix_eventfds_are_replaced_and_closed(function: IvshmemFunction) -> None:
    first, second = os.eventfd(0), os.eventfd(0)
    function.handle(vu.SetIrqs(1, vu.DEVICE_SET_IRQS, 0x24, 2, 1, 1, (first,)))
    function.raise_vector(1)
    assert os.eventfd_read(first) == 1
    function.handle(vu.SetIrqs(2, vu.DEVICE_SET_IRQS, 0x24, 2, 1, 1, (second,)))
    assert not is_open(first)
    function.membership_event(reg.EVENT_LEFT)  # event vector 3: no eventfd yet, dropped
    payload, _ = function.handle(vu.SetIrqs(3, vu.DEVICE_SET_IRQS, 0x24, 2, 3, 2, ()))
    assert payload is not None and HEADER.unpack_from(payload)[4] == errno.EINVAL
    function.close()
    assert not is_open(second)


def test_a_non_power_of_two_region_is_refused() -> None:
    fd = os.memfd_create("t")
    try:
        with pytest.raises(ValueError, match="power of two"):
            IvshmemFunction("t", DeviceOptions(), fd, 3 << 20)
    finally:
        os.close(fd)


def test_intx_ignores_vectors_it_cannot_show() -> None:
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 1 << 20)
        func = IvshmemFunction("t", DeviceOptions(intx=True), fd, 1 << 20)
    finally:
        os.close(fd)
    for vector in (-1, 32, 255):  # an unknown own eventfd, beyond IntrStatus's 32 bits
        func.raise_vector(vector)
    assert func.intrstatus == 0
    func.raise_vector(31)
    assert func.intrstatus == 1 << 31
    func.close()


def test_bar2_access_to_a_shrunk_region_is_an_error_not_a_crash() -> None:
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 1 << 20)
        func = IvshmemFunction("t", DeviceOptions(doorbell=False), fd, 1 << 20)
        os.ftruncate(fd, 4096)  # someone shrinks the region behind QEMU's back
    finally:
        os.close(fd)
    for request in (
        vu.RegionRead(1, vu.REGION_READ, 8192, 2, 16),
        vu.RegionWrite(2, vu.REGION_WRITE, 8192, 2, b"x" * 16),
    ):
        payload, _ = func.handle(request)
        assert payload is not None and HEADER.unpack_from(payload)[4] == errno.EIO
    assert os.fstat(func.region_fd).st_size == 4096  # not grown back
    assert read(func, 2, 0, 4) == b"\0" * 4  # what is left still works
    func.close()

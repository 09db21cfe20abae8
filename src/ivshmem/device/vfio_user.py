"""The vfio-user protocol, server side, with no I/O inside.

Bytes and received fds go in through :meth:`Connection.feed`; complete requests come out as
small frozen dataclasses; replies are built by the ``reply_*`` functions and returned as bytes
(the fds a reply carries travel beside them). The socket loop is an adapter
(:mod:`ivshmem.device.loop`).

Every message is a 16-byte little-endian header (message id u16, command u16, total size u32
including the header, flags u32, error u32) and a payload; fds ride on the same message as
SCM_RIGHTS. The protocol is QEMU's ``docs/interop/vfio-user.rst``.

Fd ownership: every fd received is owned by the :class:`Connection` until a request that
carries it is returned, then by that request's taker. A bad message closes its fds before
:class:`VfioUserError` is raised, so no error path leaks one.

The adapter must read no further than :meth:`Connection.wanted` bytes at a time: then a read
never crosses a message boundary, and the fds of a read belong to the message being assembled
(QEMU sends each message, fds included, with one ``sendmsg``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError

__all__ = [
    "HEADER",
    "MAX_FDS",
    "MAX_MESSAGE",
    "Command",
    "Connection",
    "DmaMap",
    "DmaUnmap",
    "GetDeviceInfo",
    "GetIrqInfo",
    "GetRegionInfo",
    "RegionRead",
    "RegionWrite",
    "Request",
    "Reset",
    "SetIrqs",
    "Unknown",
    "Version",
    "VfioUserError",
    "encode_header",
    "reply",
    "reply_error",
]

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16

# Commands (docs/interop/vfio-user.rst, "Commands").
VERSION = 1
DMA_MAP = 2
DMA_UNMAP = 3
DEVICE_GET_INFO = 4
DEVICE_GET_REGION_INFO = 5
DEVICE_GET_REGION_IO_FDS = 6
DEVICE_GET_IRQ_INFO = 7
DEVICE_SET_IRQS = 8
REGION_READ = 9
REGION_WRITE = 10
DMA_READ = 11
DMA_WRITE = 12
DEVICE_RESET = 13

Command = int

# Header flags.
FLAG_TYPE_MASK = 0xF
FLAG_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# SET_IRQS flags.
IRQ_DATA_NONE = 0x1
IRQ_DATA_BOOL = 0x2
IRQ_DATA_EVENTFD = 0x4
IRQ_ACTION_MASK = 0x8
IRQ_ACTION_UNMASK = 0x10
IRQ_ACTION_TRIGGER = 0x20
_IRQ_DATA = IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_DATA_EVENTFD
_IRQ_ACTION = IRQ_ACTION_MASK | IRQ_ACTION_UNMASK | IRQ_ACTION_TRIGGER

#: The most fds one message may carry (we announce it as max_msg_fds).
MAX_FDS = 16
#: The largest region access we accept (announced as max_data_xfer_size).
MAX_DATA = 1 << 20
#: The largest message: a region write of MAX_DATA plus its headers.
MAX_MESSAGE = HEADER_SIZE + 16 + MAX_DATA
#: VERSION's JSON may be at most this long (the spec leaves it open; QEMU's is ~200 bytes).
MAX_VERSION_JSON = 4096

_REGION_ACCESS = struct.Struct("<QII")  # offset, region, count
_DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
_DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
_INFO4 = struct.Struct("<IIII")  # argsz, flags, a, b (device info, irq info)
_REGION_INFO_IN = struct.Struct("<IIII")  # argsz, flags, index, cap_offset
_REGION_INFO = struct.Struct("<IIIIQQ")  # + size, offset
_SET_IRQS = struct.Struct("<IIIII")  # argsz, flags, index, start, count
_VERSION = struct.Struct("<HH")


class VfioUserError(ProtocolError):
    """The client broke the vfio-user protocol; the connection cannot go on."""


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(frozen=True)
class Request:
    msg_id: int
    command: int


@dataclass(frozen=True)
class Version(Request):
    major: int
    minor: int
    capabilities: dict[str, object]
    size: int  # the request's total size: QEMU reads the reply into a buffer this long


@dataclass(frozen=True)
class DmaMap(Request):
    flags: int
    offset: int
    address: int
    size: int


@dataclass(frozen=True)
class DmaUnmap(Request):
    argsz: int
    flags: int
    address: int
    size: int


@dataclass(frozen=True)
class GetDeviceInfo(Request):
    argsz: int


@dataclass(frozen=True)
class GetRegionInfo(Request):
    argsz: int
    index: int


@dataclass(frozen=True)
class GetIrqInfo(Request):
    argsz: int
    index: int


@dataclass(frozen=True)
class SetIrqs(Request):
    flags: int
    index: int
    start: int
    count: int
    fds: tuple[int, ...] = field(default=())  # owned by the taker (DATA_EVENTFD)
    bools: bytes = b""  # DATA_BOOL

    @property
    def action(self) -> int:
        return self.flags & _IRQ_ACTION

    @property
    def data(self) -> int:
        return self.flags & _IRQ_DATA


@dataclass(frozen=True)
class RegionRead(Request):
    offset: int
    region: int
    count: int


@dataclass(frozen=True)
class RegionWrite(Request):
    offset: int
    region: int
    data: bytes


@dataclass(frozen=True)
class Reset(Request):
    pass


@dataclass(frozen=True)
class Unknown(Request):
    """A well-framed message whose command we do not serve (answered with an error)."""


def encode_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, size, flags, error)


def reply(request: Request, payload: bytes = b"") -> bytes:
    """A successful reply to ``request``."""
    return (
        HEADER.pack(request.msg_id, request.command, HEADER_SIZE + len(payload), FLAG_REPLY, 0)
        + payload
    )


def reply_error(request: Request, errno_value: int) -> bytes:
    """An error reply (header only) with ``errno_value``."""
    return HEADER.pack(
        request.msg_id, request.command, HEADER_SIZE, FLAG_REPLY | FLAG_ERROR, errno_value
    )


def version_reply(request: Version, capabilities: dict[str, object]) -> bytes:
    """VERSION 0.0 with our capabilities, NUL-terminated. QEMU reads the reply into its request's
    buffer, so a reply longer than the request is cut to the minimum capabilities."""
    text = json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode() + b"\0"
    payload = _VERSION.pack(0, 0) + text
    if HEADER_SIZE + len(payload) > request.size:
        payload = _VERSION.pack(0, 0) + b"{}\0"
    return reply(request, payload)


def region_info_payload(argsz: int, flags: int, index: int, size: int, offset: int) -> bytes:
    return _REGION_INFO.pack(max(argsz, _REGION_INFO.size), flags, index, 0, size, offset)


def info4_payload(argsz: int, flags: int, a: int, b: int) -> bytes:
    return _INFO4.pack(max(argsz, _INFO4.size), flags, a, b)


def region_read_payload(request: RegionRead, data: bytes) -> bytes:
    return _REGION_ACCESS.pack(request.offset, request.region, len(data)) + data


def region_write_payload(request: RegionWrite) -> bytes:
    return _REGION_ACCESS.pack(request.offset, request.region, len(request.data))


def dma_unmap_payload(request: DmaUnmap) -> bytes:
    return _DMA_UNMAP.pack(request.argsz, request.flags, request.address, request.size)


class Connection:
    """One vfio-user connection's incoming side: framing, size checks and request parsing."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._size = 0  # total size of the message being assembled, once its header is in
        self.closed = False
        #: Whether the last request returned asked for no reply (flag NO_REPLY).
        self.last_no_reply = False

    def wanted(self) -> int:
        """How many bytes the next read may take (never crossing a message boundary)."""
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        return self._size - len(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> Request | None:
        """Add one read's bytes (at most :meth:`wanted`) and fds; return the request they
        complete, if any. Raises :class:`VfioUserError` (after closing every fd held) on a
        message that cannot be framed; the connection must then be closed."""
        if self.closed:
            _close_all(fds)
            raise VfioUserError("the connection is closed")
        self._fds.extend(fds)
        if len(data) > self.wanted():
            self._fail(f"a read of {len(data)} bytes crosses a message boundary")
        if len(self._fds) > MAX_FDS:
            self._fail(f"{len(self._fds)} fds arrived with one message (at most {MAX_FDS})")
        self._buffer += data
        if len(self._buffer) < HEADER_SIZE:
            return None
        if self._size == 0:
            msg_id, command, size, flags, _error = HEADER.unpack_from(self._buffer)
            if size < HEADER_SIZE:
                self._fail(f"message {msg_id} says it is {size} bytes, less than its header")
            if size > MAX_MESSAGE:
                self._fail(f"message {msg_id} says it is {size} bytes (at most {MAX_MESSAGE})")
            if flags & FLAG_TYPE_MASK != 0:
                self._fail(f"message {msg_id} is not a command (flags {flags:#x})")
            self._size = size
        if len(self._buffer) < self._size:
            return None
        message = bytes(self._buffer)
        fds_in, self._fds = self._fds, []
        self._buffer.clear()
        self._size = 0
        msg_id, command, size, flags, _error = HEADER.unpack_from(message)
        self.last_no_reply = bool(flags & FLAG_NO_REPLY)
        try:
            return _parse(msg_id, command, message[HEADER_SIZE:], fds_in)
        except VfioUserError:
            _close_all(fds_in)
            raise

    def _fail(self, problem: str) -> None:
        self.close()
        raise VfioUserError(problem)

    def close(self) -> None:
        """Drop a partial message and close the fds that came with it."""
        self.closed = True
        fds, self._fds = self._fds, []
        _close_all(fds)
        self._buffer.clear()


def _need(payload: bytes, size: int, what: str, msg_id: int) -> None:
    if len(payload) < size:
        raise VfioUserError(
            f"{what} (message {msg_id}) has {len(payload)} payload bytes, needs {size}"
        )


def _no_fds(fds: list[int], what: str, msg_id: int) -> None:
    if fds:
        raise VfioUserError(f"{what} (message {msg_id}) carries {len(fds)} unexpected fds")


def _parse(msg_id: int, command: int, payload: bytes, fds: list[int]) -> Request:
    if command == REGION_WRITE:  # the hot path first
        _no_fds(fds, "REGION_WRITE", msg_id)
        _need(payload, 16, "REGION_WRITE", msg_id)
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        if count != len(payload) - 16:
            raise VfioUserError(
                f"REGION_WRITE (message {msg_id}) says {count} bytes but carries "
                f"{len(payload) - 16}"
            )
        return RegionWrite(msg_id, command, offset, region, payload[16:])
    if command == REGION_READ:
        _no_fds(fds, "REGION_READ", msg_id)
        _need(payload, 16, "REGION_READ", msg_id)
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        if count > MAX_DATA:
            raise VfioUserError(f"REGION_READ (message {msg_id}) of {count} bytes")
        return RegionRead(msg_id, command, offset, region, count)
    if command == VERSION:
        _no_fds(fds, "VERSION", msg_id)
        _need(payload, 4, "VERSION", msg_id)
        major, minor = _VERSION.unpack_from(payload)
        text = payload[4:].split(b"\0", 1)[0]
        if len(text) > MAX_VERSION_JSON:
            raise VfioUserError(f"VERSION (message {msg_id}) JSON of {len(text)} bytes")
        caps: dict[str, object] = {}
        if text:
            try:
                parsed = json.loads(text)
            except (ValueError, UnicodeDecodeError) as err:
                raise VfioUserError(f"VERSION (message {msg_id}) JSON is invalid: {err}") from err
            if isinstance(parsed, dict) and isinstance(parsed.get("capabilities"), dict):
                caps = parsed["capabilities"]
        return Version(msg_id, command, major, minor, caps, HEADER_SIZE + len(payload))
    if command == DMA_MAP:
        # We never touch guest memory: a map's fd (if any) is closed at once.
        _close_all(fds)
        fds.clear()
        _need(payload, _DMA_MAP.size, "DMA_MAP", msg_id)
        _argsz, flags, offset, address, size = _DMA_MAP.unpack_from(payload)
        return DmaMap(msg_id, command, flags, offset, address, size)
    if command == DMA_UNMAP:
        _no_fds(fds, "DMA_UNMAP", msg_id)
        _need(payload, _DMA_UNMAP.size, "DMA_UNMAP", msg_id)
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(payload)
        return DmaUnmap(msg_id, command, argsz, flags, address, size)
    if command == DEVICE_GET_INFO:
        _no_fds(fds, "DEVICE_GET_INFO", msg_id)
        _need(payload, 4, "DEVICE_GET_INFO", msg_id)
        (argsz,) = struct.unpack_from("<I", payload)
        return GetDeviceInfo(msg_id, command, argsz)
    if command == DEVICE_GET_REGION_INFO:
        _no_fds(fds, "DEVICE_GET_REGION_INFO", msg_id)
        _need(payload, _REGION_INFO_IN.size, "DEVICE_GET_REGION_INFO", msg_id)
        argsz, _flags, index, _cap = _REGION_INFO_IN.unpack_from(payload)
        return GetRegionInfo(msg_id, command, argsz, index)
    if command == DEVICE_GET_IRQ_INFO:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO", msg_id)
        _need(payload, 12, "DEVICE_GET_IRQ_INFO", msg_id)
        argsz, _flags, index = struct.unpack_from("<III", payload)
        return GetIrqInfo(msg_id, command, argsz, index)
    if command == DEVICE_SET_IRQS:
        _need(payload, _SET_IRQS.size, "DEVICE_SET_IRQS", msg_id)
        _argsz, flags, index, start, count = _SET_IRQS.unpack_from(payload)
        data = flags & _IRQ_DATA
        action = flags & _IRQ_ACTION
        if bin(data).count("1") != 1 or bin(action).count("1") != 1:
            raise VfioUserError(f"DEVICE_SET_IRQS (message {msg_id}) flags {flags:#x}")
        bools = b""
        if data == IRQ_DATA_EVENTFD:
            if len(fds) not in (0, count):
                raise VfioUserError(
                    f"DEVICE_SET_IRQS (message {msg_id}) for {count} irqs carries {len(fds)} fds"
                )
        else:
            _no_fds(fds, "DEVICE_SET_IRQS", msg_id)
            if data == IRQ_DATA_BOOL:
                _need(payload, _SET_IRQS.size + count, "DEVICE_SET_IRQS", msg_id)
                bools = payload[_SET_IRQS.size : _SET_IRQS.size + count]
        return SetIrqs(msg_id, command, flags, index, start, count, tuple(fds), bools)
    if command == DEVICE_RESET:
        _no_fds(fds, "DEVICE_RESET", msg_id)
        return Reset(msg_id, command)
    _close_all(fds)
    fds.clear()
    return Unknown(msg_id, command)

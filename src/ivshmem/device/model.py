"""The ivshmem PCI function: config space, BAR0 registers, interrupts and the vfio-user answers.

Config space is QEMU's ivshmem device's (hw/misc/ivshmem-pci.c and its MSI-X helper): ids
1af4:1110, subsystem 1af4:1100, revision 1, class 0x0500 (memory controller, RAM); BAR0 256
bytes of 32-bit memory (the registers); BAR1 the exclusive MSI-X BAR, 4 KiB, table at 0 and
PBA at 2 KiB (doorbell mode with MSI-X only); BAR2 the shared memory, 64-bit prefetchable, a
power of two; the MSI-X capability at 0x40; interrupt pin 0, or 1 (INTA) in INTx mode.

BAR0 decodes as QEMU's device does: the value of a read at a register's exact offset (narrower
reads give its low bytes), 0 elsewhere; a write goes to the register at ``offset & 0xfc``
whatever its width. Reading IntrStatus or Events clears it. QEMU's own device refuses 8-byte
accesses; this one splits them into two 4-byte ones.

This module does no I/O except writing 1 to the eventfds QEMU gave for the guest's interrupts
and reading/writing the shared memory when QEMU traps BAR2 (it does while an INTx is
pending). The loop (:mod:`ivshmem.device.loop`) feeds it requests and server events.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .. import registers as reg
from . import vfio_user as vu

__all__ = [
    "BAR0_SIZE",
    "MAX_DMA_MAPS",
    "MAX_MSIX_VECTORS",
    "MSIX_BAR_SIZE",
    "DeviceOptions",
    "IvshmemFunction",
]

log = logging.getLogger("ivshmem.device")

BAR0_SIZE = 0x100
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
MSIX_CAP = 0x40
CONFIG_SIZE = 0x100
REGION_CONFIG = 7
NUM_REGIONS = 9  # BAR0-5, ROM, config, VGA
NUM_IRQS = 5  # INTx, MSI, MSI-X, ERR, REQ
IRQ_INTX = 0
IRQ_MSIX = 2
MAX_DMA_MAPS = 16384  # QEMU aborts the VM when a map fails: generous, yet bounded
MAX_MSIX_VECTORS = 2048  # the MSI-X table size field is 11 bits

_REGION_READ = 1
_REGION_WRITE = 2
_REGION_MMAP = 4
_IRQ_EVENTFD = 1
_IRQ_MASKABLE = 2
_IRQ_AUTOMASKED = 4
_IRQ_NORESIZE = 8
_DEVICE_PCI = 2
_DEVICE_RESET = 1

PCI_COMMAND = 0x04
PCI_STATUS = 0x06
COMMAND_INTX_DISABLE = 0x400
STATUS_INTERRUPT = 0x08

_ONE = (1).to_bytes(8, "little")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class DeviceOptions:
    """What a VM's device looks like. ``vectors`` is the MSI-X table size (ignored with
    ``intx``); ``event_vector`` the vector rung on membership events (None: not rung)."""

    vectors: int = 1
    intx: bool = False
    event_vector: int | None = None
    doorbell: bool = True  # False: plain mode (no server, no doorbells)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _signal(fd: int) -> None:
    try:
        os.write(fd, _ONE)
    except OSError as err:  # a full (2^64-2) or closed-by-QEMU eventfd: nothing to deliver to
        log.debug("eventfd %d write failed: %s", fd, err.strerror)


class IvshmemFunction:
    """One VM's ivshmem device. ``region_fd`` and ``region_size`` are BAR2; the function
    keeps a duplicate of the fd for its lifetime (QEMU mmaps what it is handed)."""

    def __init__(self, name: str, options: DeviceOptions, region_fd: int, region_size: int) -> None:
        if not _power_of_two(region_size):
            raise ValueError(f"BAR2 must be a power of two in size, not {region_size}")
        self.name = name
        self.options = options
        self.msix = options.doorbell and not options.intx
        self.vectors = options.vectors if self.msix else 0
        self.region_fd = os.dup(region_fd)
        self.region_size = region_size
        # Registers.
        self.intrmask = 0
        self.intrstatus = 0
        self.peer_id = 0
        self.peers: list[int] = []  # other peers' ids, sorted
        self.generation = 0
        self.peer_select = 0
        self.events = 0
        self.server_state = reg.SERVER_CONNECTED if options.doorbell else reg.SERVER_PLAIN
        # Interrupt eventfds QEMU handed over (SET_IRQS); owned here.
        self.msix_fds: list[int | None] = [None] * self.vectors
        self.intx_fd: int | None = None
        self.intx_masked = False
        self.dma_maps: set[tuple[int, int]] = set()
        #: Set by the loop: ring(peer, vector) for Doorbell writes.
        self.ring: Callable[[int, int], None] = lambda peer, vector: None
        self.config = bytearray(CONFIG_SIZE)
        self._wmask = bytearray(CONFIG_SIZE)
        self.msix_bar = bytearray(MSIX_BAR_SIZE if self.msix else 0)
        self._build_config()
        self.features = 0
        if options.doorbell:
            self.features |= reg.FEATURE_MEMBERSHIP | reg.FEATURE_RECONNECT | reg.FEATURE_SERVER
            if options.event_vector is not None:
                self.features |= reg.FEATURE_MEMBERSHIP_IRQ
            if options.intx:
                self.features |= reg.FEATURE_INTX

    # -- config space ----------------------------------------------------------------------

    def _build_config(self) -> None:
        c, w = self.config, self._wmask

        def put(offset: int, value: int, size: int, wmask: int = 0) -> None:
            c[offset : offset + size] = value.to_bytes(size, "little")
            w[offset : offset + size] = wmask.to_bytes(size, "little")

        put(0x00, 0x1AF4, 2)  # vendor: Red Hat / Qumranet
        put(0x02, 0x1110, 2)  # device: ivshmem
        put(0x04, 0, 2, 0x0547)  # command: io, memory, master, parity, serr, intx disable
        put(0x08, 1, 1)  # revision
        put(0x09, 0x050000, 3)  # class: memory controller, RAM
        put(0x0C, 0, 1, 0xFF)  # cache line size
        put(0x0D, 0, 1, 0xFF)  # latency timer
        put(0x2C, 0x1AF4, 2)  # subsystem vendor
        put(0x2E, 0x1100, 2)  # subsystem: QEMU
        put(0x3C, 0, 1, 0xFF)  # interrupt line
        put(0x3D, 1 if self.options.intx else 0, 1)  # interrupt pin
        put(0x10, 0, 4, ~(BAR0_SIZE - 1) & 0xFFFFFFF0)  # BAR0: mem32
        if self.msix:
            put(0x14, 0, 4, ~(MSIX_BAR_SIZE - 1) & 0xFFFFFFF0)  # BAR1: mem32
        size_mask = ~(self.region_size - 1) & 0xFFFF_FFFF_FFFF_FFFF
        put(0x18, 0x0C, 4, size_mask & 0xFFFFFFF0)  # BAR2: mem64, prefetchable
        put(0x1C, 0, 4, size_mask >> 32)
        if self.msix:
            put(0x06, 0x0010, 2)  # status: capability list
            put(0x34, MSIX_CAP, 1)
            put(MSIX_CAP, 0x11, 1)  # MSI-X
            put(MSIX_CAP + 1, 0, 1)  # last capability
            put(MSIX_CAP + 2, self.vectors - 1, 2, 0xC000)  # enable, function mask
            put(MSIX_CAP + 4, 0 | 1, 4)  # table at 0 in BAR1
            put(MSIX_CAP + 8, MSIX_PBA_OFFSET | 1, 4)  # PBA at 2 KiB in BAR1

    def _config_write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            mask = self._wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
        if offset <= PCI_COMMAND + 1 and offset + len(data) > PCI_COMMAND:
            self._update_intx()  # Interrupt Disable may have been cleared

    # -- registers -------------------------------------------------------------------------

    def read_register(self, offset: int) -> int:
        """The 32-bit value a read at ``offset`` (4-aligned) returns, with its side effects."""
        if offset == reg.INTRMASK:
            return self.intrmask
        if offset == reg.INTRSTATUS:
            value, self.intrstatus = self.intrstatus, 0
            self._update_intx()
            return value
        if offset == reg.IVPOSITION:
            return self.peer_id
        if offset == reg.EXT_MAGIC:
            return reg.EXT_MAGIC_VALUE
        if offset == reg.EXT_FEATURES:
            return self.features
        if not self.options.doorbell:
            return 0
        if offset == reg.PEER_COUNT:
            return len(self.peers)
        if offset == reg.GENERATION:
            return self.generation & 0xFFFF_FFFF
        if offset == reg.PEER_SELECT:
            return self.peer_select
        if offset == reg.PEER_AT:
            if self.peer_select < len(self.peers):
                return self.peers[self.peer_select]
            return reg.NO_PEER
        if offset == reg.EVENT_VECTOR:
            ev = self.options.event_vector
            return reg.NO_VECTOR if ev is None else ev
        if offset == reg.EVENTS:
            value, self.events = self.events, 0
            return value
        if offset == reg.SERVER_STATE:
            return self.server_state
        return 0

    def write_register(self, offset: int, value: int) -> None:
        """A write of ``value`` (zero-extended) decoded at ``offset & 0xfc``, as QEMU does."""
        offset &= 0xFC
        if offset == reg.DOORBELL:
            if self.options.doorbell:
                self.ring(value >> 16 & 0xFFFF, value & 0xFF)
        elif offset == reg.INTRMASK:
            self.intrmask = value
            self._update_intx()
        elif offset == reg.INTRSTATUS:
            self.intrstatus = value
            self._update_intx()
        elif offset == reg.PEER_SELECT and self.options.doorbell:
            self.peer_select = value

    def _bar0_read(self, offset: int, count: int) -> bytes:
        if count == 8:
            return self._bar0_read(offset, 4) + self._bar0_read(offset + 4, 4)
        value = self.read_register(offset) if offset % 4 == 0 else 0
        return (value & ((1 << (8 * count)) - 1)).to_bytes(count, "little")

    def _bar0_write(self, offset: int, data: bytes) -> None:
        if len(data) == 8:
            self.write_register(offset, int.from_bytes(data[:4], "little"))
            self.write_register(offset + 4, int.from_bytes(data[4:], "little"))
            return
        self.write_register(offset, int.from_bytes(data, "little"))

    # -- interrupts ------------------------------------------------------------------------

    def raise_vector(self, vector: int) -> None:
        """The guest's interrupt for ``vector``: its MSI-X eventfd, or (INTx mode) IntrStatus
        bit ``vector`` and INTx if IntrMask lets it through. Without an eventfd (MSI-X not
        enabled yet) it is dropped, as QEMU's device drops it."""
        if self.options.intx:
            if 0 <= vector < 32:
                self.intrstatus |= 1 << vector
                self._update_intx()
            return
        if 0 <= vector < self.vectors:
            fd = self.msix_fds[vector]
            if fd is not None:
                _signal(fd)

    def _update_intx(self) -> None:
        # INTx is level-triggered and, over vfio, automasked: we signal once and stay quiet
        # until QEMU unmasks (on the guest's next BAR access, before that access reaches us).
        # The level also shows in PCI_STATUS's Interrupt Status bit: a guest's vfio-pci
        # driver (INTx masking via PCI 2.3's Interrupt Disable) reads it to tell whether the
        # shared interrupt line is ours; without it every INTx would look spurious. Interrupt
        # Disable in PCI_COMMAND keeps the line from being raised, not the status bit.
        if not self.options.intx:
            return
        level = bool(self.intrstatus & self.intrmask)
        if level:
            self.config[PCI_STATUS] |= STATUS_INTERRUPT
        else:
            self.config[PCI_STATUS] &= ~STATUS_INTERRUPT & 0xFF
        if not level or self.intx_fd is None or self.intx_masked:
            return
        if self.config[PCI_COMMAND + 1] << 8 & COMMAND_INTX_DISABLE:
            return
        self.intx_masked = True
        _signal(self.intx_fd)

    def membership_event(self, bits: int) -> None:
        """Record ``bits`` in Events, bump Generation and ring EventVector."""
        self.events |= bits
        self.generation += 1
        if self.options.event_vector is not None:
            self.raise_vector(self.options.event_vector)

    def _set_irqs(self, request: vu.SetIrqs) -> int:
        """Apply SET_IRQS; returns 0 or an errno. Takes ownership of the request's fds."""
        fds = list(request.fds)
        try:
            if request.index == IRQ_MSIX and self.msix:
                slots = self.msix_fds
            elif request.index == IRQ_INTX and self.options.intx:
                slots = None
            else:
                return errno.EINVAL if request.count else 0
            if request.index == IRQ_INTX:
                return self._set_intx(request, fds)
            assert slots is not None
            if request.action != vu.IRQ_ACTION_TRIGGER:
                return 0  # QEMU keeps MSI-X mask state itself
            if request.data == vu.IRQ_DATA_NONE and request.count == 0:
                for v in range(self.vectors):
                    self._replace_msix(v, None)
                return 0
            if request.start + request.count > self.vectors:
                return errno.EINVAL
            if request.data == vu.IRQ_DATA_EVENTFD:
                for i in range(request.count):
                    self._replace_msix(request.start + i, fds.pop(0) if fds else None)
                return 0
            for i in range(request.count):  # loopback trigger (DATA_NONE or DATA_BOOL)
                if request.data == vu.IRQ_DATA_NONE or request.bools[i]:
                    self.raise_vector(request.start + i)
            return 0
        finally:
            for fd in fds:
                os.close(fd)

    def _replace_msix(self, vector: int, fd: int | None) -> None:
        old, self.msix_fds[vector] = self.msix_fds[vector], fd
        if old is not None:
            os.close(old)

    def _set_intx(self, request: vu.SetIrqs, fds: list[int]) -> int:
        if request.start != 0 or request.count > 1:
            return errno.EINVAL
        if request.action == vu.IRQ_ACTION_TRIGGER:
            if request.data == vu.IRQ_DATA_NONE and request.count == 0:  # disable
                if self.intx_fd is not None:
                    os.close(self.intx_fd)
                    self.intx_fd = None
            elif request.data == vu.IRQ_DATA_EVENTFD:
                old, self.intx_fd = self.intx_fd, fds.pop(0) if fds else None
                if old is not None:
                    os.close(old)
                self.intx_masked = False
                self._update_intx()
            elif (
                request.count == 1
                and (request.data == vu.IRQ_DATA_NONE or request.bools[:1] == b"\x01")
                and self.intx_fd is not None
            ):
                _signal(self.intx_fd)  # a loopback trigger
            return 0
        if request.data == vu.IRQ_DATA_EVENTFD:  # a resample fd: we have no use for it
            return 0
        if request.data == vu.IRQ_DATA_BOOL and request.bools[:1] != b"\x01":
            return 0
        self.intx_masked = request.action == vu.IRQ_ACTION_MASK
        self._update_intx()
        return 0

    # -- the vfio-user requests ------------------------------------------------------------

    def handle(self, request: vu.Request) -> tuple[bytes | None, tuple[int, ...]]:
        """The reply to ``request`` and the fds to send with it (still owned here: the loop
        only sends them)."""
        if isinstance(request, vu.RegionWrite):
            return self._region_write(request), ()
        if isinstance(request, vu.RegionRead):
            return self._region_read(request), ()
        if isinstance(request, vu.DmaMap):
            if len(self.dma_maps) >= MAX_DMA_MAPS:
                return vu.reply_error(request, errno.ENOSPC), ()
            self.dma_maps.add((request.address, request.size))
            return vu.reply(request), ()
        if isinstance(request, vu.DmaUnmap):
            self.dma_maps.discard((request.address, request.size))
            if request.flags & 2:  # VFIO_DMA_UNMAP_FLAG_ALL
                self.dma_maps.clear()
            return vu.reply(request, vu.dma_unmap_payload(request)), ()
        if isinstance(request, vu.SetIrqs):
            error = self._set_irqs(request)
            return (vu.reply_error(request, error) if error else vu.reply(request)), ()
        if isinstance(request, vu.GetRegionInfo):
            return self._region_info(request)
        if isinstance(request, vu.GetIrqInfo):
            return self._irq_info(request), ()
        if isinstance(request, vu.GetDeviceInfo):
            payload = vu.info4_payload(
                request.argsz, _DEVICE_PCI | _DEVICE_RESET, NUM_REGIONS, NUM_IRQS
            )
            return vu.reply(request, payload), ()
        if isinstance(request, vu.Reset):
            self.reset()
            return vu.reply(request), ()
        if isinstance(request, vu.Version):
            if request.major != 0:
                return vu.reply_error(request, errno.ENOTSUP), ()
            caps: dict[str, object] = {
                "max_msg_fds": vu.MAX_FDS,
                "max_data_xfer_size": vu.MAX_DATA,
                "max_dma_maps": MAX_DMA_MAPS,
                "pgsizes": 4096,
            }
            return vu.version_reply(request, caps), ()
        return vu.reply_error(request, errno.ENOTSUP), ()

    def _region_info(self, request: vu.GetRegionInfo) -> tuple[bytes, tuple[int, ...]]:
        index = request.index
        flags, size = 0, 0
        fds: tuple[int, ...] = ()
        if index == 0:
            flags, size = _REGION_READ | _REGION_WRITE, BAR0_SIZE
        elif index == 1 and self.msix:
            flags, size = _REGION_READ | _REGION_WRITE, MSIX_BAR_SIZE
        elif index == 2:
            flags, size = _REGION_READ | _REGION_WRITE | _REGION_MMAP, self.region_size
            fds = (self.region_fd,)
        elif index == REGION_CONFIG:
            flags, size = _REGION_READ | _REGION_WRITE, CONFIG_SIZE
        elif index >= NUM_REGIONS:
            return vu.reply_error(request, errno.EINVAL), ()
        payload = vu.region_info_payload(request.argsz, flags, index, size, 0)
        return vu.reply(request, payload), fds

    def _irq_info(self, request: vu.GetIrqInfo) -> bytes:
        index, flags, count = request.index, _IRQ_EVENTFD, 0
        if index == IRQ_INTX and self.options.intx:
            flags, count = _IRQ_EVENTFD | _IRQ_MASKABLE | _IRQ_AUTOMASKED, 1
        elif index == IRQ_MSIX and self.msix:
            flags, count = _IRQ_EVENTFD | _IRQ_NORESIZE, self.vectors
        elif index >= NUM_IRQS:
            return vu.reply_error(request, errno.EINVAL)
        return vu.reply(request, vu.info4_payload(request.argsz, flags, index, count))

    def _region_size(self, region: int) -> int:
        if region == 0:
            return BAR0_SIZE
        if region == 1:
            return len(self.msix_bar)
        if region == 2:
            return self.region_size
        if region == REGION_CONFIG:
            return CONFIG_SIZE
        return 0

    def _bad_access(self, region: int, offset: int, count: int) -> bool:
        size = self._region_size(region)
        if offset >= size or count > size - offset or count == 0:
            return True
        return region == 0 and count not in (1, 2, 4, 8)

    def _region_read(self, request: vu.RegionRead) -> bytes:
        region, offset, count = request.region, request.offset, request.count
        if self._bad_access(region, offset, count):
            return vu.reply_error(request, errno.EINVAL)
        data: bytes | None
        if region == 0:
            data = self._bar0_read(offset, count)
        elif region == REGION_CONFIG:
            data = bytes(self.config[offset : offset + count])
        elif region == 1:
            data = bytes(self.msix_bar[offset : offset + count])
        else:
            data = self._bar2_read(offset, count)
        if data is None:
            return vu.reply_error(request, errno.EIO)
        return vu.reply(request, vu.region_read_payload(request, data))

    def _region_write(self, request: vu.RegionWrite) -> bytes:
        region, offset, data = request.region, request.offset, request.data
        if self._bad_access(region, offset, len(data)):
            return vu.reply_error(request, errno.EINVAL)
        if region == 0:
            self._bar0_write(offset, data)
        elif region == REGION_CONFIG:
            self._config_write(offset, data)
        elif region == 1:
            self.msix_bar[offset : offset + len(data)] = data
        else:
            if not self._bar2_write(offset, data):
                return vu.reply_error(request, errno.EIO)
        return vu.reply(request, vu.region_write_payload(request))

    # BAR2 through messages (QEMU traps it while an INTx is pending) uses pread/pwrite, not a
    # mapping: if someone shrinks the region's file, a mapped access would kill the whole
    # device process with SIGBUS; a read past the end only comes back short.

    def _bar2_read(self, offset: int, count: int) -> bytes | None:
        try:
            data = os.pread(self.region_fd, count, offset)
        except OSError:
            return None
        return data if len(data) == count else None

    def _bar2_write(self, offset: int, data: bytes) -> bool:
        try:
            if os.fstat(self.region_fd).st_size < offset + len(data):
                return False  # never grow a region someone shrank
            return os.pwrite(self.region_fd, data, offset) == len(data)
        except OSError:
            return False

    # -- lifecycle -------------------------------------------------------------------------

    def reset(self) -> None:
        """DEVICE_RESET: QEMU's reset clears IntrMask and IntrStatus."""
        self.intrmask = 0
        self.intrstatus = 0
        self.intx_masked = False

    def disconnect(self) -> None:
        """The VM's vfio-user connection ended: drop what QEMU handed over."""
        for v in range(self.vectors):
            self._replace_msix(v, None)
        if self.intx_fd is not None:
            os.close(self.intx_fd)
            self.intx_fd = None
        self.dma_maps.clear()
        self.reset()

    def close(self) -> None:
        self.disconnect()
        if self.region_fd >= 0:
            os.close(self.region_fd)
            self.region_fd = -1

"""Mapped BARs and the ivshmem register block (BAR0).

BAR0 holds four 32-bit little-endian registers (QEMU hw/misc/ivshmem-pci.c, "ivshmem_mmio"):

====== ============ ==========================================================================
offset name         use
====== ============ ==========================================================================
0      IntrMask     legacy INTx only (unused with MSI-X)
4      IntrStatus   legacy INTx only; reading clears it
8      IVPosition   this device's peer id (read-only; fixed for the device's lifetime)
12     Doorbell     write ``peer << 16 | vector`` to ring ``vector`` of ``peer``
====== ============ ==========================================================================

This project's vfio-user device adds registers after these (:mod:`ivshmem.registers`); QEMU's
device reads 0 there. Mappings here cover the first :data:`MAPPED_REGISTERS` bytes of BAR0.
"""

from __future__ import annotations

import abc
import mmap
import os
import struct
import sys

from ..errors import ClosedError, UsageError
from ..memory import Mapping

__all__ = [
    "DOORBELL",
    "INTRMASK",
    "INTRSTATUS",
    "IVPOSITION",
    "MAX_VECTORS",
    "REGISTERS_SIZE",
    "BarMapping",
    "FdRegisters",
    "MappedRegisters",
    "Registers",
    "doorbell_value",
]

INTRMASK = 0
INTRSTATUS = 4
IVPOSITION = 8
DOORBELL = 12
#: The smallest BAR0 that holds the four registers.
REGISTERS_SIZE = 16
#: How much of BAR0 register access reaches (QEMU's BAR0 and this project's are 256 bytes).
MAPPED_REGISTERS = 256
#: QEMU decodes only the low 8 bits of the doorbell's vector field (``val & 0xff``): a larger
#: number would silently ring vector ``n % 256``, so it is refused instead.
MAX_VECTORS = 256

PAGE_SIZE = mmap.PAGESIZE

assert struct.calcsize("I") == 4, "native unsigned int must be 32 bits for register access"


def doorbell_value(peer: int, vector: int) -> int:
    """The 32-bit word that rings ``vector`` of ``peer``; raises UsageError when out of range."""
    if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer <= 0xFFFF:
        raise UsageError(f"peer id {peer!r} is out of range: peer ids are 0..65535")
    if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector < MAX_VECTORS:
        raise UsageError(
            f"vector {vector!r} cannot be rung: the doorbell register carries vectors "
            f"0..{MAX_VECTORS - 1}"
        )
    return peer << 16 | vector


class BarMapping(Mapping):
    """A shared mapping of (the pages holding) one BAR, exposing exactly the BAR's bytes.

    ``page_offset`` is where the BAR starts inside the first mapped page: sysfs maps whole
    pages from the page the BAR starts in, and a small BAR such as the 256-byte BAR0 is often
    not page-aligned in the guest's address space. Unlike :class:`~ivshmem.memory.Mapping`,
    a failing mmap raises the OSError itself: callers turn its errno into device errors.
    """

    def __init__(
        self, fd: int, size: int, file_offset: int = 0, page_offset: int = 0, what: str = "BAR"
    ) -> None:
        # The kernel maps whole pages; the length asked for stays within the file's size,
        # because Python's mmap refuses to map past the end of a regular file, and sysfs
        # resource files are regular files exactly as long as their BAR.
        mm = mmap.mmap(
            fd,
            page_offset + size,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=file_offset,
        )
        self._adopt(mm, size, page_offset, what)


class Registers(abc.ABC):
    """32-bit access to the ivshmem register block."""

    @abc.abstractmethod
    def read32(self, offset: int) -> int: ...

    @abc.abstractmethod
    def write32(self, offset: int, value: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def ivposition(self) -> int:
        return self.read32(IVPOSITION)

    def ring(self, peer: int, vector: int) -> None:
        self.write32(DOORBELL, doorbell_value(peer, vector))


class MappedRegisters(Registers):
    """Registers through a mapping of BAR0 (sysfs ``resource0`` or a VFIO mmap)."""

    def __init__(self, mapping: BarMapping) -> None:
        if mapping.size < REGISTERS_SIZE:
            raise ValueError("BAR0 is smaller than the register block")
        self._mapping = mapping
        # Every access must be ONE aligned 32-bit load or store:
        # * QEMU's register block accepts only 4-byte accesses (min_access_size = 4): a
        #   narrower store is widened with the missing bytes as zero, so writing the doorbell
        #   byte by byte would ring four wrong (peer, vector) pairs;
        # * with ioeventfd (QEMU's default for ivshmem-doorbell, used under KVM) a doorbell
        #   store is matched against (peer << 16 | vector) as a whole 4-byte write;
        # * slice assignment (``mv[12:16] = b"..."``) goes through a memcpy of run-time length
        #   whose access widths are the C library's choice.
        # An item assignment on a memoryview cast to 'I' is a fixed-size 4-byte copy, which
        # the compiler turns into a single 32-bit mov; the same holds for loads.
        reach = min(mapping.size, MAPPED_REGISTERS) & ~3
        self._words: memoryview | None = mapping.memory[:reach].cast("I")

    def _w(self) -> memoryview:
        if self._words is None:
            raise ClosedError("the register mapping (BAR0) is closed")
        return self._words

    def read32(self, offset: int) -> int:
        value = int(self._w()[offset // 4])
        return _swap(value) if sys.byteorder == "big" else value

    def write32(self, offset: int, value: int) -> None:
        # Memory ordering: stores the application made to the shared memory (BAR2) before
        # this doorbell store are visible to the peer it wakes. x86 keeps stores in program
        # order; a store to BAR0, which is uncached MMIO, also drains write-combining
        # buffers (for a BAR2 mapped with resource2_wc); and under QEMU the MMIO store traps
        # to the hypervisor (a VM exit under KVM), which serializes the vCPU.
        self._w()[offset // 4] = _swap(value) if sys.byteorder == "big" else value

    def close(self) -> None:
        words, self._words = self._words, None
        if words is not None:
            words.release()
        self._mapping.close()


class FdRegisters(Registers):
    """Registers through ``pread``/``pwrite`` on a VFIO device fd, for a BAR0 the kernel will
    not let us mmap (vfio-pci maps sub-page BARs only when they own their page). vfio-pci
    turns an aligned 4-byte pread/pwrite into one 32-bit MMIO access."""

    def __init__(self, fd: int, region_offset: int) -> None:
        self._fd = fd  # borrowed: the VFIO device owns and closes it
        self._base = region_offset

    def read32(self, offset: int) -> int:
        if self._fd < 0:
            raise ClosedError("the register access (BAR0) is closed")
        data = os.pread(self._fd, 4, self._base + offset)
        if len(data) != 4:
            raise OSError(f"short read of BAR0 register {offset}")
        return int.from_bytes(data, "little")

    def write32(self, offset: int, value: int) -> None:
        if self._fd < 0:
            raise ClosedError("the register access (BAR0) is closed")
        # pwrite is a system call, which orders it after every earlier store to BAR2.
        if os.pwrite(self._fd, value.to_bytes(4, "little"), self._base + offset) != 4:
            raise OSError(f"short write of BAR0 register {offset}")

    def close(self) -> None:
        self._fd = -1


def _swap(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")

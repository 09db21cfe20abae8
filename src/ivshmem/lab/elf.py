"""The few facts the lab reads out of ELF files and the kernel's bzImage, without any tool.

* a kernel module's ``.modinfo`` section (``name=``, ``depends=``), because Debian's package
  ships plain ``.ko`` files without ``modules.dep`` and the host may not have ``modinfo``;
* whether an executable is static (no ``PT_INTERP``): the initramfs has no libc;
* the uncompressed ``vmlinux`` inside a bzImage, and whether it has a PVH entry point: QEMU
  can start such an ELF directly, which skips the kernel's self-decompression — about 3 s of
  xz under software emulation, a third of a guest's boot.

Only 64-bit little-endian ELF is handled (the lab boots x86-64 guests).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

__all__ = [
    "ElfFormatError",
    "extract_vmlinux",
    "has_pvh_entry",
    "is_static_executable",
    "module_info",
]

_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3
_PT_NOTE = 4
# include/xen/interface/elfnote.h: the 32-bit physical entry point used for PVH boot.
_XEN_ELFNOTE_PHYS32_ENTRY = 18


class ElfFormatError(ValueError):
    """The bytes are not the ELF (or bzImage) this module understands."""


def _header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    """``(phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx)`` of an ELF64 LE file."""
    if len(data) < 64 or data[:4] != _ELF_MAGIC:
        raise ElfFormatError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfFormatError("not a 64-bit little-endian ELF file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    return phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx


def _program_headers(data: bytes) -> list[tuple[int, int, int]]:
    """``(type, offset, filesz)`` of every program header."""
    phoff, _, phentsize, phnum, *_ = _header(data)
    out = []
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(data):
            raise ElfFormatError("program header table runs past the end of the file")
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, base
        )
        out.append((p_type, p_offset, p_filesz))
    return out


def _section(data: bytes, wanted: bytes) -> bytes | None:
    _, shoff, _, _, shentsize, shnum, shstrndx = _header(data)

    def entry(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        if base + 64 > len(data):
            raise ElfFormatError("section header table runs past the end of the file")
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, offset, size

    if shstrndx >= shnum:
        raise ElfFormatError("no section name table")
    _, strtab, _ = entry(shstrndx)
    for i in range(shnum):
        name_off, offset, size = entry(i)
        start = strtab + name_off
        end = data.find(b"\0", start)
        if end >= 0 and data[start:end] == wanted:
            return data[offset : offset + size]
    return None


def module_info(data: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of a kernel module's ``.modinfo`` section, in order.

    Keys repeat (``alias``, ``parm``), hence a list. Raises :class:`ElfFormatError` for a file
    that is not a module.
    """
    raw = _section(data, b".modinfo")
    if raw is None:
        raise ElfFormatError("no .modinfo section: not a kernel module")
    pairs = []
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            pairs.append((key.decode("ascii", "replace"), value.decode("utf-8", "replace")))
    return pairs


def is_static_executable(data: bytes) -> bool:
    """True for an ELF executable that needs no dynamic loader."""
    return all(p_type != _PT_INTERP for p_type, _, _ in _program_headers(data))


def has_pvh_entry(data: bytes) -> bool:
    """True if the ELF kernel image carries Xen's PHYS32_ENTRY note (QEMU boots it as PVH)."""
    for p_type, offset, size in _program_headers(data):
        if p_type != _PT_NOTE:
            continue
        pos, end = offset, min(offset + size, len(data))
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress(payload: bytes) -> bytes | None:
    """Decompress a bzImage payload by its magic; None for a format the stdlib lacks (zstd…)."""
    if payload.startswith(b"\xfd7zXZ\x00"):
        # The kernel appends the uncompressed size after the stream; the decompressor object
        # stops at the end of the stream and leaves it in unused_data.
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(b"BZh"):
        return bz2.BZ2Decompressor().decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    return None


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside an x86 bzImage, or None if it cannot be had with the stdlib.

    The boot protocol header (Documentation/arch/x86/boot.rst) gives the payload's offset and
    length from protocol 2.08 on; the payload is the compressed ELF ``vmlinux``.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ElfFormatError("not an x86 bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        return None
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    try:
        elf = _decompress(payload)
    except (lzma.LZMAError, zlib.error, OSError, EOFError, gzip.BadGzipFile):
        return None
    if elf is None or not elf.startswith(_ELF_MAGIC):
        return None
    return elf

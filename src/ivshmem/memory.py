"""Shared-memory objects: creating, opening and mapping the region every peer shares.

Four backings exist, as in QEMU's tooling plus one:

* ``memfd``      anonymous memory (``memfd_create``); lives as long as some fd or mapping does.
* ``posix``      a POSIX shm object, i.e. a file under ``/dev/shm`` (the server's ``-M NAME``).
* ``directory``  an unlinked file created in a directory such as a hugetlbfs mount (``-m DIR``).
* ``file``       an existing or new named file (survives server restarts).

A :class:`SharedMemory` owns exactly one fd; :meth:`SharedMemory.map` returns a
:class:`Mapping`, which owns one ``mmap``. Both close idempotently.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import tempfile
from typing import Any

from .errors import ClosedError, UsageError

__all__ = [
    "MAX_SIZE",
    "Mapping",
    "SharedMemory",
    "format_size",
    "is_power_of_two",
    "parse_size",
    "round_up_power_of_two",
    "validate_shm_name",
]

#: Largest region we agree to create: 1 TiB (QEMU's example server fails from 2 GiB).
MAX_SIZE = 1 << 40

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a size like ``4M``, ``1G``, ``65536`` or ``2TiB`` into bytes.

    Suffixes are binary (K = 1024). Raises :class:`UsageError` naming the text on bad input.
    """
    if isinstance(text, bool):
        raise UsageError(f"size {text!r} is not a number of bytes")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if match is None:
            raise UsageError(
                f"cannot parse size {text!r}: use a whole number of bytes with an optional "
                "K, M, G or T suffix (powers of 1024), e.g. 4M or 1G"
            )
        value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value <= 0:
        raise UsageError(f"size {text!r} must be greater than zero")
    if value > MAX_SIZE:
        raise UsageError(f"size {text!r} is larger than the maximum of {format_size(MAX_SIZE)}")
    return value


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_up_power_of_two(n: int) -> int:
    """The smallest power of two >= n (QEMU sizes BAR2 this way)."""
    if n <= 0:
        raise UsageError(f"size {n} must be greater than zero")
    return 1 << (n - 1).bit_length()


def format_size(n: int) -> str:
    """``4194304`` -> ``'4M'``; exact binary units only, bytes otherwise."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}B" if n else "0B"


_SHM_NAME_RE = re.compile(r"^[A-Za-z0-9._@+:-]{1,255}$")


def validate_shm_name(name: str) -> str:
    """Check a POSIX shm object name (as given to ``-M``); a leading slash is accepted."""
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or bare in (".", "..") or not _SHM_NAME_RE.match(bare):
        raise UsageError(
            f"invalid shared-memory name {name!r}: use 1-255 letters, digits or ._@+:- "
            "with no slash inside (it becomes a file under /dev/shm)"
        )
    return bare


class SharedMemory:
    """One owned fd of a shared-memory object, with its size and where it came from."""

    def __init__(self, fd: int, size: int, kind: str, path: str | None = None) -> None:
        self._fd = fd
        self.size = size
        self.kind = kind
        #: The file name for ``posix`` and ``file`` backings, else None.
        self.path = path

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def memfd(cls, size: int, name: str = "ivshmem") -> SharedMemory:
        """Anonymous memory of ``size`` bytes."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
        return cls._sized(fd, size, "memfd", None)

    @classmethod
    def posix(cls, name: str, size: int | None, mode: int = 0o600) -> SharedMemory:
        """The POSIX shm object ``name`` (``/dev/shm/NAME``).

        With a ``size`` it is created if missing, and an existing object keeps its content and
        is resized to ``size`` (as QEMU's server does). With ``size=None`` it must exist and is
        used at its current size.
        """
        create = size is not None
        bare = validate_shm_name(name)
        path = os.path.join("/dev/shm", bare)
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, mode)
        except FileNotFoundError as err:
            raise UsageError(f"shared-memory object {name!r} does not exist ({path})") from err
        except PermissionError as err:
            raise UsageError(
                f"no permission to open shared-memory object {name!r} ({path}): "
                "check its owner and mode, or choose another name"
            ) from err
        except OSError as err:
            raise UsageError(f"cannot open shared-memory object {name!r} ({path}): {err}") from err
        if size is None:
            return cls._existing(fd, "posix", path)
        return cls._sized(fd, size, "posix", path)

    @classmethod
    def in_directory(cls, directory: str, size: int, prefix: str = "ivshmem.") -> SharedMemory:
        """An unlinked file in ``directory`` (``-m DIR``; e.g. a hugetlbfs mount)."""
        if not os.path.isdir(directory):
            raise UsageError(f"{directory!r} is not a directory")
        try:
            fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
        except PermissionError as err:
            raise UsageError(
                f"directory {directory!r} is not writable: choose another directory or fix "
                "its permissions"
            ) from err
        except OSError as err:
            raise UsageError(f"cannot create a file in {directory!r}: {err}") from err
        os.unlink(path)
        os.set_inheritable(fd, False)
        return cls._sized(fd, size, "directory", None)

    @classmethod
    def file(cls, path: str, size: int | None = None, mode: int = 0o600) -> SharedMemory:
        """A named file; created with ``size`` if missing, else opened (and grown to ``size``)."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if size is not None else 0)
        try:
            fd = os.open(path, flags, mode)
        except OSError as err:
            raise UsageError(f"cannot open shared-memory file {path!r}: {err.strerror}") from err
        if size is None:
            return cls._existing(fd, "file", path)
        return cls._sized(fd, size, "file", path)

    @classmethod
    def adopt(cls, fd: int, kind: str = "received") -> SharedMemory:
        """Take ownership of ``fd`` (e.g. received over SCM_RIGHTS); its size is ``fstat``'s."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not (stat.S_ISREG(st.st_mode) or st.st_size > 0):
            os.close(fd)
            raise UsageError("the shared-memory fd is not a regular file or memory object")
        return cls(fd, st.st_size, kind)

    @classmethod
    def _existing(cls, fd: int, kind: str, path: str | None) -> SharedMemory:
        actual = os.fstat(fd).st_size
        if actual <= 0:
            os.close(fd)
            raise UsageError(f"shared memory {path!r} is empty: give a size to create it")
        return cls(fd, actual, kind, path)

    @classmethod
    def _sized(cls, fd: int, size: int, kind: str, path: str | None) -> SharedMemory:
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        except OSError as err:
            os.close(fd)
            raise UsageError(f"cannot size shared memory to {format_size(size)}: {err}") from err
        return cls(fd, size, kind, path)

    # -- use -------------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ClosedError("shared memory is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def map(self) -> Mapping:
        return Mapping(self.fd, self.size)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def unlink(self) -> None:
        """Remove the name of a ``posix`` or ``file`` backing (the memory lives on while open)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"<SharedMemory {self.kind}{where} {format_size(self.size)} fd={self._fd}>"


class Mapping:
    """A shared, read-write mapping of a whole region, as a memoryview."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        try:
            mm = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except OSError as err:
            raise UsageError(f"cannot map {format_size(size)} of shared memory: {err}") from err
        self._adopt(mm, size, 0, "the shared memory")

    def _adopt(self, mm: mmap.mmap, size: int, start: int, what: str) -> None:
        """Take ``mm`` and expose its bytes ``start .. start + size``."""
        self._mmap: mmap.mmap | None = mm
        self.size = size
        self.what = what
        view = memoryview(mm)
        self._view: memoryview | None = (
            view if start == 0 and size == len(mm) else view[start : start + size]
        )

    @property
    def memory(self) -> memoryview:
        if self._view is None:
            raise ClosedError(f"the mapping of {self.what} is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def numpy(self, dtype: Any = "u1", offset: int = 0, count: int = -1) -> Any:
        """A numpy array over the mapping (no copy). Needs numpy installed."""
        try:
            import numpy as np
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise UsageError("numpy is not installed: pip install 'ivshmem[numpy]'") from err
        return np.frombuffer(self.memory, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        """Unmap. If views (slices, numpy arrays) are still alive, the unmap happens once
        they are garbage collected; the mapping is unusable through this object at once."""
        view, self._view = self._view, None
        mm, self._mmap = self._mmap, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Exported buffers (user slices, numpy views) still point into the mapping:
                # unmapping now would make them fault. The mmap object is dropped instead and
                # the kernel mapping goes when the last view does.
                pass

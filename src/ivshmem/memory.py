"""Shared-memory objects: creating, opening and mapping the region every peer shares.

Four backings exist, as in QEMU's tooling plus one:

* ``memfd``      anonymous memory (``memfd_create``); lives as long as some fd or mapping does;
                 sealed at its size (:func:`seal_size`), so no holder of the fd can resize it.
* ``posix``      a POSIX shm object, i.e. a file under ``/dev/shm`` (the server's ``-M NAME``).
* ``directory``  an unlinked file created in a directory such as a hugetlbfs mount (``-m DIR``).
* ``file``       an existing or new named file (survives server restarts).

A :class:`SharedMemory` owns exactly one fd; :meth:`SharedMemory.map` returns a
:class:`Mapping`, which owns one ``mmap``. Both close idempotently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import pwd
import re
import stat
import tempfile
from typing import Any

from .errors import ClosedError, UsageError

__all__ = [
    "MAX_SIZE",
    "Mapping",
    "SharedMemory",
    "ShrinkRefusedError",
    "format_size",
    "is_power_of_two",
    "parse_size",
    "round_up_power_of_two",
    "seal_size",
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
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"size {text!r} is not a number of bytes (an int, or a str like '4M')")
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
    if not bare:
        raise UsageError(
            f"empty shared-memory name {name!r}: give a name such as ivshmem (the object "
            "becomes /dev/shm/NAME)"
        )
    if "/" in bare or bare in (".", "..") or not _SHM_NAME_RE.match(bare):
        raise UsageError(
            f"invalid shared-memory name {name!r}: use 1-255 letters, digits or ._@+:- "
            "with no slash inside (it becomes a file under /dev/shm)"
        )
    return bare


def posix_shm_path(name: str) -> str:
    """Where the POSIX shm object ``name`` lives: ``/dev/shm/NAME`` (the name checked)."""
    return os.path.join("/dev/shm", validate_shm_name(name))


class ShrinkRefusedError(UsageError):
    """An existing shared-memory object is larger than the size asked for.

    Shrinking it would make every process that maps its end (a running VM, a peer of an
    earlier server) die with SIGBUS at its next access there, so it is never done."""

    def __init__(self, what: str, path: str, current: int, requested: int) -> None:
        self.path = path
        self.current = current
        self.requested = requested
        super().__init__(
            f"{what} is {format_size(current)}, larger than the {format_size(requested)} asked "
            f"for: shrinking it would crash (SIGBUS) every process that maps its end; ask for "
            f"at least {format_size(current)}, or remove it first ({path}) if its content is "
            "not needed"
        )


def _owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class SharedMemory:
    """One owned fd of a shared-memory object, with its size and where it came from."""

    def __init__(
        self,
        fd: int,
        size: int,
        kind: str,
        path: str | None = None,
        *,
        created: bool = False,
        previous_size: int | None = None,
    ) -> None:
        self._fd = fd
        self.size = size
        self.kind = kind
        #: The file name for ``posix`` and ``file`` backings, else None.
        self.path = path
        #: Whether opening created the named object (so a failed start may remove it again).
        self.created = created
        #: Size of an existing named object before it was grown (None: created, or unknown).
        self.previous_size = previous_size
        #: Sealed against shrinking and growing (a memfd made by :meth:`memfd`): nobody
        #: holding the fd can change its size, so a mapping of it can never fault.
        self.sealed = False
        self._identity: tuple[int, int] | None = None
        if path is not None:
            try:
                st = os.fstat(fd)
                self._identity = (st.st_dev, st.st_ino)
            except OSError:
                pass

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def memfd(cls, size: int, name: str = "ivshmem", *, seal: bool = True) -> SharedMemory:
        """Anonymous memory of ``size`` bytes, sealed at that size (see :func:`seal_size`)
        unless ``seal`` is false."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        shm = cls._sized(fd, size, "memfd", None)
        if seal:
            try:
                seal_size(shm.fd)
            except OSError as err:
                shm.close()
                raise UsageError(f"cannot seal the shared memory: {err.strerror}") from err
            shm.sealed = True
        return shm

    @classmethod
    def posix(
        cls,
        name: str,
        size: int | None,
        mode: int = 0o600,
        *,
        owner_uid: int | None = None,
        group: int | None = None,
    ) -> SharedMemory:
        """The POSIX shm object ``name`` (``/dev/shm/NAME``).

        With a ``size`` it is created if missing, and an existing object keeps its content and
        is grown to ``size`` if smaller; a larger one is refused (:class:`ShrinkRefusedError`),
        never shrunk. With ``size=None`` it must exist and is used at its current size. A
        symbolic link is never followed. For ``owner_uid`` and ``group`` see :meth:`file`.
        """
        path = posix_shm_path(name)
        return cls._named(
            path,
            f"shared-memory object {name!r} ({path})",
            "posix",
            size,
            mode,
            follow_symlinks=False,
            owner_uid=owner_uid,
            group=group,
            check_filesystem=True,
        )

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
            raise UsageError(f"cannot create a file in {directory!r}: {err.strerror}") from err
        os.unlink(path)
        os.set_inheritable(fd, False)
        try:
            check_backing_filesystem(fd, f"directory {directory!r}")
        except BaseException:
            os.close(fd)
            raise
        return cls._sized(fd, size, "directory", None)

    @classmethod
    def file(
        cls,
        path: str,
        size: int | None = None,
        mode: int = 0o600,
        *,
        follow_symlinks: bool = True,
        owner_uid: int | None = None,
        group: int | None = None,
        pseudo_filesystems: bool = True,
    ) -> SharedMemory:
        """A named file; created with ``size`` if missing, else opened (and grown to ``size``;
        a larger file is refused with :class:`ShrinkRefusedError`, never shrunk).

        ``follow_symlinks=False`` refuses a symbolic link at ``path``. With ``owner_uid`` (a
        server claiming the region) an existing file must belong to that user -- another
        user's file may already be open in that user's processes, so it could never be made
        private -- and ``mode`` (and ``group``) are set on it, or it is refused.
        ``pseudo_filesystems=False`` (a server's backing) refuses a file on /proc, /sys and
        the like (:func:`check_backing_filesystem`) before anything is done to it; a process
        mapping a file for itself -- a guest's sysfs ``resource2``, say -- may leave it on.
        """
        return cls._named(
            path,
            f"shared-memory file {path!r}",
            "file",
            size,
            mode,
            follow_symlinks=follow_symlinks,
            owner_uid=owner_uid,
            group=group,
            check_filesystem=not pseudo_filesystems,
        )

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
    def _named(
        cls,
        path: str,
        what: str,
        kind: str,
        size: int | None,
        mode: int,
        *,
        follow_symlinks: bool,
        owner_uid: int | None,
        group: int | None,
        check_filesystem: bool,
    ) -> SharedMemory:
        fd, created = _open_named(path, what, size is not None, mode, follow_symlinks)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                # A FIFO or a device node where the region should be: resizing or chmod-ing
                # it would at best fail and at worst change something else entirely.
                raise UsageError(f"{what} is not a regular file: remove it, or choose another name")
            if check_filesystem:
                check_backing_filesystem(fd, what)
            if owner_uid is not None:
                if not created and st.st_uid != owner_uid:
                    raise UsageError(
                        f"{what} already exists and belongs to {_owner_name(st.st_uid)}, not "
                        f"to {_owner_name(owner_uid)} who runs the server: its owner may hold "
                        "it open or change its mode at any time, so the region could not be "
                        "kept private; remove it (as its owner or root), or choose another name"
                    )
                _set_group_and_mode(fd, st, what, mode, group)
            current = st.st_size
            if size is None:
                if current <= 0:
                    raise UsageError(f"{what} is empty: give a size to create it")
                size = current
            elif current > size:
                raise ShrinkRefusedError(what, path, current, size)
            elif current != size:
                try:
                    os.ftruncate(fd, size)
                except OSError as err:
                    raise UsageError(
                        f"cannot size {what} to {format_size(size)}: {err.strerror}"
                    ) from err
        except BaseException:
            if created:
                _unlink_if_same(path, fd)
            os.close(fd)
            raise
        return cls(
            fd,
            size,
            kind,
            path,
            created=created,
            previous_size=None if created or current == size else current,
        )

    @classmethod
    def _sized(cls, fd: int, size: int, kind: str, path: str | None) -> SharedMemory:
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        except OSError as err:
            os.close(fd)
            raise UsageError(
                f"cannot size shared memory to {format_size(size)}: {err.strerror}"
            ) from err
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
        """Remove the name of a ``posix`` or ``file`` backing (the memory lives on while open),
        if the name still refers to this object: someone may have replaced it since."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if self._identity is None or (st.st_dev, st.st_ino) == self._identity:
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


#: F_SEAL_FUTURE_WRITE (Linux 5.1, include/uapi/linux/fcntl.h); not in Python's fcntl.
F_SEAL_FUTURE_WRITE = 0x0010


def seal_size(fd: int) -> None:
    """Seal a memfd against shrinking and growing, then against further seals.

    Every peer holds this fd. Unsealed, one ``ftruncate(fd, 0)`` from any of them removes the
    pages under everyone's mapping, and every process that touches them -- the server, each
    QEMU, each host peer -- dies of SIGBUS. F_SEAL_SHRINK | F_SEAL_GROW make such a truncate
    fail (EPERM) for everyone, the sealer included. F_SEAL_SEAL, added in the same call, stops
    a peer from adding seals of its own: F_SEAL_FUTURE_WRITE (or F_SEAL_WRITE, once no
    writable mapping exists) would make every later ``mmap(PROT_WRITE)`` fail, so no new QEMU
    or host peer could map the region."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)


def is_size_sealed(fd: int) -> bool:
    """Whether ``fd`` is sealed so that its size cannot change (False if it cannot be sealed)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    need = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    return seals & need == need


# Pseudo filesystems (include/uapi/linux/magic.h) whose files are windows on the kernel or on
# processes, not memory: /proc/self/mem opens as a "regular file", and served as the region it
# handed every client a read-write window on the server's own memory.
_PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc",  # PROC_SUPER_MAGIC
    0x62656572: "sysfs",  # SYSFS_MAGIC
    0x64626720: "debugfs",  # DEBUGFS_MAGIC
    0x74726163: "tracefs",  # TRACEFS_MAGIC
    0x73636673: "securityfs",  # SECURITYFS_MAGIC
    0x27E0EB: "cgroup",  # CGROUP_SUPER_MAGIC
    0x63677270: "cgroup2",  # CGROUP2_SUPER_MAGIC
    0xCAFE4A11: "bpf",  # BPF_FS_MAGIC
    0x62656570: "configfs",  # CONFIGFS_MAGIC
    0x6165676C: "pstore",  # PSTOREFS_MAGIC
    0xDE5E81E4: "efivarfs",  # EFIVARFS_MAGIC
    0x1CD1: "devpts",  # DEVPTS_SUPER_MAGIC
    0x65735543: "fusectl",  # FUSE_CTL_SUPER_MAGIC
    0x42494E4D: "binfmt_misc",  # BINFMTFS_MAGIC
    0x534F434B: "sockfs",  # SOCKFS_MAGIC
    0x50495045: "pipefs",  # PIPEFS_MAGIC
    0x09041934: "anon_inode",  # ANON_INODE_FS_MAGIC
    0x6E736673: "nsfs",  # NSFS_MAGIC
}

_libc: ctypes.CDLL | None = None


def filesystem_type(fd: int) -> int:
    """``f_type`` of the filesystem holding ``fd`` (``fstatfs``; Python's statvfs lacks it).

    ``struct statfs`` starts with ``f_type`` as a native long on Linux; the buffer is larger
    than the struct on every architecture."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(512)
    if _libc.fstatfs(fd, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def check_backing_filesystem(fd: int, what: str) -> None:
    """Refuse a file on a pseudo filesystem (/proc, /sys, ...) as shared memory."""
    try:
        kind = _PSEUDO_FILESYSTEMS.get(filesystem_type(fd))
    except OSError as err:
        raise UsageError(f"cannot tell which filesystem holds {what}: {err.strerror}") from err
    if kind is not None:
        raise UsageError(
            f"{what} is on {kind}, a kernel pseudo filesystem: its files are windows on the "
            "kernel or on processes (such as /proc/self/mem, this process's own memory), not "
            "memory that can be shared; give a regular file on a disk, tmpfs (/dev/shm) or "
            "hugetlbfs"
        )


def _open_named(
    path: str, what: str, create: bool, mode: int, follow_symlinks: bool
) -> tuple[int, bool]:
    """Open (or, with ``create``, create) a named object; return the fd and whether this call
    created it. Creation is tried with O_EXCL first: that is the only way to know the object
    is new (and so ours to remove again if the start fails)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    # A racing remove between the two opens sends us round again; three rounds are plenty.
    for _ in range(3):
        if create:
            try:
                if follow_symlinks:
                    # O_EXCL never follows a link, so a link to a missing file would loop:
                    # open it the plain way (whether it was created is then unknown).
                    return os.open(path, flags | os.O_CREAT, mode), False
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode), True
            except FileExistsError:
                pass
            except OSError as err:
                raise _open_error(err, what, path) from err
        try:
            return os.open(path, flags), False
        except FileNotFoundError as err:
            if not create:
                raise UsageError(f"{what} does not exist") from err
        except OSError as err:
            raise _open_error(err, what, path) from err
    raise UsageError(f"cannot open {what}: it keeps appearing and disappearing")


def _open_error(err: OSError, what: str, path: str) -> UsageError:
    if err.errno == errno.ELOOP:
        return UsageError(
            f"{what} is a symbolic link, which is not followed here (a link could point the "
            "server at any file it may write); give the path of the file itself"
        )
    if err.errno == errno.EISDIR:
        return UsageError(f"{what} is a directory: give the path of a file")
    if err.errno in (errno.EACCES, errno.EPERM):
        owner = ""
        try:
            owner = f" (it belongs to {_owner_name(os.stat(path).st_uid)})"
        except OSError:
            pass
        return UsageError(
            f"no permission to open {what}{owner}: check its owner and mode, or choose another name"
        )
    return UsageError(f"cannot open {what}: {err.strerror}")


def _set_group_and_mode(
    fd: int, st: os.stat_result, what: str, mode: int, group: int | None
) -> None:
    try:
        if group is not None and st.st_gid != group:
            os.fchown(fd, -1, group)
        # Also for an object created just now: os.open's mode was narrowed by the umask.
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError as err:
        target = f"mode {mode:o}" if group is None else f"group {group} and mode {mode:o}"
        raise UsageError(f"cannot give {what} {target}: {err.strerror}") from err


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it is still the file open as ``fd`` (never someone else's)."""
    try:
        mine, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
            os.unlink(path)
    except OSError:
        pass


class Mapping:
    """A shared, read-write mapping of a whole region, as a memoryview."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        try:
            mm = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except OSError as err:
            raise UsageError(
                f"cannot map {format_size(size)} of shared memory: {err.strerror}"
            ) from err
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

"""The lab's cache: where it is, and getting a kernel, busybox and an initramfs into it.

The cache directory is, in order of precedence, the ``cache_dir`` argument, ``$IVSHMEM_LAB_CACHE``,
``$XDG_CACHE_HOME/ivshmem/lab`` or ``~/.cache/ivshmem/lab``. Processes that prepare the cache
at the same time (parallel test runs) serialize on ``cache/lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import debian
from .elf import ElfFormatError, is_static_executable
from .errors import LabSetupError
from .initramfs import build_initramfs
from .kernel import Kernel, fetch_kernel, find_kernel

__all__ = ["Assets", "cache_lock", "default_cache_dir", "prepare", "stderr_progress"]

CACHE_ENV = "IVSHMEM_LAB_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ivshmem" / "lab"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's lock file (blocking) for the duration."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise LabSetupError(
            f"cannot use the lab cache {cache}: {err.strerror}; set {CACHE_ENV} to a "
            "writable directory"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _static_busybox_on_host() -> Path | None:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if not candidate:
            continue
        path = Path(candidate)
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)  # the program headers are near the start
            if is_static_executable(head):
                return path.resolve()
        except (OSError, ElfFormatError):
            continue
    return None


def find_busybox(cache: Path, progress: debian.Progress, fetch: bool) -> Path:
    """A static busybox: the host's, if static, else ``busybox-static``'s, fetched into the cache
    (a dynamically linked busybox cannot run in an initramfs without libc)."""
    host = _static_busybox_on_host()
    if host is not None:
        return host
    cached = cache / "busybox" / "busybox"
    if cached.exists():
        return cached
    if not fetch:
        raise LabSetupError("no static busybox: install busybox-static, or run `ivshmem lab fetch`")
    (cache / "busybox").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache / "busybox") as tmp:
        work = Path(tmp)
        deb = debian.download("busybox-static", work, progress, size_hint="about 1 MB")
        debian.unpack(deb, work / "root")
        for inside in ("bin/busybox", "usr/bin/busybox"):
            if (work / "root" / inside).is_file():
                staged = work / "busybox"
                shutil.copyfile(work / "root" / inside, staged)
                staged.chmod(0o755)
                os.replace(staged, cached)
                return cached
    raise LabSetupError("the busybox-static package has no bin/busybox")


@dataclass(frozen=True)
class Assets:
    """Everything a guest boots from, all inside the cache (or the host's busybox)."""

    cache: Path
    kernel: Kernel
    busybox: Path
    initramfs: Path


def prepare(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fetch: bool = True,
    update: bool = False,
    progress: debian.Progress | None = None,
) -> Assets:
    """Kernel, busybox and initramfs, fetching or building what is missing.

    ``fetch=False`` fails instead of downloading; ``update=True`` fetches the kernel that
    Debian's ``linux-image-amd64`` currently depends on even if an older one is cached.
    """
    cache = resolve_cache_dir(cache_dir)
    report = progress or stderr_progress
    with cache_lock(cache):
        if fetch:
            kernel = fetch_kernel(cache, report, update=update)
        else:
            found = find_kernel(cache)
            if found is None:
                raise LabSetupError(
                    f"no guest kernel in the lab cache {cache}: run `ivshmem lab fetch`"
                )
            kernel = found
        busybox = find_busybox(cache, report, fetch)
        initramfs = build_initramfs(kernel, busybox, cache)
    return Assets(cache=cache, kernel=kernel, busybox=busybox, initramfs=initramfs)


def clean(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Remove the whole cache; returns its path."""
    cache = resolve_cache_dir(cache_dir)
    if cache.exists():
        with cache_lock(cache):
            for child in cache.iterdir():
                if child.name == "lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        with contextlib.suppress(OSError):
            (cache / "lock").unlink()
            cache.rmdir()
    return cache

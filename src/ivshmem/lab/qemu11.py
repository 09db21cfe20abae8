"""A QEMU >= 10.1 (``vfio-user-pci``): the one on PATH, or Debian trixie's in a chroot.

Debian 12 ships QEMU 7.2, which has neither ``vfio-user-pci`` nor ``-accel qtest``;
trixie-backports' ``qemu-system-x86`` has both, but needs trixie's libc and modules. So, when
PATH has no QEMU >= 10.1, :func:`prepare` builds once, in the lab cache, a minimal trixie root
(``debootstrap``) with trixie-backports' QEMU, and :class:`Qemu11` runs it as::

    unshare -m --propagation private bash -c \
        'mount proc; bind /dev /tmp /run ...; exec chroot ROOT qemu-system-x86_64 "$@"'

The mounts live in a private mount namespace that dies with QEMU, so nothing stays mounted.
``unshare``, ``bash`` and ``chroot`` all ``exec``, so the process a caller starts *is* QEMU
(killing it kills QEMU). Paths given to QEMU must be absolute and lie under one of the bound
directories (``/tmp``, ``/run``, ``/dev`` and the lab cache by default; add more with
``binds=``).

A finished root carries ``ROOT/.ivshmem-qemu11`` (the stamp, written last, holding the
version); a root without it is a leftover of an interrupted build and is rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import debian
from .assets import cache_lock, resolve_cache_dir, stderr_progress
from .errors import LabSetupError

__all__ = [
    "MIN_VERSION",
    "Qemu11",
    "Qemu11Unavailable",
    "find",
    "prepare",
    "qemu_version",
]

MIN_VERSION = (10, 1)
SUITE = "trixie"
STAMP = ".ivshmem-qemu11"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_APT_LOCK = ("-o", "DPkg::Lock::Timeout=600")

# Run inside `unshare -m --propagation private`: "$1" is the root, then directories to bind at
# the same path, then "--", then QEMU's arguments. Every mount is private to this namespace.
_RUNNER = r"""
set -e
root=$1; shift
case "$1" in
--host-root=*)
    host_root=${1#--host-root=}; shift
    mkdir -p "$root$host_root"
    mount --rbind / "$root$host_root"
    ;;
esac
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    if [ -d "$1" ]; then
        mkdir -p "$root$1"
        mount --bind "$1" "$root$1"
    fi
    shift
done
shift
exec chroot "$root" "$@"
"""


class Qemu11Unavailable(LabSetupError):
    """No QEMU >= 10.1 here and none can be prepared; the message says what is missing
    (not root, no debootstrap, offline) and what to do."""


@dataclass(frozen=True)
class Qemu11:
    """How to start a QEMU >= 10.1: ``argv(...)`` gives the command prefix for
    ``qemu-system-x86_64``'s arguments."""

    version: tuple[int, int, int]
    binary: str  # on the host, or inside root
    root: Path | None = None  # the trixie chroot, when QEMU comes from the cache
    binds: tuple[str, ...] = field(default=())

    def argv(
        self, binds: Sequence[str | os.PathLike[str]] = (), *, host_root: str | None = None
    ) -> list[str]:
        """The argv prefix: append QEMU's arguments (absolute paths under the bound
        directories). ``binds`` adds directories to make visible inside the chroot, at their
        own paths. ``host_root`` (an absolute path such as ``/.host``) shows the host's whole
        tree there inside the chroot, e.g. for ``-virtfs local,path=/.host,...``: the chroot's
        own ``/`` is Debian trixie's, not the host's. Both are ignored for a QEMU on PATH
        (then ``host_root``'s place is simply ``/``)."""
        if self.root is None:
            return [self.binary]
        dirs = [*self.binds, *(os.path.abspath(os.fspath(b)) for b in binds)]
        extra = []
        if host_root is not None:
            if not host_root.startswith("/") or host_root == "/" or "\n" in host_root:
                raise ValueError(f"host_root must be an absolute path below /, not {host_root!r}")
            extra.append(f"--host-root={host_root}")
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "bash",
            "-c",
            _RUNNER,
            "ivshmem-qemu11",
            str(self.root),
            *extra,
            *dirs,
            "--",
            self.binary,
        ]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def qemu_version(argv: Sequence[str], timeout: float = 60.0) -> tuple[int, int, int] | None:
    """``qemu-system-x86_64 --version`` parsed, or None if it does not run."""
    try:
        out = subprocess.run(
            [*argv, "--version"], capture_output=True, text=True, timeout=timeout, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        return None
    return (int(match[1]), int(match[2]), int(match[3] or 0))


def _on_path() -> Qemu11 | None:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        return None
    version = qemu_version([path])
    if version is None or version[:2] < MIN_VERSION:
        return None
    return Qemu11(version=version, binary=path)


def _root_dir(cache: Path) -> Path:
    return cache / "qemu11" / "root"


def _cached(cache: Path) -> Qemu11 | None:
    root = _root_dir(cache)
    try:
        stamp = json.loads((root / STAMP).read_text())
        version = tuple(int(v) for v in stamp["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(version) != 3 or not (root / "usr/bin/qemu-system-x86_64").exists():
        return None
    return Qemu11(
        version=(version[0], version[1], version[2]),
        binary="/usr/bin/qemu-system-x86_64",
        root=root,
        binds=("/tmp", "/run", str(cache)),
    )


def find(cache_dir: str | os.PathLike[str] | None = None) -> Qemu11 | None:
    """A QEMU >= 10.1 that is ready now (PATH first, then the lab cache), without building."""
    return _on_path() or _cached(resolve_cache_dir(cache_dir))


def prepare(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fetch: bool = True,
    progress: debian.Progress | None = None,
) -> Qemu11:
    """A QEMU >= 10.1: PATH's, the cached trixie root's, or (``fetch=True``) a root built now.

    Raises :class:`Qemu11Unavailable` saying what is missing.
    """
    found = _on_path()
    if found is not None:
        return found
    cache = resolve_cache_dir(cache_dir)
    report = progress or stderr_progress
    with cache_lock(cache):  # other preparers wait here, then find the finished root
        cached = _cached(cache)
        if cached is not None:
            return cached
        if not fetch:
            raise Qemu11Unavailable(
                f"no QEMU >= 10.1 on PATH or in the lab cache {cache}: run "
                "`ivshmem lab fetch --qemu11` (as root, online)"
            )
        _build(cache, report)
        built = _cached(cache)
    if built is None:  # pragma: no cover - _build checks the same things
        raise Qemu11Unavailable(f"the QEMU 11 root in {cache} is incomplete after building")
    return built


def _mirror() -> str:
    """The Debian mirror apt already uses (deb822 ``URIs:`` or a one-line ``deb`` entry)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri.rstrip("/")
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                uri = next((p for p in parts[1:] if "://" in p), "")
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def _run(argv: Sequence[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise Qemu11Unavailable(
            f"{what} did not finish in {timeout:.0f} s (slow or no network?)"
        ) from err
    except OSError as err:
        raise Qemu11Unavailable(f"{what}: cannot run {argv[0]}: {err.strerror}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise Qemu11Unavailable(
            f"{what} failed (exit {done.returncode}); is the Debian mirror reachable "
            f"(offline?)\n{tail}"
        )


def _ensure_debootstrap(report: debian.Progress) -> str:
    path = shutil.which("debootstrap")
    if path is not None:
        return path
    if shutil.which("apt-get") is None:
        raise Qemu11Unavailable(
            "no debootstrap and no apt-get to install it: install debootstrap, or put a "
            "qemu-system-x86_64 >= 10.1 on PATH"
        )
    report("installing debootstrap (apt-get)")
    install = ["apt-get", *_APT_LOCK, "install", "-y", "debootstrap"]
    try:
        _run(install, "apt-get install debootstrap", 900)
    except Qemu11Unavailable:  # a fresh machine may have no package lists yet
        _run(["apt-get", *_APT_LOCK, "update"], "apt-get update", 900)
        _run(install, "apt-get install debootstrap", 900)
    path = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None
    )
    if path is None:
        raise Qemu11Unavailable("apt-get installed debootstrap but it is not on PATH")
    return path


def _build(cache: Path, report: debian.Progress) -> None:
    if os.geteuid() != 0:
        raise Qemu11Unavailable(
            "QEMU >= 10.1 is not on PATH, and building Debian trixie's QEMU into the lab cache "
            "needs root (debootstrap, chroot, mount namespaces): run `ivshmem lab fetch "
            "--qemu11` as root, or install a qemu-system-x86_64 >= 10.1"
        )
    for tool in ("unshare", "chroot", "mount", "bash"):
        if shutil.which(tool) is None:
            raise Qemu11Unavailable(f"{tool} is missing (util-linux/coreutils/bash)")
    debootstrap = _ensure_debootstrap(report)
    mirror = _mirror()
    base = cache / "qemu11"
    base.mkdir(parents=True, exist_ok=True)
    root = _root_dir(cache)
    if root.exists():  # an interrupted build (no stamp): start over
        shutil.rmtree(root, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
    try:
        report(f"building a Debian {SUITE} root for QEMU >= 10.1 from {mirror} (~500 MB, ~1 min)")
        _run(
            [debootstrap, "--variant=minbase", SUITE, str(work), mirror],
            f"debootstrap {SUITE}",
            1800,
        )
        (work / "etc/apt/sources.list.d/backports.list").write_text(
            f"deb {mirror} {SUITE}-backports main\n"
        )
        builder = Qemu11(version=(0, 0, 0), binary="", root=work)
        prefix = builder.argv()[:-1]  # without a binary: run apt-get in the chroot
        report(f"installing qemu-system-x86 from {SUITE}-backports")
        _run([*prefix, "apt-get", "update"], f"apt-get update in the {SUITE} root", 900)
        _run(
            [
                *prefix,
                "env",
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "-t",
                f"{SUITE}-backports",
                "qemu-system-x86",
            ],
            f"apt-get install qemu-system-x86 from {SUITE}-backports",
            1800,
        )
        _run([*prefix, "apt-get", "clean"], "apt-get clean", 300)
        probe = Qemu11(version=(0, 0, 0), binary="/usr/bin/qemu-system-x86_64", root=work)
        version = qemu_version(probe.argv())
        if version is None or version[:2] < MIN_VERSION:
            raise Qemu11Unavailable(
                f"{SUITE}-backports gave QEMU {version}, not >= {MIN_VERSION[0]}.{MIN_VERSION[1]}"
            )
        os.replace(work, root)
        (root / STAMP).write_text(json.dumps({"version": list(version)}) + "\n")
        report(f"QEMU {'.'.join(map(str, version))} ready in {root}")
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)

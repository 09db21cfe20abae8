"""The guests' initramfs: a static busybox, the base kernel modules and :data:`INIT_SCRIPT`.

It is written as a ``newc`` cpio archive (the format the kernel unpacks, see
Documentation/driver-api/early-userspace/buffer-format.rst) by :func:`newc_archive`, needing no
``cpio`` tool, left uncompressed (the kernel would spend longer decompressing than QEMU spends
loading 3 MB), and cached under its content hash, so it is rebuilt only when busybox, the
kernel or the script change.

Everything per-run (which program, which devices) stays out of the archive: the init script
finds its job directory on the kernel command line (``ivshmem_lab.job=``) and reads it through
the host's root, shared read-only over 9p.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .kernel import BASE_MODULES, Kernel

__all__ = ["INIT_SCRIPT", "CpioEntry", "build_initramfs", "newc_archive"]

#: The guest's PID 1. Serial ports: ttyS0 is the kernel console (boot noise, kept for
#: debugging), ttyS1 carries the program's stdout and stderr, ttyS2 is the control channel
#: (``init``, ``start``, ``exit N`` and ``error MESSAGE`` lines for the host).
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/ TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Raw mode: no \n -> \r\n translation and no echo on the host-facing ports.
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
uptime() { read -r up _ < /proc/uptime; echo "$up"; }
ctl() { echo "$*" > /dev/ttyS2; }
fail() {
    echo "ivshmem lab init: $*" > /dev/console
    ctl "error $*"
    poweroff -f
    sleep 3600  # init must never exit: that is a kernel panic, not a clean power-off
}
ctl "init $(uptime)"

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

job=
for arg in $(cat /proc/cmdline); do
    case "$arg" in ivshmem_lab.job=*) job="${arg#*=}" ;; esac
done
[ -n "$job" ] || fail "no ivshmem_lab.job= on the kernel command line"

# The host's / read-only over 9p (cache=loose: it does not change under a guest's feet, and
# caching halves the time Python takes to start), made writable by an overlay whose upper
# layer lives in guest RAM: programs may write anywhere, and nothing reaches the host.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower \
    || fail "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 rw /rw && mkdir /rw/upper /rw/work || fail "cannot mount tmpfs"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /root \
    || fail "cannot mount the overlay over the host's root"
mount --bind /proc /root/proc || fail "cannot bind /proc"
mount --bind /sys /root/sys || fail "cannot bind /sys"
mount --bind /dev /root/dev || fail "cannot bind /dev"
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts devpts /root/dev/pts
mount -t tmpfs -o mode=1777 shm /root/dev/shm
mkdir -p /root/run/ivshmem-lab && cp /bin/busybox /root/run/ivshmem-lab/busybox \
    || fail "cannot copy busybox into the guest's root"

[ -f "/root$job/run.sh" ] || fail "job directory $job is not visible through the host's root"
if [ -f "/root$job/modules" ]; then
    while read -r ko; do
        insmod "/root$ko" || fail "insmod $ko failed"
    done < "/root$job/modules"
fi

ctl "start $(uptime)"
chroot /root /run/ivshmem-lab/busybox sh "$job/run.sh" < /dev/null > /dev/ttyS1 2>&1
ctl "exit $?"
poweroff -f
sleep 3600
"""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: a directory, regular file, symlink (data = target) or device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(out: bytearray) -> None:
    out.extend(b"\0" * (-len(out) % 4))


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A ``newc`` cpio archive (magic 070701) of ``entries``: owner root, mtime 0, so equal
    inputs give equal bytes (and equal content hashes)."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.extend(encoded)
        _pad4(out)
        out.extend(data)
        _pad4(out)

    for ino, entry in enumerate(entries, start=1):
        member(ino, entry.name.lstrip("/"), entry.mode, entry.data, entry.rdev)
    member(0, "TRAILER!!!", 0, b"", (0, 0))
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def _entries(kernel: Kernel, busybox: Path) -> list[CpioEntry]:
    directory = stat.S_IFDIR | 0o755
    entries = [
        CpioEntry(name, directory)
        for name in ("bin", "dev", "proc", "sys", "lower", "rw", "root", "lib", "lib/modules")
    ]
    # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    order = kernel.load_order(BASE_MODULES)
    for name in order:
        data = kernel.module_path(name).read_bytes()
        entries.append(CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data))
    order_text = "".join(f"{name}\n" for name in order).encode()
    entries.append(CpioEntry("lib/modules/order", stat.S_IFREG | 0o644, order_text))
    return entries


def build_initramfs(kernel: Kernel, busybox: Path, cache: Path) -> Path:
    """The initramfs for ``kernel`` in ``cache/initramfs/``, built if not there yet."""
    archive = newc_archive(_entries(kernel, busybox))
    digest = hashlib.sha256(archive).hexdigest()[:20]
    directory = cache / "initramfs"
    path = directory / f"{digest}.cpio"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{digest}.{os.getpid()}"
        tmp.write_bytes(archive)
        os.replace(tmp, path)
    return path

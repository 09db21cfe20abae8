"""Which QEMU runs a guest, and how it sees the host's files.

Debian 12's QEMU 7.2 runs as is. A QEMU >= 10.1 (needed for this project's device over
vfio-user, ``vfio-user-pci``) is either on PATH (run as is too) or Debian trixie's, in a
chroot the lab cache holds (:mod:`ivshmem.lab.qemu11`). A guest needs more of the host than
qemu11's own runner binds (it binds a few directories at the same paths): the guest mounts
the host's whole ``/`` over 9p and runs the host's Python from it. Binding ``/`` at ``/``
would hide trixie's libraries from QEMU, so this runner binds the host's root at
:data:`HOST_MOUNT` inside the chroot instead, and every path the lab gives QEMU (kernel,
initramfs, logs, sockets, shared files, the 9p share) is rewritten to lie under it.

Mounts are made in a private mount namespace (``unshare -m --propagation private``) that
dies with QEMU, so nothing stays mounted; ``unshare``, ``bash`` and ``chroot`` all exec, so
the process the lab starts is QEMU itself (PR_SET_PDEATHSIG and kill() reach it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LabSetupError
from .qemu11 import Qemu11

__all__ = ["HOST_MOUNT", "QemuCommand", "host_qemu", "qemu11_command"]

#: Where the host's root appears inside the trixie chroot.
HOST_MOUNT = "/.ivshmem-host"

# "$1" is the chroot, then QEMU's argv. /tmp and /run are bound at their own paths too, so
# that paths a user writes into extra QEMU arguments (a -netdev socket in /tmp) still work.
_RUNNER = r"""
set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
for dir in /tmp /run; do
    mkdir -p "$root$dir"
    mount --rbind "$dir" "$root$dir"
done
mkdir -p "$root/.ivshmem-host"
mount --rbind / "$root/.ivshmem-host"
exec chroot "$root" "$@"
"""


@dataclass(frozen=True)
class QemuCommand:
    """How to start one ``qemu-system-x86_64``: ``prefix`` + QEMU's arguments, with every
    host path passed through ``path``."""

    prefix: tuple[str, ...]
    path: Callable[[str], str]
    #: ``"7.2.x"`` and so on, for messages and reports.
    version: str
    #: Whether this QEMU has vfio-user-pci (>= 10.1).
    vfio_user: bool


def _same(path: str) -> str:
    return path


def host_qemu(binary: str, version: str = "") -> QemuCommand:
    """A QEMU that runs directly on the host (Debian's 7.2, or a >= 10.1 on PATH)."""
    return QemuCommand((binary,), _same, version, False)


def qemu11_command(found: Qemu11) -> QemuCommand:
    """The QEMU >= 10.1 :func:`ivshmem.lab.qemu11.prepare` found: PATH's as is, or the
    cached trixie root's through the chroot runner above."""
    if found.root is None:
        return QemuCommand((found.binary,), _same, found.version_text, True)
    if os.geteuid() != 0:
        raise LabSetupError(
            f"QEMU {found.version_text} lives in a Debian trixie root ({found.root}) and runs "
            "through a chroot, which needs root: run the lab as root, or install a "
            "qemu-system-x86_64 >= 10.1 on PATH"
        )

    def inside(path: str) -> str:
        absolute = os.path.abspath(path)
        return HOST_MOUNT if absolute == "/" else HOST_MOUNT + absolute

    prefix = (
        "unshare",
        "-m",
        "--propagation",
        "private",
        "bash",
        "-c",
        _RUNNER,
        "ivshmem-lab-qemu11",
        str(found.root),
        found.binary,
    )
    return QemuCommand(prefix, inside, found.version_text, True)

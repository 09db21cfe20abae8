"""Finding ivshmem devices in sysfs (``/sys/bus/pci/devices``) and describing them.

Nothing here needs privileges: vendor/device ids, the ``resource`` table of BARs, the driver
and IOMMU-group links are world-readable. Config space beyond its first 64 bytes is readable
by root only (the kernel truncates it for others), so the MSI-X vector count is known only to
root; plain-versus-doorbell does not depend on it.

The sysfs root is a parameter everywhere (as psutil's proc root), so tests run on fake trees.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError
from ._errors import DevicePermissionError, NoSuchDeviceError

__all__ = [
    "IVSHMEM_DEVICE_ID",
    "IVSHMEM_VENDOR_ID",
    "BarInfo",
    "IvshmemDevice",
    "find_devices",
    "normalize_address",
    "read_device",
    "select_device",
]

#: PCI ids of QEMU's ivshmem devices (hw/misc/ivshmem-pci.c): Red Hat/Qumranet's vendor id.
#: Both variants share vendor, device, class (0x0500, RAM) and revision (1), and QEMU's default
#: subsystem ids (1af4:1100), so the ids cannot tell them apart: the MSI-X BAR can.
IVSHMEM_VENDOR_ID = 0x1AF4
IVSHMEM_DEVICE_ID = 0x1110

# Flags of the `resource` file (include/linux/ioport.h).
_IORESOURCE_IO = 0x00000100
_IORESOURCE_MEM = 0x00000200
_IORESOURCE_PREFETCH = 0x00002000
_IORESOURCE_MEM_64 = 0x00100000

# Config space (include/uapi/linux/pci_regs.h).
_PCI_STATUS = 0x06
_PCI_STATUS_CAP_LIST = 0x10
_PCI_CAPABILITY_LIST = 0x34
_PCI_INTERRUPT_PIN = 0x3D
_PCI_CAP_ID_MSIX = 0x11
_PCI_MSIX_FLAGS_QSIZE = 0x07FF

_ADDRESS_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-f]{1,8}):)?(?P<bus>[0-9a-f]{1,2}):(?P<slot>[0-9a-f]{1,2})"
    r"\.(?P<func>[0-7])$"
)


@dataclass(frozen=True)
class BarInfo:
    """One base address register as the guest kernel assigned it."""

    index: int
    start: int
    size: int
    flags: int

    @property
    def is_memory(self) -> bool:
        return bool(self.flags & _IORESOURCE_MEM)

    @property
    def is_io(self) -> bool:
        return bool(self.flags & _IORESOURCE_IO)

    @property
    def prefetchable(self) -> bool:
        return bool(self.flags & _IORESOURCE_PREFETCH)

    @property
    def is_64bit(self) -> bool:
        return bool(self.flags & _IORESOURCE_MEM_64)


@dataclass(frozen=True)
class IvshmemDevice:
    """A snapshot of one ivshmem PCI device, as sysfs described it when it was read."""

    #: Canonical PCI address, e.g. ``0000:00:04.0``.
    address: str
    #: The device's sysfs directory.
    path: str
    #: ``"doorbell"`` (ivshmem-doorbell: MSI-X and BAR1, or an INTx line) or ``"plain"``
    #: (ivshmem-plain: no interrupt of any kind).
    kind: Literal["plain", "doorbell"]
    #: BAR0..BAR5; None where the BAR is not implemented.
    bars: tuple[BarInfo | None, ...]
    revision: int
    subsystem_vendor: int
    subsystem_device: int
    #: Name of the bound driver, None when no driver is bound.
    driver: str | None
    #: IOMMU group name (a number), None when the device is in no group (no IOMMU).
    iommu_group: str | None
    #: MSI-X table size; None when config space was not readable (not root) or no MSI-X.
    msix_vectors: int | None
    #: The sysfs root this was found under (``/sys``).
    sysfs_root: str
    #: Config space's interrupt pin (1 = INTA#), 0 when the device has no legacy INTx line
    #: (QEMU's devices) or config space was unreadable. This project's vfio-user device has
    #: pin 1 in its legacy INTx mode.
    interrupt_pin: int = 0

    @property
    def intx(self) -> bool:
        """Whether the device has a legacy INTx line (interrupt pin set)."""
        return self.interrupt_pin != 0

    @property
    def doorbell(self) -> bool:
        return self.kind == "doorbell"

    def bar(self, index: int) -> BarInfo | None:
        return self.bars[index] if 0 <= index < len(self.bars) else None

    @property
    def shared_memory_size(self) -> int:
        """Size of BAR2 (the shared memory) in bytes, 0 when missing."""
        bar = self.bar(2)
        return 0 if bar is None else bar.size

    def file(self, name: str) -> str:
        """Path of a file in the device's sysfs directory."""
        return os.path.join(self.path, name)

    def describe(self) -> str:
        """Short human description: ``0000:00:04.0 (ivshmem-doorbell)``."""
        return f"{self.address} (ivshmem-{self.kind})"


def devices_dir(sysfs_root: str) -> str:
    return os.path.join(sysfs_root, "bus", "pci", "devices")


def normalize_address(text: str) -> str:
    """``00:04.0`` or ``0000:00:04.0`` (any case) -> ``0000:00:04.0``.

    Raises :class:`NoSuchDeviceError` for something that is not a PCI address.
    """
    if not isinstance(text, str):
        raise UsageError(f"a PCI address is a str such as '0000:00:04.0', not {text!r}")
    match = _ADDRESS_RE.match(text.strip().lower())
    if match is None:
        raise NoSuchDeviceError(
            f"{text!r} is not a PCI address: write it as DOMAIN:BUS:SLOT.FUNCTION, e.g. "
            "0000:00:04.0 (see `ivshmem info` or `lspci -D`), or give a device index"
        )
    domain = int(match["domain"] or "0", 16)
    return f"{domain:04x}:{int(match['bus'], 16):02x}:{int(match['slot'], 16):02x}.{match['func']}"


def _cat(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace").strip()


def _cat_int(path: str, default: int = -1) -> int:
    try:
        return int(_cat(path), 0)
    except (OSError, ValueError):
        return default


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _parse_resource(text: str) -> tuple[BarInfo | None, ...]:
    bars: list[BarInfo | None] = []
    for index, line in enumerate(text.splitlines()[:6]):
        fields = line.split()
        try:
            start, end, flags = (int(f, 16) for f in fields[:3])
        except ValueError:
            bars.append(None)
            continue
        if start == 0 and end == 0:
            bars.append(None)
        else:
            bars.append(BarInfo(index, start, end - start + 1, flags))
    bars.extend([None] * (6 - len(bars)))
    return tuple(bars)


def _msix_table_size(config: bytes) -> int | None:
    """Walk the capability list; None when there is no MSI-X capability or it is unreadable."""
    if len(config) < 0x40 or not config[_PCI_STATUS] & _PCI_STATUS_CAP_LIST:
        return None
    pos = config[_PCI_CAPABILITY_LIST] & ~3
    seen: set[int] = set()
    # A malformed (or truncated, when not root) list must not loop forever.
    while pos >= 0x40 and pos + 4 <= len(config) and pos not in seen:
        seen.add(pos)
        if config[pos] == _PCI_CAP_ID_MSIX:
            flags = int.from_bytes(config[pos + 2 : pos + 4], "little")
            return (flags & _PCI_MSIX_FLAGS_QSIZE) + 1
        pos = config[pos + 1] & ~3
    return None


def read_device(path: str, sysfs_root: str = "/sys") -> IvshmemDevice | None:
    """Describe the PCI device at sysfs directory ``path``; None if it is not ivshmem (or
    vanished while being read)."""
    vendor = _cat_int(os.path.join(path, "vendor"))
    device = _cat_int(os.path.join(path, "device"))
    if (vendor, device) != (IVSHMEM_VENDOR_ID, IVSHMEM_DEVICE_ID):
        return None
    try:
        bars = _parse_resource(_cat(os.path.join(path, "resource")))
    except OSError:
        return None
    try:
        with open(os.path.join(path, "config"), "rb") as f:
            config = f.read(4096)
    except OSError:
        config = b""
    msix = _msix_table_size(config)
    # The doorbell variant puts its MSI-X table and PBA in an exclusive BAR1 (QEMU's
    # msix_init_exclusive_bar); the plain variant has no BAR1 and no MSI-X capability.
    # BAR1 is visible to everyone, the capability only to root: either is enough. A device
    # in the seed's legacy INTx mode (this project's vfio-user device) may have neither, but
    # has an interrupt pin, which lies in the first 64 bytes that everyone may read.
    pin = config[_PCI_INTERRUPT_PIN] if len(config) > _PCI_INTERRUPT_PIN else 0
    kind: Literal["plain", "doorbell"] = (
        "doorbell" if msix is not None or bars[1] is not None or pin else "plain"
    )
    return IvshmemDevice(
        address=os.path.basename(os.path.normpath(path)),
        path=path,
        kind=kind,
        bars=bars,
        revision=_cat_int(os.path.join(path, "revision")),
        subsystem_vendor=_cat_int(os.path.join(path, "subsystem_vendor")),
        subsystem_device=_cat_int(os.path.join(path, "subsystem_device")),
        driver=_link_name(os.path.join(path, "driver")),
        iommu_group=_link_name(os.path.join(path, "iommu_group")),
        msix_vectors=msix,
        sysfs_root=sysfs_root,
        interrupt_pin=pin,
    )


def find_devices(sysfs_root: str = "/sys") -> list[IvshmemDevice]:
    """Every ivshmem device (1af4:1110) on this machine, in PCI address order.

    An empty list when there is none (or no PCI bus at all, as in a container).
    """
    if not isinstance(sysfs_root, str) or not sysfs_root or "\0" in sysfs_root:
        raise UsageError(f"sysfs_root must be a directory path (str), not {sysfs_root!r}")
    where = devices_dir(sysfs_root)
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        return []
    except PermissionError as err:
        raise DevicePermissionError(
            f"cannot list PCI devices in {where}: {err.strerror}; check that sysfs is mounted "
            "and readable"
        ) from err
    found = []
    for name in names:
        dev = read_device(os.path.join(where, name), sysfs_root)
        if dev is not None:
            found.append(dev)
    return found


def _listing(devices: Sequence[IvshmemDevice]) -> str:
    return ", ".join(f"[{i}] {d.describe()}" for i, d in enumerate(devices))


def select_device(
    devices: Sequence[IvshmemDevice], which: str | int | None, sysfs_root: str = "/sys"
) -> IvshmemDevice:
    """Pick one device by PCI address, by index in address order, or the only one (None).

    A string of digits is an index (``"0"``), so command-line values can be passed through.
    """
    where = devices_dir(sysfs_root)
    if not devices:
        raise NoSuchDeviceError(
            f"no ivshmem device (PCI {IVSHMEM_VENDOR_ID:04x}:{IVSHMEM_DEVICE_ID:04x}) under "
            f"{where}: start the VM with -device ivshmem-plain or -device ivshmem-doorbell "
            "(or run this inside such a guest)"
        )
    if which is None:
        if len(devices) > 1:
            raise NoSuchDeviceError(
                f"{len(devices)} ivshmem devices found: {_listing(devices)}; choose one by PCI "
                "address or index"
            )
        return devices[0]
    if isinstance(which, bool):
        raise NoSuchDeviceError(f"{which!r} is neither a PCI address nor a device index")
    if isinstance(which, str) and which.strip().isdigit():
        which = int(which.strip())
    if isinstance(which, int):
        if not 0 <= which < len(devices):
            raise NoSuchDeviceError(
                f"there is no ivshmem device with index {which}: found {len(devices)}: "
                f"{_listing(devices)}"
            )
        return devices[which]
    address = normalize_address(which)
    for dev in devices:
        if dev.address == address:
            return dev
    # Say so when the address exists but is some other device: a common slip.
    other = os.path.join(where, address)
    if os.path.isdir(other):
        vendor = _cat(os.path.join(other, "vendor")) if os.path.exists(other) else "?"
        device = _cat(os.path.join(other, "device")) if os.path.exists(other) else "?"
        raise NoSuchDeviceError(
            f"PCI device {address} is not an ivshmem device (it is {vendor}:{device}, not "
            f"0x{IVSHMEM_VENDOR_ID:04x}:0x{IVSHMEM_DEVICE_ID:04x}); ivshmem devices here: "
            f"{_listing(devices)}"
        )
    raise NoSuchDeviceError(
        f"no PCI device {address} under {where}; ivshmem devices here: {_listing(devices)}"
    )

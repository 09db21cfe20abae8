"""Binding an ivshmem device to ``vfio-pci`` (and back) through sysfs.

The ``driver_override`` way is used rather than ``vfio-pci/new_id``: new_id would grab every
1af4:1110 device at once, including ones the user wants left alone, and stays in force after
the device is released. driver_override concerns this device only.
"""

from __future__ import annotations

import errno
import logging
import os

from ._errors import (
    DevicePermissionError,
    DriverBoundError,
    NoIommuGroupError,
    VfioUnavailableError,
)
from ._sysfs import IvshmemDevice, read_device

__all__ = ["VFIO_PCI", "bind_vfio_pci", "noiommu_enabled", "unbind_vfio_pci"]

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"

_MODULES_HINT = (
    "load the VFIO modules first: `modprobe vfio-pci` (it pulls in vfio and "
    "vfio_iommu_type1; without modules.dep, insmod vfio, vfio_iommu_type1, vfio_virqfd, "
    "irqbypass, vfio-pci-core, vfio-pci in that order)"
)

_IOMMU_HINT = (
    "VFIO needs an IOMMU: in QEMU use `-machine q35 -device intel-iommu` (before the ivshmem "
    "device) and boot the guest kernel with `intel_iommu=on`; on kernels built with "
    "CONFIG_VFIO_NOIOMMU, `modprobe vfio enable_unsafe_noiommu_mode=1` is the unsafe "
    "alternative"
)


def noiommu_enabled(sysfs_root: str = "/sys") -> bool:
    """Whether VFIO's unsafe no-IOMMU mode is on (devices without a group can be used)."""
    path = os.path.join(sysfs_root, "module", "vfio", "parameters", "enable_unsafe_noiommu_mode")
    try:
        with open(path) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def vfio_pci_loaded(sysfs_root: str = "/sys") -> bool:
    return os.path.isdir(os.path.join(sysfs_root, "bus", "pci", "drivers", VFIO_PCI))


def _write(device: IvshmemDevice, path: str, value: str, doing: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except PermissionError as err:
        raise DevicePermissionError(
            f"{device.describe()}: no permission to {doing} ({path}): run as root"
        ) from err
    except OSError as err:
        raise DriverBoundError(
            f"{device.describe()}: could not {doing} ({path}: {err.strerror or err}); "
            "the kernel log (dmesg) tells why",
            device.driver,
        ) from err


def _reread(device: IvshmemDevice) -> IvshmemDevice:
    fresh = read_device(device.path, device.sysfs_root)
    if fresh is None:
        raise DriverBoundError(f"{device.describe()} disappeared while rebinding it", None)
    return fresh


def check_vfio_ready(device: IvshmemDevice) -> None:
    """Raise the error that explains why ``device`` cannot be used with VFIO (modules, IOMMU
    group), if any."""
    if not vfio_pci_loaded(device.sysfs_root):
        raise VfioUnavailableError(
            f"{device.describe()}: the vfio-pci driver is not loaded "
            f"({os.path.join(device.sysfs_root, 'bus/pci/drivers', VFIO_PCI)} is missing): "
            + _MODULES_HINT
        )
    if device.iommu_group is None and not noiommu_enabled(device.sysfs_root):
        raise NoIommuGroupError(f"{device.describe()} is in no IOMMU group: " + _IOMMU_HINT)


def bind_vfio_pci(device: IvshmemDevice) -> IvshmemDevice:
    """Bind ``device`` to vfio-pci (unbinding its current driver) and return a fresh snapshot.

    Needs root. Does nothing when it is already bound to vfio-pci.
    """
    if device.driver == VFIO_PCI:
        return device
    check_vfio_ready(device)
    log.info("binding %s to %s (was %s)", device.describe(), VFIO_PCI, device.driver or "unbound")
    _write(device, device.file("driver_override"), VFIO_PCI, f"set driver_override to {VFIO_PCI}")
    if device.driver is not None:
        _write(
            device,
            device.file(os.path.join("driver", "unbind")),
            device.address,
            f"unbind it from {device.driver}",
        )
    probe = os.path.join(device.sysfs_root, "bus", "pci", "drivers_probe")
    try:
        with open(probe, "w") as f:
            f.write(device.address)
    except PermissionError as err:
        raise DevicePermissionError(
            f"{device.describe()}: no permission to write {probe}: run as root"
        ) from err
    except OSError as err:
        # vfio-pci's probe fails (EINVAL) when the device has no IOMMU group.
        fresh = _reread(device)
        hint = _IOMMU_HINT if fresh.iommu_group is None else "see the kernel log (dmesg)"
        raise DriverBoundError(
            f"{device.describe()}: {VFIO_PCI} refused the device "
            f"({err.strerror or errno.errorcode.get(err.errno or 0, err)}): {hint}",
            fresh.driver,
        ) from err
    fresh = _reread(device)
    if fresh.driver != VFIO_PCI:
        raise DriverBoundError(
            f"{device.describe()}: binding to {VFIO_PCI} did not take (now bound to "
            f"{fresh.driver or 'no driver'}): see the kernel log (dmesg)",
            fresh.driver,
        )
    return fresh


def unbind_vfio_pci(device: IvshmemDevice) -> IvshmemDevice:
    """Undo :func:`bind_vfio_pci`: clear driver_override, unbind from vfio-pci and let the
    kernel probe its usual driver (usually none for ivshmem). Returns a fresh snapshot."""
    _write(device, device.file("driver_override"), "\n", "clear driver_override")
    if device.driver == VFIO_PCI:
        _write(
            device,
            device.file(os.path.join("driver", "unbind")),
            device.address,
            f"unbind it from {VFIO_PCI}",
        )
        probe = os.path.join(device.sysfs_root, "bus", "pci", "drivers_probe")
        try:
            with open(probe, "w") as f:
                f.write(device.address)
        except OSError:
            pass  # no driver wants it: that is the usual state of an ivshmem device
    return _reread(device)

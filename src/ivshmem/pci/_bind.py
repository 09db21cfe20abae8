"""Binding an ivshmem device to ``vfio-pci`` (and back) through sysfs.

The ``driver_override`` way is used rather than ``vfio-pci/new_id``: new_id would grab every
1af4:1110 device at once, including ones the user wants left alone, and stays in force after
the device is released. driver_override concerns this device only.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex

from ..errors import UsageError
from ._errors import (
    BindFailedError,
    DevicePermissionError,
    DriverBindingError,
    NoIommuGroupError,
    VfioUnavailableError,
)
from ._sysfs import IvshmemDevice, read_device

__all__ = [
    "VFIO_PCI",
    "bind_commands",
    "bind_vfio_pci",
    "noiommu_enabled",
    "unbind_command",
    "unbind_vfio_pci",
]

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


def _check_device(device: object) -> None:
    if not isinstance(device, IvshmemDevice):
        raise UsageError(
            f"expected an IvshmemDevice (from find_devices() or select_device()), not {device!r}"
        )


def _write(device: IvshmemDevice, path: str, value: str, doing: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except PermissionError as err:
        raise DevicePermissionError(
            f"{device.describe()}: no permission to {doing} ({path}): run as root"
        ) from err
    except OSError as err:
        raise BindFailedError(
            f"{device.describe()}: could not {doing} ({path}: {err.strerror or err}); "
            "the kernel log (dmesg) tells why",
            device.driver,
        ) from err


def _reread(device: IvshmemDevice) -> IvshmemDevice:
    fresh = read_device(device.path, device.sysfs_root)
    if fresh is None:
        raise BindFailedError(f"{device.describe()} disappeared while rebinding it", None)
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


def _probe_path(device: IvshmemDevice) -> str:
    return os.path.join(device.sysfs_root, "bus", "pci", "drivers_probe")


def unbind_command(device: IvshmemDevice) -> str:
    """The shell command (for root) that detaches ``device`` from its current driver."""
    return f"echo {device.address} > {shlex.quote(device.file(os.path.join('driver', 'unbind')))}"


def bind_commands(device: IvshmemDevice) -> str:
    """The shell commands (for root) that do what :func:`bind_vfio_pci` does.

    drivers_probe only offers a device that has no driver to the drivers, so a bound device
    must be unbound first; driver_override then makes vfio-pci the only driver that takes it.
    """
    steps = [f"echo {VFIO_PCI} > {shlex.quote(device.file('driver_override'))}"]
    if device.driver is not None:
        steps.append(unbind_command(device))
    steps.append(f"echo {device.address} > {shlex.quote(_probe_path(device))}")
    return "; ".join(steps)


def _read_override(device: IvshmemDevice) -> str | None:
    """The device's driver_override, None when unset (the kernel shows that as ``(null)``)."""
    try:
        with open(device.file("driver_override")) as f:
            value = f.read().strip()
    except OSError:
        return None
    return None if value in ("", "(null)") else value


def bind_vfio_pci(device: IvshmemDevice) -> IvshmemDevice:
    """Bind ``device`` to vfio-pci (unbinding its current driver) and return a fresh snapshot.

    Needs root. Does nothing when it is already bound to vfio-pci. When binding fails after
    the device was changed, the previous driver_override is restored and the previous driver
    is bound again, so a failed attempt does not leave the device without its driver.
    """
    _check_device(device)
    if device.driver == VFIO_PCI:
        return device
    check_vfio_ready(device)
    log.info("binding %s to %s (was %s)", device.describe(), VFIO_PCI, device.driver or "unbound")
    previous_override = _read_override(device)
    _write(device, device.file("driver_override"), VFIO_PCI, f"set driver_override to {VFIO_PCI}")
    unbound = False
    try:
        if device.driver is not None:
            _write(
                device,
                device.file(os.path.join("driver", "unbind")),
                device.address,
                f"unbind it from {device.driver}",
            )
            unbound = True
        fresh = _probe_vfio(device)
    except BaseException as err:
        outcome, driver = _undo_bind(device, previous_override, unbound)
        if isinstance(err, DriverBindingError):
            err.driver = driver
        if isinstance(err, (DriverBindingError, DevicePermissionError)) and len(err.args) == 1:
            err.args = (f"{err.args[0]}; {outcome}",)
        raise
    return fresh


def _probe_vfio(device: IvshmemDevice) -> IvshmemDevice:
    """Ask the kernel to probe the (driver-less, overridden) device; the fresh snapshot."""
    probe = _probe_path(device)
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
        raise BindFailedError(
            f"{device.describe()}: {VFIO_PCI} refused the device "
            f"({err.strerror or errno.errorcode.get(err.errno or 0, err)}): {hint}",
            fresh.driver,
        ) from err
    fresh = _reread(device)
    if fresh.driver != VFIO_PCI:
        raise BindFailedError(
            f"{device.describe()}: binding to {VFIO_PCI} did not take (now bound to "
            f"{fresh.driver or 'no driver'}): see the kernel log (dmesg)",
            fresh.driver,
        )
    return fresh


def _undo_bind(
    device: IvshmemDevice, previous_override: str | None, unbound: bool
) -> tuple[str, str | None]:
    """Put back what a failed :func:`bind_vfio_pci` changed: driver_override, and the driver
    it unbound. Returns a sentence for the error message and the driver bound afterwards.
    Never raises: the caller is already reporting the failure that matters."""
    problems: list[str] = []
    try:
        with open(device.file("driver_override"), "w") as f:
            # A lone newline clears the override (the kernel strips it and stores nothing).
            f.write(previous_override or "\n")
    except OSError as err:
        problems.append(f"restoring driver_override failed ({err.strerror or err})")
    if unbound and device.driver is not None:
        # The driver's own bind file, not drivers_probe: that would offer the device to every
        # driver, and the one it had is the one to give it back to.
        bind = os.path.join(device.sysfs_root, "bus", "pci", "drivers", device.driver, "bind")
        try:
            with open(bind, "w") as f:
                f.write(device.address)
        except OSError as err:
            problems.append(f"binding it to {device.driver} again failed ({err.strerror or err})")
    fresh = read_device(device.path, device.sysfs_root)
    driver = fresh.driver if fresh is not None else None
    log.info("%s: binding undone, now bound to %s", device.describe(), driver or "no driver")
    if problems:
        return (
            f"undoing the attempt was incomplete: {'; '.join(problems)}; it is bound to "
            f"{driver or 'no driver'} now",
            driver,
        )
    if device.driver is None:
        return "driver_override was restored", driver
    return (
        f"driver_override was restored and the device is bound to {driver or 'no driver'}",
        driver,
    )


def unbind_vfio_pci(device: IvshmemDevice) -> IvshmemDevice:
    """Undo :func:`bind_vfio_pci`: clear driver_override, unbind from vfio-pci and let the
    kernel probe its usual driver (usually none for ivshmem). Returns a fresh snapshot."""
    _check_device(device)
    _write(device, device.file("driver_override"), "\n", "clear driver_override")
    if device.driver == VFIO_PCI:
        _write(
            device,
            device.file(os.path.join("driver", "unbind")),
            device.address,
            f"unbind it from {VFIO_PCI}",
        )
        try:
            with open(_probe_path(device), "w") as f:
                f.write(device.address)
        except OSError:
            pass  # no driver wants it: that is the usual state of an ivshmem device
    return _reread(device)

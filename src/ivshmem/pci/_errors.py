"""Errors of the guest driver.

Every one names the device (by PCI address) and says what to do about it::

    DeviceError (ivshmem.errors)
    ├── NoSuchDeviceError          no ivshmem device, or none at that address / index
    ├── DevicePermissionError      sysfs or /dev/vfio refused access (run as root, lockdown)
    ├── DriverBoundError           bound to another driver than the one this needs
    ├── NoIommuGroupError          VFIO asked for, but the device is in no IOMMU group
    ├── VfioUnavailableError       the vfio / vfio-pci modules are not loaded
    ├── InterruptsUnavailableError interrupts asked for on a device that has none (plain)
    ├── BarError                   a BAR is missing, too small, or cannot be mapped
    └── VfioError                  a VFIO ioctl failed (what was attempted + the OSError)
"""

from __future__ import annotations

from ..errors import DeviceError

__all__ = [
    "BarError",
    "DevicePermissionError",
    "DriverBoundError",
    "InterruptsUnavailableError",
    "NoIommuGroupError",
    "NoSuchDeviceError",
    "VfioError",
    "VfioUnavailableError",
]


class NoSuchDeviceError(DeviceError, LookupError):
    """No ivshmem device matches (none at all, or not the address / index asked for)."""


class DevicePermissionError(DeviceError):
    """The kernel refused access to a sysfs or /dev/vfio file of the device."""


class DriverBoundError(DeviceError):
    """The device is bound to a driver other than the one the request needs."""

    def __init__(self, message: str, driver: str | None) -> None:
        super().__init__(message)
        #: The driver currently bound (None when no driver is bound).
        self.driver = driver


class NoIommuGroupError(DeviceError):
    """VFIO needs the device to be in an IOMMU group, and it is in none."""


class VfioUnavailableError(DeviceError):
    """The VFIO kernel modules (vfio, vfio_iommu_type1, vfio-pci) are not loaded."""


class InterruptsUnavailableError(DeviceError):
    """Interrupts were required, but this device cannot deliver any (ivshmem-plain)."""


class BarError(DeviceError):
    """A BAR of the device is missing, smaller than the ivshmem layout needs, or unmappable."""


class VfioError(DeviceError):
    """A VFIO ioctl failed; the message says what was being attempted, the OSError is the
    ``__cause__``."""

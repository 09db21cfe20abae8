"""Errors of the guest driver.

Every one names the device (by PCI address) and says what to do about it::

    DeviceError (ivshmem.errors)
    ├── NoSuchDeviceError          no ivshmem device, or none at that address / index
    ├── DevicePermissionError      sysfs or /dev/vfio refused access (run as root, lockdown)
    ├── DriverBindingError         the device's driver binding does not allow the request
    │   ├── WrongDriverError       another driver than the one needed holds the device
    │   ├── NoDriverBoundError     no driver is bound, and the request needs one (vfio-pci)
    │   └── BindFailedError        binding or unbinding a driver failed or did not take
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
    "BindFailedError",
    "DevicePermissionError",
    "DriverBindingError",
    "DriverBoundError",
    "InterruptsUnavailableError",
    "NoDriverBoundError",
    "NoIommuGroupError",
    "NoSuchDeviceError",
    "VfioError",
    "VfioUnavailableError",
    "WrongDriverError",
    "driver_error",
]


class NoSuchDeviceError(DeviceError, LookupError):
    """No ivshmem device matches (none at all, or not the address / index asked for)."""


class DevicePermissionError(DeviceError):
    """The kernel refused access to a sysfs or /dev/vfio file of the device."""


class DriverBindingError(DeviceError):
    """The device's driver binding does not allow what was asked (the base of the three
    conditions below; ``except DriverBindingError`` catches them all)."""

    def __init__(self, message: str, driver: str | None) -> None:
        super().__init__(message)
        #: The driver currently bound (None when no driver is bound).
        self.driver = driver


class WrongDriverError(DriverBindingError):
    """A driver other than the one the request needs holds the device (or, for VFIO, another
    device of its IOMMU group)."""


class NoDriverBoundError(DriverBindingError):
    """No driver is bound to the device, and the request needs one (vfio-pci)."""


class BindFailedError(DriverBindingError):
    """Binding or unbinding a driver failed, or did not take (the kernel log tells why)."""


#: The name this error had before it was split by condition, kept so that existing
#: ``except DriverBoundError`` clauses catch what they always caught (all three conditions).
DriverBoundError = DriverBindingError


def driver_error(message: str, driver: str | None) -> DriverBindingError:
    """The right error for "the device is not bound to the driver it needs": bound to
    ``driver``, or (None) to none at all."""
    if driver is None:
        return NoDriverBoundError(message, None)
    return WrongDriverError(message, driver)


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

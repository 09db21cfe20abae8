"""The guest side: a pure-Python user-space driver for QEMU's ivshmem PCI devices.

Inside a Linux guest, :func:`open_pci` finds an ``ivshmem-plain`` or ``ivshmem-doorbell``
device in sysfs, maps its shared memory (BAR2) and registers (BAR0), and — for a doorbell
device bound to vfio-pci — receives MSI-X doorbells through VFIO. The result is an
:class:`ivshmem.Endpoint`, so the same application code runs as a host peer or in a guest::

    with ivshmem.open_pci(interrupts=True, bind_vfio=True) as ep:
        ep.memory[0:5] = b"hello"
        ep.notify(peer=0, vector=0)
        ep.wait(timeout=1.0)

:func:`find_devices` lists the devices without opening anything (``ivshmem info``).

On this project's own device (``ivshmem-device`` over vfio-user, QEMU >= 10.1) the endpoint
also reads the register extension (:mod:`ivshmem.registers`): :attr:`PciEndpoint.peers` from
the membership registers, :meth:`PciEndpoint.membership`, :meth:`PciEndpoint.take_events`,
:meth:`PciEndpoint.wait_membership`, :attr:`PciEndpoint.server_state`; and it receives
doorbells over the legacy INTx line when the device runs in INTx mode.
"""

from __future__ import annotations

from ._bind import bind_vfio_pci, unbind_vfio_pci
from ._endpoint import (
    InterruptMode,
    PciEndpoint,
    PeersSource,
    open_pci,
    read_device_status,
    read_ivposition,
)
from ._errors import (
    BarError,
    BindFailedError,
    DevicePermissionError,
    DriverBindingError,
    DriverBoundError,
    InterruptsUnavailableError,
    NoDriverBoundError,
    NoIommuGroupError,
    NoSuchDeviceError,
    VfioError,
    VfioUnavailableError,
    WrongDriverError,
)
from ._extension import (
    DeviceStatus,
    Extension,
    Membership,
    MembershipEvent,
    ServerState,
    feature_names,
)
from ._sysfs import (
    IVSHMEM_DEVICE_ID,
    IVSHMEM_VENDOR_ID,
    BarInfo,
    IvshmemDevice,
    find_devices,
    normalize_address,
    select_device,
)

__all__ = [
    "IVSHMEM_DEVICE_ID",
    "IVSHMEM_VENDOR_ID",
    "BarError",
    "BarInfo",
    "BindFailedError",
    "DevicePermissionError",
    "DeviceStatus",
    "DriverBindingError",
    "DriverBoundError",
    "Extension",
    "InterruptMode",
    "InterruptsUnavailableError",
    "IvshmemDevice",
    "Membership",
    "MembershipEvent",
    "NoDriverBoundError",
    "NoIommuGroupError",
    "NoSuchDeviceError",
    "PciEndpoint",
    "PeersSource",
    "ServerState",
    "VfioError",
    "VfioUnavailableError",
    "WrongDriverError",
    "bind_vfio_pci",
    "feature_names",
    "find_devices",
    "normalize_address",
    "open_pci",
    "read_device_status",
    "read_ivposition",
    "select_device",
    "unbind_vfio_pci",
]

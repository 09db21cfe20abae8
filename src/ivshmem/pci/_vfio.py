"""VFIO, the kernel's way to drive a PCI device from user space: the only way to receive
ivshmem-doorbell's MSI-X interrupts without a kernel module of our own.

The sequence (Documentation/driver-api/vfio.rst): open the container ``/dev/vfio/vfio``, open
the device's group ``/dev/vfio/<group>``, attach the group to the container, choose the IOMMU
model, get a device fd by PCI address; then BARs and config space are regions of the device
fd (mmap / pread / pwrite at the offset the kernel reports), and interrupts are delivered to
eventfds registered with ``VFIO_DEVICE_SET_IRQS``.

ioctl numbers and structs are those of ``include/uapi/linux/vfio.h``; every ioctl failure is
re-raised as :class:`VfioError` naming the device and the step.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
from typing import Any

from ._errors import (
    BarError,
    DevicePermissionError,
    NoIommuGroupError,
    VfioError,
    VfioUnavailableError,
    WrongDriverError,
    driver_error,
)
from ._mmio import BarMapping
from ._sysfs import IvshmemDevice

__all__ = ["VfioDevice"]

log = logging.getLogger(__name__)


# -- include/uapi/linux/vfio.h ------------------------------------------------------------
# Every VFIO ioctl is _IO(VFIO_TYPE, VFIO_BASE + n): direction and size bits are zero on
# purpose (the structs carry their own argsz), so the number is simply (';' << 8) | (100 + n).


def _vfio_io(nr: int) -> int:
    return (ord(";") << 8) | (100 + nr)


VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio_io(9)
VFIO_DEVICE_SET_IRQS = _vfio_io(10)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# enum { VFIO_PCI_BAR0_REGION_INDEX, ... VFIO_PCI_CONFIG_REGION_INDEX = 7 ... }
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_CONFIG_REGION_INDEX = 7
# enum { VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, ... }
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSIX_IRQ_INDEX = 2

# include/uapi/linux/pci_regs.h
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class _GroupStatus(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32)]


class _DeviceInfo(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("num_regions", _u32), ("num_irqs", _u32)]


class _RegionInfo(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("cap_offset", _u32),
        ("size", _u64),
        ("offset", _u64),
    ]


class _IrqInfo(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]


class _IrqSetHeader(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("start", _u32),
        ("count", _u32),
    ]


@functools.cache
def _irq_set_type(count: int) -> type[ctypes.Structure]:
    """struct vfio_irq_set followed by ``count`` __s32 eventfds (its flexible ``data[]``)."""
    return type(
        f"_IrqSet{count}",
        (ctypes.Structure,),
        {"_fields_": [("hdr", _IrqSetHeader), ("fds", ctypes.c_int32 * count)]},
    )


# -----------------------------------------------------------------------------------------


class _Fd:
    """An owned fd that becomes -1 once closed, so a reused number is never touched."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class VfioDevice:
    """An ivshmem device opened through VFIO: regions, config space, MSI-X or INTx eventfds.

    The device must already be bound to vfio-pci. Needs access to ``/dev/vfio/vfio`` and the
    group's node (root, or a user the group node was given to).
    """

    def __init__(self, device: IvshmemDevice, dev_root: str = "/dev") -> None:
        self.device = device
        self._fds: list[_Fd] = []  # container, group, device: closed in reverse order
        self._device_holder: _Fd | None = None
        self._irq_index: int | None = None  # the IRQ index whose trigger is set, if any
        self._saved_command: int | None = None
        try:
            self._open(dev_root)
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------

    def _fail(self, doing: str, err: OSError) -> VfioError:
        return VfioError(
            f"{self.device.describe()}: {doing} failed: {err.strerror or err} "
            f"(errno {errno.errorcode.get(err.errno or 0, err.errno)})"
        )

    def _ioctl(self, fd: int, request: int, arg: Any, doing: str) -> int:
        try:
            if isinstance(arg, int):
                return int(fcntl.ioctl(fd, request, arg))
            return int(fcntl.ioctl(fd, request, arg, True))
        except OSError as err:
            raise self._fail(doing, err) from err

    def _open_node(self, path: str, what: str) -> int:
        name = self.device.describe()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            if what == "container":
                raise VfioUnavailableError(
                    f"{name}: {path} does not exist: the vfio module is not loaded "
                    "(`modprobe vfio-pci`)"
                ) from err
            raise driver_error(
                f"{name}: {path} does not exist: the device is not bound to vfio-pci "
                "(open it with bind_vfio=True, or bind it yourself)",
                self.device.driver,
            ) from err
        except PermissionError as err:
            raise DevicePermissionError(
                f"{name}: no permission to open {path}: run as root, or give this user the "
                "node (chown) — VFIO grants access per group node"
            ) from err
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise VfioError(
                    f"{name}: {path} is busy: another process (or another open endpoint in "
                    "this one) already uses this VFIO group; close it first"
                ) from err
            raise VfioError(f"{name}: cannot open {path}: {err.strerror or err}") from err
        self._fds.append(_Fd(fd))
        return fd

    def _open(self, dev_root: str) -> None:
        dev = self.device
        name = dev.describe()
        if dev.iommu_group is None:
            raise NoIommuGroupError(
                f"{name} is in no IOMMU group, so VFIO cannot open it: use an IOMMU "
                "(QEMU: -machine q35 -device intel-iommu, guest: intel_iommu=on)"
            )
        container = self._open_node(os.path.join(dev_root, "vfio", "vfio"), "container")
        version = self._ioctl(container, VFIO_GET_API_VERSION, 0, "asking the VFIO API version")
        if version != VFIO_API_VERSION:
            raise VfioError(
                f"{name}: the kernel's VFIO API version is {version}, this driver knows "
                f"version {VFIO_API_VERSION}"
            )

        # Without an IOMMU (unsafe no-IOMMU mode) the group node is named noiommu-N.
        group_path = os.path.join(dev_root, "vfio", dev.iommu_group)
        noiommu = not os.path.exists(group_path) and os.path.exists(
            os.path.join(dev_root, "vfio", f"noiommu-{dev.iommu_group}")
        )
        if noiommu:
            group_path = os.path.join(dev_root, "vfio", f"noiommu-{dev.iommu_group}")
        group = self._open_node(group_path, "group")

        status = _GroupStatus(argsz=ctypes.sizeof(_GroupStatus))
        self._ioctl(group, VFIO_GROUP_GET_STATUS, status, f"reading the status of {group_path}")
        if not status.flags & VFIO_GROUP_FLAGS_VIABLE:
            others = _group_members(dev)
            raise WrongDriverError(
                f"{name}: IOMMU group {dev.iommu_group} is not usable by VFIO because other "
                f"devices in it are bound to host drivers ({others}): bind all of them to "
                "vfio-pci (or unbind them), or put the ivshmem device in its own group",
                dev.driver,
            )
        self._ioctl(
            group,
            VFIO_GROUP_SET_CONTAINER,
            ctypes.c_int32(container),
            f"attaching {group_path} to the VFIO container",
        )
        if noiommu:
            iommu_type = VFIO_NOIOMMU_IOMMU
        elif self._ioctl(
            container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU, "checking for the Type1v2 IOMMU"
        ):
            iommu_type = VFIO_TYPE1v2_IOMMU
        elif self._ioctl(
            container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU, "checking for the Type1 IOMMU"
        ):
            iommu_type = VFIO_TYPE1_IOMMU
        else:
            raise VfioUnavailableError(
                f"{name}: the kernel offers no Type1 IOMMU model for VFIO: load "
                "vfio_iommu_type1 (`modprobe vfio_iommu_type1`)"
            )
        self._ioctl(container, VFIO_SET_IOMMU, iommu_type, f"setting the IOMMU type {iommu_type}")

        # The ioctl's return value is the new fd, so the address goes in a mutable buffer
        # (fcntl.ioctl returns a copy of an immutable one instead of the result).
        address = ctypes.create_string_buffer(dev.address.encode("ascii"))
        fd = self._ioctl(group, VFIO_GROUP_GET_DEVICE_FD, address, "getting the VFIO device fd")
        self._device_holder = _Fd(fd)
        self._fds.append(self._device_holder)
        self._device_fd = fd

        info = _DeviceInfo(argsz=ctypes.sizeof(_DeviceInfo))
        self._ioctl(fd, VFIO_DEVICE_GET_INFO, info, "reading the VFIO device info")
        if not info.flags & VFIO_DEVICE_FLAGS_PCI or info.num_regions <= (
            VFIO_PCI_CONFIG_REGION_INDEX
        ):
            raise VfioError(f"{name}: VFIO does not present it as a PCI device")
        self.num_irqs = int(info.num_irqs)
        self._config = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX, "config space")

    # -- regions -------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        return self._device_fd

    def region_info(self, index: int, what: str) -> _RegionInfo:
        info = _RegionInfo(argsz=ctypes.sizeof(_RegionInfo), index=index)
        self._ioctl(
            self._device_fd, VFIO_DEVICE_GET_REGION_INFO, info, f"reading the region of {what}"
        )
        return info

    def map_region(self, index: int, what: str, min_size: int) -> BarMapping:
        """mmap a BAR region; BarError when it is too small or VFIO does not allow mmap."""
        info = self.region_info(index, what)
        if info.size < min_size:
            raise BarError(
                f"{self.device.describe()}: {what} is {info.size} bytes through VFIO, "
                f"at least {min_size} are needed"
            )
        if not info.flags & VFIO_REGION_INFO_FLAG_MMAP:
            raise BarError(f"{self.device.describe()}: VFIO does not allow mapping {what}")
        try:
            return BarMapping(self._device_fd, info.size, info.offset, 0, what)
        except OSError as err:
            raise BarError(
                f"{self.device.describe()}: mapping {what} ({info.size} bytes) through VFIO "
                f"failed: {err.strerror or err}"
            ) from err

    # -- config space --------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        try:
            data = os.pread(self._device_fd, size, self._config.offset + offset)
        except OSError as err:
            raise self._fail(f"reading config space at {offset:#x}", err) from err
        return int.from_bytes(data, "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        try:
            os.pwrite(self._device_fd, value.to_bytes(size, "little"), self._config.offset + offset)
        except OSError as err:
            raise self._fail(f"writing config space at {offset:#x}", err) from err

    def enable_bus_master(self) -> None:
        """Let the device write to memory, which is what an MSI-X message is.

        vfio-pci enables memory decoding when the device is opened but leaves bus mastering
        off (a driver turns it on once it set up DMA). With it off, QEMU drops the device's
        MSI-X writes (they go through the device's bus-master address space, disabled with
        the bit): the doorbell is rung and nothing arrives, with no error anywhere.
        """
        command = self.read_config(PCI_COMMAND, 2)
        wanted = command | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY
        if wanted != command:
            self._saved_command = command
            self.write_config(PCI_COMMAND, 2, wanted)

    # -- interrupts ----------------------------------------------------------------------

    def _irq_count(self, index: int, what: str) -> tuple[int, int]:
        """(count, flags) of IRQ ``index`` as VFIO reports it; (0, 0) when it has none."""
        if self.num_irqs <= index:
            return 0, 0
        info = _IrqInfo(argsz=ctypes.sizeof(_IrqInfo), index=index)
        self._ioctl(self._device_fd, VFIO_DEVICE_GET_IRQ_INFO, info, f"reading the {what} info")
        if not info.flags & VFIO_IRQ_INFO_EVENTFD:
            return 0, int(info.flags)
        return int(info.count), int(info.flags)

    def msix_count(self) -> int:
        """MSI-X vectors the device offers through VFIO (its table size)."""
        return self._irq_count(VFIO_PCI_MSIX_IRQ_INDEX, "MSI-X")[0]

    def intx_available(self) -> bool:
        """Whether VFIO can deliver the device's legacy INTx line to an eventfd: the device
        has an interrupt pin, and vfio-pci got the line (it refuses a line shared with other
        devices when the device cannot mask INTx itself: PCI 2.3 INTx disable)."""
        return self._irq_count(VFIO_PCI_INTX_IRQ_INDEX, "INTx")[0] > 0

    def _set_irqs(self, index: int, flags: int, fds: list[int], count: int, doing: str) -> None:
        irq_set = _irq_set_type(len(fds))()
        irq_set.hdr.argsz = ctypes.sizeof(irq_set)
        irq_set.hdr.flags = flags
        irq_set.hdr.index = index
        irq_set.hdr.start = 0
        irq_set.hdr.count = count
        for i, fd in enumerate(fds):
            irq_set.fds[i] = fd
        self._ioctl(self._device_fd, VFIO_DEVICE_SET_IRQS, irq_set, doing)

    def enable_msix(self, eventfds: list[int]) -> None:
        """Enable MSI-X with vector i signalling ``eventfds[i]``."""
        self._set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            eventfds,
            len(eventfds),
            f"enabling {len(eventfds)} MSI-X vector(s) with eventfds",
        )
        self._irq_index = VFIO_PCI_MSIX_IRQ_INDEX

    def enable_intx(self, eventfd: int) -> None:
        """Signal ``eventfd`` when the device raises INTx.

        vfio-pci masks the line as it signals (INTx is level-triggered: left unmasked, a line
        the device still holds would interrupt forever): after each signal, make the device
        drop the line (ivshmem: read IntrStatus) and then :meth:`unmask_intx`.
        """
        self._set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            [eventfd],
            1,
            "enabling INTx with an eventfd",
        )
        self._irq_index = VFIO_PCI_INTX_IRQ_INDEX

    def unmask_intx(self) -> None:
        """Unmask the INTx line vfio-pci masked when it last signalled; if the device still
        holds the line, it signals again at once."""
        self._set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
            [],
            1,
            "unmasking INTx",
        )

    def disable_irqs(self) -> None:
        """Turn off whichever interrupt (MSI-X or INTx) was enabled. Idempotent."""
        index, self._irq_index = self._irq_index, None
        if index is None:
            return
        what = "MSI-X" if index == VFIO_PCI_MSIX_IRQ_INDEX else "INTx"
        self._set_irqs(
            index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, [], 0, f"disabling {what}"
        )

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Disable interrupts, restore the command register and close device, group and
        container (the kernel would do most of this on exit; doing it here keeps a long-lived
        process that reopens the device clean). Idempotent; the first error is raised after
        everything was released."""
        first: BaseException | None = None
        if self._device_holder is not None and self._device_holder.fd >= 0:
            try:
                self.disable_irqs()
            except VfioError as err:
                first = err
            if self._saved_command is not None:
                try:
                    self.write_config(PCI_COMMAND, 2, self._saved_command)
                except VfioError as err:
                    first = first or err
                self._saved_command = None
        while self._fds:
            holder = self._fds.pop()
            try:
                holder.close()
            except OSError as err:
                first = first or err
        if first is not None:
            raise first


def _group_members(device: IvshmemDevice) -> str:
    """``0000:00:05.0 (e1000e)`` for each other device in the IOMMU group."""
    where = os.path.join(device.sysfs_root, "kernel", "iommu_groups", device.iommu_group or "")
    try:
        names = sorted(os.listdir(os.path.join(where, "devices")))
    except OSError:
        return "unknown devices"
    parts = []
    for name in names:
        if name == device.address:
            continue
        try:
            driver = os.path.basename(os.readlink(os.path.join(where, "devices", name, "driver")))
        except OSError:
            driver = "no driver"
        parts.append(f"{name} ({driver})")
    return ", ".join(parts) or "none"

"""The ivshmem PCI device, served over vfio-user to QEMU >= 10.1 (``vfio-user-pci``).

* :mod:`~ivshmem.device.vfio_user` -- the protocol, sans I/O: bytes and fds in, requests out;
* :mod:`~ivshmem.device.model` -- one VM's PCI function: config space, BAR0, interrupts;
* :mod:`~ivshmem.device.link` -- its connection to the ivshmem server, as an ordinary peer;
* :mod:`~ivshmem.device.loop` -- the process: one selector loop, several VMs.

See docs/device.md.
"""

from .loop import DeviceServer, VmDevice, VmSpec
from .model import DeviceOptions, IvshmemFunction

__all__ = ["DeviceOptions", "DeviceServer", "IvshmemFunction", "VmDevice", "VmSpec"]

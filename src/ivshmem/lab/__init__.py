"""The VM lab: throw-away Linux guests under QEMU, wired to an ivshmem server or a shared file,
each running a Python program from the host with this package importable.

::

    from ivshmem.lab import Lab

    with Lab() as lab:
        [result] = lab.run(code="import ivshmem; print('hello from a guest')", timeout=120)
        print(result.returncode, result.output)

See :class:`Lab` for the options, :mod:`ivshmem.lab.lab` for how a guest is put together, and
``ivshmem lab --help`` for the command line.
"""

from .assets import Assets, clean, default_cache_dir, prepare
from .errors import GuestError, GuestTimeoutError, LabError, LabSetupError, LabUsageError
from .guest import DeviceKind, Doorbell, Guest, GuestResult, PlainRegion, VfioUser
from .lab import Lab, run_guests

__all__ = [
    "Assets",
    "DeviceKind",
    "Doorbell",
    "Guest",
    "GuestError",
    "GuestResult",
    "GuestTimeoutError",
    "Lab",
    "LabError",
    "LabSetupError",
    "LabUsageError",
    "PlainRegion",
    "VfioUser",
    "clean",
    "default_cache_dir",
    "prepare",
    "run_guests",
]

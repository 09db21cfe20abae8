"""Errors of the VM lab.

::

    IvshmemError
    └── LabError                    base of everything the lab raises
        ├── LabSetupError           QEMU, the guest kernel or busybox is missing or cannot be
        │                           fetched; the message says what to install or run
        └── GuestError              a guest did not run its program to the end: QEMU refused to
            │                       start, the guest's init failed, or check() on a failed exit
            └── GuestTimeoutError   the guest was still running at its deadline and was killed

:class:`GuestError` carries the :class:`~ivshmem.lab.guest.GuestResult` collected so far (program
output, kernel console, QEMU's own messages) as ``.result``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IvshmemError, UsageError

if TYPE_CHECKING:
    from .guest import GuestResult

__all__ = ["GuestError", "GuestTimeoutError", "LabError", "LabSetupError", "LabUsageError"]


class LabError(IvshmemError):
    """Base class of the lab's errors."""


class LabUsageError(LabError, UsageError):
    """The caller asked the lab for something impossible (bad path, size, option)."""


class LabSetupError(LabError):
    """Something the lab needs on this machine is missing or cannot be prepared."""


class GuestError(LabError):
    """A guest failed; ``result`` holds what it produced before failing."""

    def __init__(self, message: str, result: GuestResult) -> None:
        super().__init__(message)
        self.result = result


class GuestTimeoutError(GuestError, TimeoutError):
    """A guest ran past its deadline and was killed."""

"""Taking the count of one of our own doorbell eventfds without ever blocking.

Every peer a server admits receives every other peer's doorbell eventfds: that is how it rings
them. O_NONBLOCK is a flag of the *open file description*, which every holder of an eventfd
shares, so any peer can clear it on anyone's doorbell with one ``fcntl``. Our readers were
written for non-blocking eventfds (the server creates them so, and QEMU sets the flag on every
eventfd it receives): a spin loop tries ``read`` and expects EAGAIN; a waiter reads after
``poll()`` said the fd was readable. With the flag cleared, the first sleeps in ``read`` until
the next ring (``wait(timeout=0.1)`` never returns, server news go unhandled), and so does the
second whenever the count it saw is gone before its read -- and it can be: the peer that
cleared the flag holds the fd too, and may read it first. Setting the flag again before each
read would not do: the other peer can clear it between our ``fcntl`` and our ``read``.

So no reader of ours depends on the flag. Linux's eventfd answers a read that carries
IOCB_NOWAIT with EAGAIN exactly as it answers a read on a non-blocking file, whatever the file's
flags say (Linux 5.12 and later: ``preadv2(fd, ..., RWF_NOWAIT)``). :func:`try_read` does that
read: from C where the optional extension ``_eventfdcore`` was built (an empty read is a bool
there, not a raised and caught BlockingIOError: this is the doorbell's spin loop), from Python
(``os.preadv``) otherwise. At import, one read of a private, blocking, empty eventfd checks
that this kernel answers EAGAIN; on a kernel that does not know RWF_NOWAIT for eventfds
(before 5.12), :data:`NOWAIT_READS` is False and :func:`try_read` falls back to a plain read,
which a peer that clears O_NONBLOCK can make block (the docs say so).

Writes need nothing of the kind: eventfd's write does not take RWF_NOWAIT (EOPNOTSUPP, even on
6.x), and it does not need to. A write blocks only when the counter is at its maximum; with
the flag merely cleared, a ring goes in as before. A counter filled on purpose (a *jammed*
doorbell) is the server's job: it finds and clears those (ivshmem.server.doorbells).
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["NOWAIT_READS", "try_read"]

_NOWAIT = getattr(os, "RWF_NOWAIT", 8)  # linux/fs.h; os has it on Linux since Python 3.7
_preadv = os.preadv
_BUFFERS = [bytearray(8)]  # the count read is not looked at: one buffer serves every call


def _try_read_python(fd: int) -> bool:
    """Take eventfd ``fd``'s count (True) or find none (False), never blocking, whatever
    O_NONBLOCK says. OSError for anything else."""
    try:
        _preadv(fd, _BUFFERS, -1, _NOWAIT)
    except BlockingIOError:
        return False
    return True


def _try_read_plain(fd: int) -> bool:
    """The fallback where the kernel does not honour RWF_NOWAIT on eventfds: blocks if the
    flag was cleared and no count is there."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


def _kernel_honours_nowait() -> bool:
    """Whether an RWF_NOWAIT read of an empty *blocking* eventfd gives EAGAIN here. Kernels
    that do not know the flag for eventfds refuse it (EOPNOTSUPP; ENOSYS before preadv2)
    rather than ignore it, so the probe cannot block: since Linux 5.12 the eventfd both
    accepts the flag and honours it (one change did both). Any other refusal (a seccomp
    filter that forbids preadv2, say) also means plain reads, not a failed import."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, on purpose
    try:
        _preadv(fd, _BUFFERS, -1, _NOWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False  # pragma: no cover - an empty eventfd gave a count


def _load() -> tuple[bool, Callable[[int], bool]]:
    if not _kernel_honours_nowait():
        return False, _try_read_plain
    if os.environ.get("IVSHMEM_PURE_PYTHON", "") not in ("", "0"):
        return True, _try_read_python
    try:
        from ._eventfdcore import try_read as core
    except ImportError:
        return True, _try_read_python
    return True, core


#: True where reads of our doorbells cannot be made to block by another holder (see above).
#: try_read(fd): take eventfd ``fd``'s count, True, or find none, False; never blocks when
#: NOWAIT_READS. Raises OSError for a closed fd or one that is not an eventfd.
NOWAIT_READS, try_read = _load()

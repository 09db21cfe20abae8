"""Memory ordering: why plain Python loads and stores are enough here, and the one fence.

Every channel, the membership table and the layout rely on the argument below. It holds on
x86-64 only, so :func:`check_platform` refuses everything else with a clear error.

1. **Which instruction does a shared store become?** Control words (ring indices, flags,
   sequence numbers) are accessed through ``memoryview.cast('Q')`` item access, never through
   ``struct.pack_into``. CPython's ``memoryobject.c`` handles ``view[i] = v`` for format ``Q`` by
   converting ``v`` to a C ``unsigned long long`` and ``memcpy``-ing ``sizeof`` of it into place
   (``PACK_SINGLE``); a fixed 8-byte ``memcpy`` compiles to one 8-byte ``mov``. Reading
   (``UNPACK_SINGLE``) is the mirror image: one 8-byte load into a local. Every control word
   sits at an 8-byte-aligned offset of an mmap (page-aligned), and x86-64 guarantees that an
   aligned 8-byte load or store is atomic (Intel SDM vol. 3A, "Guaranteed Atomic
   Operations"), so no peer can ever observe half an index. ``struct.pack_into('<Q', ...)``
   would also end in a native ``memcpy`` on little-endian builds, but only because
   ``_struct.c`` swaps its little-endian packers for the native ones at import when the sizes
   match; that is an optimisation we would be depending on silently, and it costs a format
   lookup per call. The cast view is both the explicit choice and the faster one.

2. **What orders the payload before the index?** A sender writes the payload (one
   ``memcpy``/slice assignment), then the record header, then the head index; a receiver
   loads the head index, then the header, then the payload. Each of these is a separate C
   call made by the interpreter in program order, with Python bytecode between them, so no
   compiler can reorder them across one another (they are opaque calls through function
   pointers). The hardware then gives TSO (Intel SDM vol. 3A, "Memory Ordering in P6 and
   More Recent Processor Families"): stores are not
   reordered with other stores, and loads are not reordered with other loads. So a receiver
   that sees the new head also sees the header and payload written before it, with no fence
   on either side. The same argument covers the membership seqlock (layout.py) and the
   "publish the directory entry, then the entry count" order of arena allocation.

3. **The one case TSO does not cover: store then load (Dekker).** "Notify only when the
   receiver is waiting" is the classic store-buffer litmus test: the receiver stores
   ``waiting`` then loads ``head``; the sender stores ``head`` then loads ``waiting``. x86 may
   let each load pass the same CPU's earlier store (the store sits in the store buffer), so
   both could read the old value: the receiver blocks on an empty ring and the sender skips
   the doorbell - a lost wake-up. Both sides therefore execute :func:`full_fence` between
   their store and their load. x86 orders every load and store against a ``LOCK``-prefixed
   instruction (same SDM section: "Reads or writes cannot be reordered with I/O instructions, locked
   instructions, or serializing instructions"), and acquiring plus releasing an uncontended
   ``threading.Lock`` executes such instructions: CPython's lock is a POSIX semaphore
   (``sem_trywait``/``sem_post``, an atomic compare-and-exchange and an atomic add in glibc)
   up to 3.12, and a ``PyMutex`` (an atomic compare-and-exchange on acquire and on release)
   from 3.13; a mutex cannot be built on x86 without an atomic read-modify-write, and every
   such instruction on x86 is locked (``xchg`` implicitly). The cost is about 80 ns,
   paid once per published batch, not per byte - and not at all when the other end
   advertises that it never sleeps on a doorbell (a plain region, or an infinite spin):
   then nobody needs waking, and the wait word is never consulted (ring.py, flush).

4. **Other machines.** On ARM64 or POWER, loads and stores are reordered freely; the payload
   could become visible after the index, and Python offers no release/acquire store. Rather
   than run silently wrong, :func:`check_platform` raises :class:`UnsupportedPlatformError`.
   Porting means swapping the index accesses for a library with real acquire/release atomics
   (e.g. the ``atomics`` package) - a deliberate change, not a default.

5. **Mappings.** The argument assumes ordinary write-back memory (a host mmap of the shm fd,
   or BAR2 mapped uncached through sysfs ``resource2`` or VFIO in a guest - uncached memory is
   even more strongly ordered). A write-combining mapping (sysfs ``resource2_wc``) is weakly
   ordered: stores may be combined and reach memory out of order. Do not run channels over
   one.

6. **The C core** (``_ringcore.c``, optional) makes the same accesses with explicit
   annotations instead of relying on call boundaries: shared words are read with relaxed
   atomic loads into locals (so the compiler cannot fetch a checked value twice), the head
   and tail are published with release stores and the head is read with an acquire load, and
   the StoreLoad fence of point 3 is ``__atomic_thread_fence(__ATOMIC_SEQ_CST)``. On x86-64
   all of these but the fence compile to the plain moves the Python path makes.

7. **Reusing space: the room check and the early wrap** (ring.py, the hot window). A sender
   overwrites bytes only below ``tail + capacity`` for a tail it has loaded from the
   receiver's line. The receiver stores its tail only after it has copied out (or released
   the views of) every record below it; its loads of those payloads come before that store
   in program order, and TSO does not let a store pass earlier loads. So once the sender sees
   the tail, the receiver no longer reads below it, and the sender's later stores there cannot
   show through in a copy. A WRAP marker written *early* (before the end of the data, past the
   hot window) changes nothing in this: the record after it goes to the start of the next
   lap, and the sender places it there only when the same check holds for it (the tail it
   loaded is at least ``need`` bytes into the current lap, i.e. ``head + skip + need - tail
   <= capacity``; the further condition that the receiver keeps up is a matter of speed,
   not of safety). The receiver learns of the early wrap exactly as of any other: from the
   marker, which is stored before the head that covers it (point 2), and which it validates
   like every header (not at 0, followed by a record, within what the head allows). No new
   shared word, and no new store-then-load pair, so no new fence.

In a guest under QEMU's software emulation (TCG) on an x86-64 host the argument carries
over: TCG emits a host load/store per guest access and emulates guest locked instructions
with host atomics, so the guest observes TSO too.
"""

from __future__ import annotations

import platform
import threading

from .errors import UnsupportedPlatformError

__all__ = ["check_platform", "full_fence", "machine_is_supported"]

_SUPPORTED = frozenset({"x86_64", "amd64", "x64"})


def machine_is_supported(machine: str | None = None) -> bool:
    """True when ``machine`` (default: this one) has the x86-64 memory model."""
    name = platform.machine() if machine is None else machine
    return name.lower() in _SUPPORTED


def check_platform(machine: str | None = None) -> None:
    """Raise :class:`UnsupportedPlatformError` unless this is an x86-64 machine."""
    if not machine_is_supported(machine):
        name = platform.machine() if machine is None else machine
        raise UnsupportedPlatformError(
            f"ivshmem channels rely on x86-64 store ordering (TSO) and this machine is "
            f"{name!r}: on weaker memory models the payload could become visible after the "
            "index. Use an x86-64 host or guest (see ivshmem/channel/_ordering.py)."
        )


_fence_lock = threading.Lock()
_acquire = _fence_lock.acquire
_release = _fence_lock.release


def full_fence() -> None:
    """A full memory barrier (StoreLoad included): see point 3 of the module docstring.

    Hot paths inline the two calls (``_acquire(); _release()``) to save a Python call.
    """
    _acquire()
    _release()

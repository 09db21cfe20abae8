"""The server's side of the region: keeping it at its size, and writing into it safely.

Every admitted peer holds the region's fd, and with it ``ftruncate``. A region that shrinks
under a mapping makes every access to the lost pages a SIGBUS, which kills the process: the
server while it writes the membership table, every QEMU, every host peer. Two defences:

* **Sealing.** A memfd region (``--memfd``) is sealed against shrinking and growing as soon as
  it has its size (:func:`ivshmem.memory.seal_size`): a peer's truncate fails with EPERM and
  nobody can fault. This is the only complete defence, and the reason to prefer ``--memfd``.
* **Guarding.** Named and directory backings (``-M``, ``--file``, ``-m``) cannot be sealed.
  For them :class:`RegionGuard` notices a region whose size changed, logs it as an error and
  restores the size, and :class:`RegionMembership` writes the membership table with
  ``pwrite`` on the fd, never through a mapping, so the server itself can never fault: a
  ``pwrite`` past the end of a truncated file just extends it (hugetlbfs has no ``write()``:
  there the kernel writes for it through ``/proc/self/mem``, and a lost page fails the write
  with EIO). What the server keeps in the region lives in a private shadow copy; after a
  resize it compares the region with it and writes back whatever differs.

**When the guard looks.** ``fstat`` on every join (before the newcomer is sent the fd, so it
maps a region of the right size) and every :data:`CHECK_INTERVAL` seconds. Not on a leave: it
sends no fd, and its write into the membership table is a ``pwrite`` (or a store into a sealed
region), which cannot fault however small the region is.
An inotify watch would see a truncate sooner, but it cannot close the window either: a VM
or host peer that touches a lost page faults at that instant, before any notification could
be handled. So the check only bounds how long the region stays short (and so how many
accesses can fault), at the cost of one ``fstat`` (about a microsecond) per tick; sealing is
the fix, the guard is damage control.

**Store atomicity.** Readers of the membership table rely on aligned 8-byte stores (the
seqlock word, and each slot's "joined" word, which channels read without the seqlock; see
:mod:`ivshmem.channel.layout`). On a sealed region the table is written through a mapping,
one 8-byte store per word, exactly as :class:`~ivshmem.channel.MembershipWriter` does. On an
unsealed one each changed word is one 8-byte ``pwrite``, in the writer's order (seqlock word
odd, the arena header of a newcomer, the slot, the seqlock word even); the kernel copies it
with one 8-byte move on most CPUs, but on CPUs with fast short ``rep movsb`` it may land in
smaller pieces. The seqlock copes with that (a torn sequence word never matches on both
reads around a copy that overlapped a write). A channel's guard word read torn while a slot
changes hands is not equal to the old owner's value, so it reads as "left" -- except in the
coincidence already documented at :func:`ivshmem.channel.layout.membership_guard`, which a
torn read makes no likelier than a well-timed leave and join.

**Eventfds.** Peers hold the doorbell eventfds too; :func:`ring_eventfd` is how the server
rings one without ever blocking, whatever a peer did to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import select
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import IvshmemError, ServerConfigError
from ..memory import Mapping, SharedMemory, filesystem_type, format_size, is_size_sealed

if TYPE_CHECKING:
    from ..channel import MembershipWriter, Region

__all__ = ["CHECK_INTERVAL", "RegionGuard", "RegionMembership", "ring_eventfd"]

log = logging.getLogger("ivshmem.server")

#: Seconds between two size checks of an unsealed region (besides the one on every join).
CHECK_INTERVAL = 0.2
#: Seconds between two ERROR lines about a resized region.
_REPORT_INTERVAL = 60.0

_WORD = struct.Struct("<Q")
#: The arena header (owner, epoch, allocation counters, directory seqlock) is the first 64
#: bytes of an arena (``layout._A_ENTRIES``); the membership writer resets it before it
#: publishes a slot, and of it only owner and epoch (the first 16 bytes) are the writer's
#: once the slot is published.
_ARENA_HEADER = 64
_ARENA_OWNED = 16
#: The layout's page (``ivshmem.channel.layout.PAGE``; that module is imported lazily).
PAGE_SIZE = 4096


class RegionGuard:
    """Keeps an unsealed region at the size the server serves; a no-op on a sealed one."""

    def __init__(self, shm: SharedMemory) -> None:
        self._shm = shm
        self.size = shm.size
        #: Nobody can change the size: nothing to check, and a mapping can never fault.
        self.sealed = shm.sealed or is_size_sealed(shm.fd)
        #: How many times the size was found changed and restored.
        self.restores = 0
        self._fstat_failed = False
        self._last_report: float | None = None
        self._reported = 0

    def check(self) -> int | None:
        """Restore the size if someone changed it. Returns None if it was intact, else the
        size it was found at (the bytes from there on were lost and read as zeros now)."""
        if self.sealed or self._shm.closed:
            return None
        fd = self._shm.fd
        try:
            found = os.fstat(fd).st_size
        except OSError as err:
            if not self._fstat_failed:
                self._fstat_failed = True
                log.error("cannot check the size of the shared memory: %s", err.strerror)
            return None
        if found == self.size:
            return None
        self.restores += 1
        # One ERROR line a minute at most: a peer truncating in a loop must not flood the log
        # (every restore is counted in the status, and the next line says how many there were).
        now = time.monotonic()
        loud = self._last_report is None or now - self._last_report >= _REPORT_INTERVAL
        level = logging.ERROR if loud else logging.DEBUG
        since = self.restores - self._reported
        if loud:
            self._last_report, self._reported = now, self.restores
        more = f" ({since - 1} more time(s) since the last report)" if loud and since > 1 else ""
        if found < self.size:
            effect = (
                ", its content from there on is lost (zeros now); a VM or host peer that "
                "touched the lost pages meanwhile died of SIGBUS"
            )
        else:
            effect = " (a peer that mapped the grown part meanwhile faults there now)"
        try:
            os.ftruncate(fd, self.size)
        except OSError as err:
            log.log(
                level,
                "the shared memory was resized from %s to %s by a peer (any peer holding the "
                "fd can do this to a %s backing; --memfd seals it), and restoring its size "
                "failed: %s; peers that touch pages past the end die of SIGBUS%s",
                format_size(self.size),
                format_size(found),
                self._shm.kind,
                err.strerror,
                more,
            )
            return found
        log.log(
            level,
            "the shared memory was resized from %s to %s by a peer (any peer holding the fd "
            "can do this to a %s backing; --memfd seals it against that): size restored%s%s",
            format_size(self.size),
            format_size(found),
            self._shm.kind,
            effect,
            more,
        )
        return min(found, self.size)


class RegionWriteError(IvshmemError):
    """The server could not write the membership table into the region."""


class RegionMembership:
    """The server's membership table, written so that the server never faults.

    :class:`~ivshmem.channel.MembershipWriter` (the layout's one writer logic) runs on a
    private shadow of the region -- a memfd of the same size that only the server holds,
    of which only the header page, the membership table and the arena headers are ever
    touched -- and every change is then copied into the region, word by word in the writer's
    order: through a mapping on a sealed region, with ``pwrite`` otherwise. The server reads
    the region only at start and, after a resize, to compare it with the shadow: a peer that
    scribbles over the table cannot steer it.
    Same interface as the writer (``joined``, ``left``, ``peers``, ``generation``).
    """

    def __init__(self, guard: RegionGuard, shm: SharedMemory, mode: str | None = None) -> None:
        self._guard = guard
        self._fd = _own_description(shm.fd)
        self._own_fd = self._fd != shm.fd
        size = shm.size
        # A memfd nobody else holds: pages exist only where written (a few), and unlike a
        # private anonymous mapping it is not charged in full against a strict overcommit
        # limit (vm.overcommit_memory=2), so a 1 TiB region costs what it did before.
        try:
            shadow_fd = os.memfd_create("ivshmem-server-shadow", os.MFD_CLOEXEC)
        except OSError as err:
            raise RegionWriteError(
                f"cannot create the server's copy of the membership table: {err.strerror}"
            ) from err
        try:
            os.ftruncate(shadow_fd, size)
            self._shadow: mmap.mmap | None = mmap.mmap(shadow_fd, size)
        except OSError as err:
            raise RegionWriteError(
                f"cannot map {format_size(size)} for the server's copy of the membership "
                f"table: {err.strerror}"
            ) from err
        finally:
            os.close(shadow_fd)
        self._mem = memoryview(self._shadow)
        #: How the region is written: ``map`` (sealed: plain 8-byte stores into a mapping),
        #: ``pwrite`` (on the fd), or ``procmem`` for a backing that has no write() --
        #: hugetlbfs -- through /proc/self/mem at the address of a mapping: the kernel then
        #: touches the page on the server's behalf, and a page lost to a truncate makes the
        #: write fail (EIO) where a store would have raised SIGBUS.
        self.mode = mode or ("map" if guard.sealed else _unsealed_mode(shm.fd))
        self._map: Mapping | None = None
        self._procmem = -1
        self._base = 0
        if self.mode in ("map", "procmem"):
            self._map = shm.map()
        if self.mode == "procmem":
            assert self._map is not None
            try:
                self._procmem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as err:
                self._map.close()
                raise RegionWriteError(
                    "a hugetlbfs region is written through /proc/self/mem (hugetlbfs has no "
                    f"write(), and a mapping could fault), which cannot be opened: "
                    f"{err.strerror}; mount /proc, or use --memfd"
                ) from err
            anchor = ctypes.c_char.from_buffer(self._map.memory)
            self._base = ctypes.addressof(anchor)
            del anchor  # the address stays valid as long as the mapping does
        self._writer: MembershipWriter | None = None
        self._region: Region | None = None
        #: A write into the region failed half-way: the next check writes the table again
        #: (and the whole header of each arena in ``_unpushed``, handed out meanwhile).
        self._stale = False
        self._unpushed: set[int] = set()
        self._failing = False  # logged once per episode of failed writes

    @classmethod
    def open(
        cls,
        guard: RegionGuard,
        shm: SharedMemory,
        *,
        max_peers: int,
        reformat: bool,
        mode: str | None = None,
    ) -> RegionMembership:
        """Take the membership writer's role, formatting the region first with ``reformat``
        or unless it already carries the layout (kept across a restart). ``mode`` forces a
        way of writing (see ``mode``; for tests)."""
        from ..channel import MembershipWriter, Region, is_formatted

        self = cls(guard, shm, mode)
        try:
            self._load(0, PAGE_SIZE)
            if reformat:
                self._format(max_peers)
                log.warning(
                    "reformatted the region for %d peers (--reformat): every channel it held "
                    "is gone",
                    max_peers,
                )
            elif is_formatted(self._mem):
                try:
                    region = Region(self._mem)
                except IvshmemError as err:  # another version, resized, or corrupted
                    raise ServerConfigError(
                        f"the region's channel layout cannot be used ({err}): add --reformat "
                        "to lay it out afresh (this erases every channel in it)"
                    ) from None
                header = region._header
                self._load(header.membership_offset, header.membership_size)
                for slot in range(region.max_peers):
                    self._load(region.arena_offset(slot), _ARENA_HEADER)
                log.info(
                    "the region is already formatted (for %d peers): keeping its layout and "
                    "content",
                    region.max_peers,
                )
                if region.max_peers != max_peers:
                    log.warning(
                        "--max-peers %d is not applied: the region keeps its layout for %d "
                        "peers (--reformat lays it out afresh, erasing its channels)",
                        max_peers,
                        region.max_peers,
                    )
            else:
                self._format(max_peers)
                log.info("formatted the region for %d peers", max_peers)
            self._region = Region(self._mem)
            page = bytes(self._mem[0:PAGE_SIZE])
            self._writer = MembershipWriter(self._region)
            self._push_header(page)
            self._push_table(None)
        except OSError as err:  # e.g. a full /dev/shm (ENOSPC)
            self.close()
            raise RegionWriteError(
                f"cannot write the channel layout into the region: {err.strerror}"
            ) from err
        except BaseException:
            self.close()
            raise
        return self

    # -- the writer's interface ---------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._w.generation

    @property
    def peers(self) -> frozenset[int]:
        return self._w.peers

    @property
    def _w(self) -> MembershipWriter:
        if self._writer is None:
            raise RegionWriteError("the membership table is closed")
        return self._writer

    def joined(self, peer: int, vectors: int) -> int:
        """List ``peer``; RegionFullError (from the writer) when every slot is taken."""
        before = self._table_bytes(), bytes(self._mem[0:PAGE_SIZE])
        slot = self._w.joined(peer, vectors)
        arena = self._r.arena_offset(slot)
        header = bytes(self._mem[arena : arena + _ARENA_HEADER])
        if not self._push_changes(before, [(arena, header)]):
            self._unpushed.add(arena)
        return slot

    def left(self, peer: int) -> bool:
        """Unlist ``peer``; never raises for a failed write (it is logged, and retried)."""
        before = self._table_bytes(), bytes(self._mem[0:PAGE_SIZE])
        done = self._w.left(peer)
        if done:
            self._push_changes(before, [])
        return done

    def close(self) -> None:
        self._writer = None
        self._region = None
        own, self._own_fd = self._own_fd, False
        if own:
            os.close(self._fd)
        procmem, self._procmem = self._procmem, -1
        if procmem >= 0:
            os.close(procmem)
        if self._map is not None:
            self._map.close()
            self._map = None
        mem, self._mem = self._mem, memoryview(b"")
        shadow, self._shadow = self._shadow, None
        # Views made from the shadow (a Region's, an exception's frames) may still be alive:
        # then the shadow mapping goes when they do.
        with contextlib.suppress(BufferError):
            mem.release()
            if shadow is not None:
                shadow.close()

    # -- after a truncation -------------------------------------------------------------

    def repair(self, resized: bool) -> bool:
        """After the size was restored (``resized``), or after a write failed half-way:
        write back whatever the server keeps in the region and finds changed there. True
        if anything was written.

        Found by content, not from the size the guard saw: between two checks a truncate
        may be followed by the server's own pwrite, which extends the file again, so the
        size seen says little about what was lost. The header page and the membership
        table are the server's alone; of an arena header, owner and epoch are. An arena
        header found all zeros was lost with its page: its owner's counters are reset too
        (its directory and channels are zeros as well now)."""
        if self._writer is None:
            return False
        stale, self._stale = self._stale, False
        if not resized and not stale:
            return False
        region = self._r
        wrote = False
        try:
            if os.pread(self._fd, PAGE_SIZE, 0) != bytes(self._mem[0:PAGE_SIZE]):
                # Unpublished (magic zero) until the rest is back, as format_region does.
                self._store(0, bytes(8))
                self._store(8, bytes(self._mem[8:PAGE_SIZE]))
                self._store(0, bytes(self._mem[0:8]))
                wrote = True
            arenas = []
            for slot in range(region.max_peers):
                base = region.arena_offset(slot)
                found = os.pread(self._fd, _ARENA_HEADER, base)
                owned = bytes(self._mem[base : base + _ARENA_OWNED])
                if base in self._unpushed:  # handed out while writes failed: all of it
                    arenas.append((base, bytes(self._mem[base : base + _ARENA_HEADER])))
                elif found[:_ARENA_OWNED] == owned:
                    continue
                elif any(found):
                    arenas.append((base, owned))  # overwritten: the writer's words back
                else:
                    arenas.append((base, owned + bytes(_ARENA_HEADER - _ARENA_OWNED)))
            off, length = self._extent()
            if stale or arenas or os.pread(self._fd, length, off) != self._table_bytes():
                self._push_table(None, arenas)
                wrote = True
        except OSError as err:
            self._write_failed(err)
            return wrote
        self._unpushed.clear()
        if self._failing:
            self._failing = False
            log.info("the membership table is written into the region again")
        return wrote

    def _write_failed(self, err: OSError) -> None:
        self._stale = True
        log.log(
            logging.DEBUG if self._failing else logging.ERROR,
            "cannot write the membership table into the region (%s): peers may find it out "
            "of date until it is written again, which is tried at every check (logged once "
            "until it works)",
            err.strerror,
        )
        self._failing = True

    # -- writing ------------------------------------------------------------------------

    @property
    def _r(self) -> Region:
        if self._region is None:
            raise RegionWriteError("the membership table is closed")
        return self._region

    def _extent(self) -> tuple[int, int]:
        header = self._r._header
        return header.membership_offset, header.membership_size

    def _table_bytes(self) -> bytes:
        off, length = self._extent()
        return bytes(self._mem[off : off + length])

    def _push_changes(self, before: tuple[bytes, bytes], first: list[tuple[int, bytes]]) -> bool:
        """Push one writer operation: the table (and ``first``, see :meth:`_push_table`),
        after any word of the header page the writer changed. Today's writer changes none
        there; the check keeps a future one (a restart epoch, say) from being written into
        the shadow only. False if a write failed (then retried by :meth:`repair`)."""
        table, page = before
        if self._stale:
            return False  # the next repair writes everything, in order
        try:
            self._push_header(page)
            self._push_table(table, first)
        except OSError as err:
            self._write_failed(err)
            return False
        return True

    def _push_table(self, before: bytes | None, first: Sequence[tuple[int, bytes]] = ()) -> None:
        """Copy the shadow's table into the region: the seqlock word odd, ``first`` (arena
        headers, which must be in place before a slot names them), every changed word in
        ascending order (all of them when ``before`` is None), the seqlock word even."""
        off, length = self._extent()
        new = bytes(self._mem[off : off + length])
        (seq,) = _WORD.unpack_from(new, 0)
        # The writer's own odd value is seq - 1 (it counts in twos); any odd value will do.
        self._store_word(off, seq - 1 if seq and not seq & 1 else seq | 1)
        for where, data in first:
            self._store(where, data)
        changed = range(1, length // 8) if before is None else _changed_words(before, new)
        for word in changed:
            self._store_word(off + 8 * word, _WORD.unpack_from(new, 8 * word)[0])
        self._store_word(off, seq)

    def _push_header(self, before: bytes) -> None:
        after = bytes(self._mem[0:PAGE_SIZE])
        if after != before:
            for word in _changed_words(before, after, first=0):
                self._store_word(8 * word, _WORD.unpack_from(after, 8 * word)[0])

    def _store_word(self, offset: int, value: int) -> None:
        if self.mode == "map":
            assert self._map is not None
            # One aligned 8-byte store, as the writer itself would do.
            self._map.memory[offset : offset + 8].cast("Q")[0] = value
            return
        self._store(offset, _WORD.pack(value))

    def _store(self, offset: int, data: bytes) -> None:
        if self.mode == "map":
            assert self._map is not None
            self._map.memory[offset : offset + len(data)] = data
            return
        fd, where = self._fd, offset
        if self._procmem >= 0:
            fd, where = self._procmem, self._base + offset
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, where)
            if written <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            view = view[written:]
            where += written

    def _load(self, offset: int, length: int) -> None:
        """Copy region bytes into the shadow (at start only). A short read (a region that
        is shorter than it should be) leaves zeros, which is what the region holds."""
        data = os.pread(self._fd, length, offset)
        self._mem[offset : offset + len(data)] = data

    def _format(self, max_peers: int) -> None:
        from ..channel import format_region

        region = format_region(self._mem, max_peers=max_peers)
        # format_region's order: unpublish, everything else, publish.
        self._store(0, bytes(8))
        for off, length in region.allocations.values():
            self._zero(off, length)
        for slot in range(region.max_peers):
            base = region.arena_offset(slot)
            self._store(base, bytes(self._mem[base : base + PAGE_SIZE]))
        header = region._header
        m_off, m_size = header.membership_offset, header.membership_size
        self._store(m_off, bytes(self._mem[m_off : m_off + m_size]))
        self._store(8, bytes(self._mem[8:PAGE_SIZE]))
        self._store(0, bytes(self._mem[0:8]))

    def _zero(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self._store(offset, chunk[:n])
            offset += n


def _own_description(fd: int) -> int:
    """A new open file description of the file open as ``fd``, which only the server holds.

    The fd sent to peers shares its description -- and with it the status flags -- with
    every peer: one that sets O_APPEND there (``fcntl(F_SETFL)``, allowed to any holder)
    turns each of the server's ``pwrite`` calls into an append at the end of the region, so
    the table would never be written where readers look. Reopening through /proc/self/fd
    gives the server flags nobody else can touch. Without /proc, the shared fd is used."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        log.debug("cannot reopen the region through /proc/self/fd (%s)", err.strerror)
        return fd


#: HUGETLBFS_MAGIC (include/uapi/linux/magic.h): its files have no write().
_HUGETLBFS = 0x958458F6


def _unsealed_mode(fd: int) -> str:
    """``procmem`` on hugetlbfs (no write()), ``pwrite`` elsewhere. Told by the filesystem
    rather than by a trial write: peers of an earlier server may be writing the region."""
    try:
        return "procmem" if filesystem_type(fd) == _HUGETLBFS else "pwrite"
    except OSError:
        return "pwrite"


def _changed_words(old: bytes, new: bytes, first: int = 1) -> list[int]:
    """Indexes (from ``first``; word 0 of the table is the seqlock word) of the 8-byte words
    that differ, in ascending order. One XOR of the two as integers, then a walk over its
    set bits: a join or leave changes two words of a table of up to 2,000, and this stays a
    few microseconds where a word-by-word comparison in Python took a quarter of a
    millisecond."""
    diff = (int.from_bytes(old, "little") ^ int.from_bytes(new, "little")) >> (64 * first)
    words = []
    index = first
    while diff:
        skip = ((diff & -diff).bit_length() - 1) // 64
        index += skip
        words.append(index)
        diff >>= 64 * (skip + 1)
        index += 1
    return words


# -- the eventfds a peer holds ----------------------------------------------------------------


def ring_eventfd(fd: int) -> bool:
    """Add 1 to eventfd ``fd`` without ever blocking; False if it was not rung (its counter
    is saturated: a ring is pending anyway).

    The server creates every eventfd non-blocking, but O_NONBLOCK is a flag of the open file
    description, which the peer it was sent to shares: a peer can clear it on its own
    eventfd and saturate the counter (write 2**64 - 2), and a plain write of 1 would then block
    the whole server until someone reads the counter -- which that peer never does. So the
    server writes only when poll() says a write would not block (the counter is below its
    maximum) and still takes EAGAIN as "pending". A peer that saturates its counter in the
    microsecond between the poll and the write, having cleared the flag, would still win;
    it cannot observe when that microsecond is, and every ring is a new blind try."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        return False
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return False
    return True

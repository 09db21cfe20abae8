"""The region layout: a self-describing header, the membership table and per-peer arenas.

A formatted region looks like this (every offset page-aligned, every control word 8-byte
aligned; all integers little-endian)::

    offset 0          header page: magic, layout version, sizes, directory of allocations
    PAGE              membership table: seqlock word, writer kind, one 16-byte slot per peer
    ...               user allocations named at format time (format_region(allocations=...))
    arenas_offset     max_peers arenas of arena_size bytes; arena k belongs to the peer in
                      membership slot k and holds the channels that peer receives on

**Who writes what.** Python has no atomic read-modify-write on shared memory, so the layout is
built so that every field has exactly one writer at any time, and a mutual-exclusion protocol is
never needed:

* Header page, directory, user-allocation bounds: only :func:`format_region`, which is an
  explicit act done while nobody uses the region. It clears the magic first and writes it
  last, so a concurrent reader sees either "not formatted" or a complete header (stores are
  ordered on x86-64: see ``_ordering.py``).
* Membership table: only the *membership writer* (:class:`MembershipWriter`): the ivshmem
  server for a live table, or :func:`format_region` for a static one on a plain region. Readers
  use the seqlock described at :class:`Membership`.
* Arena k's header (owner, epoch) and the reset of its allocation counters: the membership
  writer, only while slot k is free, before it publishes slot k (so a peer that sees itself in
  the table finds a clean arena).
* Arena k's allocation counters and channel directory: only the peer that owns slot k, and
  only after it has seen itself in the table. Allocation inside a process is serialised by a
  process-wide lock (several threads may open channels), and only one process has a given
  peer id.

**Restarts.** A restarted server takes the table over with a new writer: it clears every slot
(the peers it lists are the ones connected to *it*), writes a new ``run`` word, and continues
the generation count, so that the "joined" word of every slot changes and never takes a value
it had before (a fresh format starts the count at a random value, so a ``--reformat`` does not
repeat old values either). Arenas are then handed out again as peers join. Every channel end
is bound to the "joined" word of its receiver's slot as it was when the end was opened (its
*guard*, :func:`membership_guard`): it checks it before every write and, a receiver, after
copying every message out and before handing it over. Once the word changed, the end raises
:class:`ChannelLostError` (:class:`PeerGoneError` when the receiver simply left) and never
touches the channel again. So channels do not survive a restart (host peers come back with new
ids, guests cannot come back at all), but no end opened before it can read a byte of the
channels laid out after it.

Why per-peer arenas rather than one pool with an allocation lock: a shared bump pointer needs
compare-and-swap (a dependency such as ``atomics``, whose wheels stop at Python 3.11), and a
lock held by a peer that dies stays held. And QEMU's server gives a reconnecting VM a new id,
so channels keyed by ids would leak a global pool slot by slot; an arena is recycled whole when
its owner leaves and the slot is given to someone else.

**Trust.** Every value read from the region is read once into a private variable (the header,
arena directory and membership table are copied out with one ``bytes()`` each and parsed from
the copy) and validated before use; failures raise :class:`NotFormattedError` (no or foreign
header) or :class:`RegionCorrupted` (naming the field).
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._args import int_arg, peer_arg, seconds_arg, show
from ..endpoint import Endpoint
from ..errors import PeersUnknownError, UsageError
from ._ordering import check_platform
from .errors import ChannelError, NotFormattedError, RegionCorrupted, RegionFullError

__all__ = [
    "LAYOUT_VERSION",
    "MAGIC",
    "PAGE",
    "ChannelEntry",
    "Membership",
    "MembershipSnapshot",
    "MembershipWriter",
    "PeerEntry",
    "Region",
    "format_region",
    "is_formatted",
]

PAGE = 4096
MAGIC = b"IVSHREGN"
#: 2: the membership table records which writer keeps it (``run``), generations start at a
#: random value, and every channel end checks its membership slot before it delivers a message
#: (so that an end opened before a server restart never reads the arena's next user).
LAYOUT_VERSION = 2

#: Most peers a region can be formatted for (the membership table and arenas scale with it).
MAX_PEERS_LIMIT = 1024
#: Highest vector count a membership slot may claim (QEMU caps devices at 64; leave room).
MAX_VECTORS = 1024
MAX_PEER_ID = 0xFFFF
EMPTY = 0xFFFFFFFF  # a free membership slot's peer field
NO_OWNER = 0xFFFFFFFFFFFFFFFF  # a free arena's owner field

# Header (offset 0): magic, version, header_size, region_size, format_id, max_peers,
# directory count, membership offset and size, arenas offset, arena size, flags.
_HEADER = struct.Struct("<8sIIQQIIQQQQQ")
_DIR_OFFSET = 128
_DIR_ENTRY = struct.Struct("<40sQQII")  # name, offset, size, kind, reserved: 64 bytes
_DIR_ENTRY_SIZE = 64
MAX_ALLOCATIONS = (PAGE - _DIR_OFFSET) // _DIR_ENTRY_SIZE  # 62
_KIND_MEMBERSHIP, _KIND_ARENAS, _KIND_USER = 1, 2, 3
_NAME_MAX = 40

# Membership table: word 0 seqlock, word 1 writer kind, word 2 max_peers, word 3 the writer's
# run (a random non-zero number each writer picks when it takes the table: a restarted server
# writes a new one); slots from byte 64.
_M_SEQ, _M_KIND, _M_MAXPEERS, _M_RUN = 0, 1, 2, 3
_M_SLOTS = 64
_SLOT = struct.Struct("<IIQ")  # peer id (EMPTY if free), vectors, generation at join
_SLOT_SIZE = 16

#: Kinds of membership writer recorded in the table.
WRITER_NONE, WRITER_STATIC, WRITER_SERVER = 0, 1, 2
_WRITER_NAMES = {WRITER_NONE: "none", WRITER_STATIC: "static", WRITER_SERVER: "server"}

# Arena header (first page of every arena): owner, epoch, entry count, bytes used, directory
# seqlock; then the channel directory from byte 64: 63 entries of 64 bytes. Channel areas
# start at PAGE.
_A_OWNER, _A_EPOCH, _A_COUNT, _A_USED, _A_SEQ = 0, 1, 2, 3, 4
_A_ENTRIES = 64
_ARENA_ENTRY = struct.Struct("<32sIIQQQ")  # name, sender, receiver, offset, size, state
_ARENA_ENTRY_SIZE = 64
_ENTRY_STATE = 56  # byte offset of the state word inside an entry
MAX_CHANNELS_PER_ARENA = (PAGE - _A_ENTRIES) // _ARENA_ENTRY_SIZE  # 63
CHANNEL_NAME_MAX = 32
#: Smallest channel area (ring.CTRL_SIZE + ring.MIN_CAPACITY).
MIN_AREA = 512
_STATE_LIVE = 1
#: An entry whose channel was reclaimed: readers skip it, its owner may reuse it in place.
_STATE_FREE = 2


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


# The argument rule of the whole public API lives in ivshmem._args (one module, so that the
# channel layer and the peer/endpoint layer refuse the same values with the same words).
_show = show
_int_arg = int_arg
_seconds_arg = seconds_arg


def _as_memory(target: Endpoint | memoryview | bytearray | Any) -> memoryview:
    """The writable byte view of a region given as an endpoint, a Region or any writable
    buffer; UsageError for anything else."""
    if isinstance(target, Region):
        return target.memory
    if isinstance(target, Endpoint):
        mem = target.memory
    else:
        try:
            mem = memoryview(target)
        except TypeError:
            hint = ""
            if isinstance(target, (str, os.PathLike)):
                hint = (
                    ": for a file or shared-memory name, open it with "
                    "ivshmem.open_region(path, id=..., size=...) and pass the endpoint"
                )
            raise UsageError(
                "the region must be an ivshmem Endpoint, a Region or a writable buffer "
                f"(bytearray, mmap, memoryview), not {type(target).__name__} "
                f"({_show(target)}){hint}"
            ) from None
        except ValueError as err:  # a released memoryview
            raise UsageError(f"the region's buffer cannot be used: {err}") from None
    if mem.readonly:
        raise UsageError("the region must be writable")
    if not mem.c_contiguous:
        raise UsageError("the region's buffer must be contiguous (not a strided view)")
    if mem.format != "B" or mem.ndim != 1:
        mem = mem.cast("B")
    return mem


def _encode_name(name: object, limit: int, what: str) -> bytes:
    if not isinstance(name, str):
        raise UsageError(f"{what} names must be str, not {type(name).__name__} ({_show(name)})")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raw = b""
    if not raw or len(raw) > limit or b"\0" in raw:
        raise UsageError(
            f"{what} name {name!r} must be 1..{limit} bytes of UTF-8 without NUL characters"
        )
    return raw


def _decode_name(raw: bytes, where: str, field: str) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RegionCorrupted(where, field, "name is not UTF-8") from err


# -- the header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    region_size: int
    format_id: int
    max_peers: int
    membership_offset: int
    membership_size: int
    arenas_offset: int
    arena_size: int
    allocations: Mapping[str, tuple[int, int]]


def is_formatted(target: Endpoint | memoryview | Any) -> bool:
    """True when the region starts with this layout's magic (it may still be corrupt)."""
    mem = _as_memory(target)
    return len(mem) >= PAGE and bytes(mem[0:8]) == MAGIC


def peek_header(page: bytes) -> tuple[int, int, int] | None:
    """``(layout version, region size, max peers)`` as written in a region's first page, or
    None when it carries no layout header (unchecked: for a server deciding, before it
    resizes a region, whether the layout in it would still fit)."""
    if len(page) < _HEADER.size or page[:8] != MAGIC:
        return None
    fields = _HEADER.unpack_from(page, 0)
    return fields[1], fields[3], fields[5]


def _parse_header(mem: memoryview) -> _Header:
    size = len(mem)
    if size < PAGE:
        raise NotFormattedError(f"the region is {size} bytes, too small to hold a layout header")
    page = bytes(mem[0:PAGE])  # read once; everything below parses the private copy
    (magic, version, header_size, region_size, format_id, max_peers, dir_count,
     m_off, m_size, a_off, a_size, _flags) = _HEADER.unpack_from(page, 0)  # fmt: skip
    if magic != MAGIC:
        raise NotFormattedError(
            "the region is not formatted for channels (no layout header at offset 0): format "
            "it with ivshmem.channel.format_region() or start the server with its format option"
        )
    if version != LAYOUT_VERSION:
        raise NotFormattedError(
            f"the region uses layout version {version}, this library understands version "
            f"{LAYOUT_VERSION}: format it again, or use matching library versions everywhere"
        )
    where = "region header"
    if header_size != PAGE:
        raise RegionCorrupted(where, "header_size", f"{header_size}, expected {PAGE}")
    if region_size != size:
        raise NotFormattedError(
            f"the region was formatted for {region_size} bytes but is {size} bytes now "
            "(it was resized): format it again"
        )
    if not 1 <= max_peers <= MAX_PEERS_LIMIT:
        raise RegionCorrupted(where, "max_peers", f"{max_peers} is outside 1..{MAX_PEERS_LIMIT}")
    if not 0 <= dir_count <= MAX_ALLOCATIONS:
        raise RegionCorrupted(where, "dir_count", f"{dir_count} > {MAX_ALLOCATIONS}")

    def check_extent(field: str, off: int, length: int, minimum: int) -> None:
        if off % PAGE or length % PAGE or length < minimum or off < PAGE or off + length > size:
            raise RegionCorrupted(
                where, field, f"extent {off}+{length} is misaligned or outside the region"
            )

    check_extent("membership", m_off, m_size, _membership_bytes(max_peers))
    if a_size < 2 * PAGE:
        raise RegionCorrupted(where, "arena_size", f"{a_size} is below two pages")
    check_extent("arenas", a_off, a_size * max_peers, 2 * PAGE)
    allocations: dict[str, tuple[int, int]] = {}
    extents = [(m_off, m_size), (a_off, a_size * max_peers)]
    for i in range(dir_count):
        raw, off, length, kind, _ = _DIR_ENTRY.unpack_from(page, _DIR_OFFSET + i * 64)
        field = f"directory[{i}]"
        name = _decode_name(raw, where, field)
        if kind == _KIND_USER:
            check_extent(field, off, length, PAGE)
            if not name or name in allocations:
                raise RegionCorrupted(where, field, f"empty or duplicate name {name!r}")
            allocations[name] = (off, length)
            extents.append((off, length))
        elif kind == _KIND_MEMBERSHIP:
            if (off, length) != (m_off, m_size):
                raise RegionCorrupted(where, field, "membership entry disagrees with header")
        elif kind == _KIND_ARENAS:
            if (off, length) != (a_off, a_size * max_peers):
                raise RegionCorrupted(where, field, "arenas entry disagrees with header")
        else:
            raise RegionCorrupted(where, field, f"unknown allocation kind {kind}")
    extents.sort()
    for (o1, l1), (o2, _) in itertools.pairwise(extents):
        if o1 + l1 > o2:
            raise RegionCorrupted(where, "directory", f"allocations at {o1} and {o2} overlap")
    return _Header(size, format_id, max_peers, m_off, m_size, a_off, a_size, allocations)


def _membership_bytes(max_peers: int) -> int:
    return _round_up(_M_SLOTS + _SLOT_SIZE * max_peers, PAGE)


class Region:
    """A formatted region, attached: the parsed, validated header (a private copy).

    ``Region(endpoint_or_buffer)`` raises :class:`NotFormattedError` for an unformatted,
    resized or foreign region, :class:`RegionCorrupted` for an impossible header, and
    :class:`~ivshmem.errors.UsageError` when given neither an endpoint nor a writable buffer.
    """

    def __init__(self, target: Endpoint | memoryview | Any) -> None:
        check_platform()
        self.memory = _as_memory(target)
        self._header = _parse_header(self.memory)

    @property
    def size(self) -> int:
        return self._header.region_size

    @property
    def format_id(self) -> int:
        """Random number chosen at format time: differs after every (re)format."""
        return self._header.format_id

    @property
    def max_peers(self) -> int:
        return self._header.max_peers

    @property
    def arena_size(self) -> int:
        return self._header.arena_size

    @property
    def allocations(self) -> Mapping[str, tuple[int, int]]:
        """User allocations by name: ``{name: (offset, size)}``."""
        return self._header.allocations

    def allocation(self, name: str) -> memoryview:
        """The memory of the user allocation ``name`` made at format time."""
        if not isinstance(name, str):
            raise UsageError(f"allocation names are str, not {type(name).__name__} ({_show(name)})")
        try:
            off, length = self._header.allocations[name]
        except KeyError:
            raise UsageError(
                f"the region has no allocation named {name!r}; it has "
                f"{sorted(self._header.allocations) or 'none'}"
            ) from None
        return self.memory[off : off + length]

    @property
    def membership(self) -> Membership:
        return Membership(self)

    def arena_offset(self, slot: int) -> int:
        """Region offset of the arena of membership slot ``slot``."""
        if type(slot) is not int:  # the common case costs one identity test
            slot = _int_arg(slot, "slot")
        if not 0 <= slot < self._header.max_peers:
            raise UsageError(f"slot {slot} is outside 0..{self._header.max_peers - 1}")
        return self._header.arenas_offset + slot * self._header.arena_size

    def __repr__(self) -> str:
        h = self._header
        return (
            f"<Region {h.region_size} bytes, {h.max_peers} peer slots of "
            f"{h.arena_size} bytes, allocations {sorted(h.allocations)}>"
        )


def _region(target: Region | Endpoint | memoryview | Any) -> Region:
    return target if isinstance(target, Region) else Region(target)


def format_region(
    target: Endpoint | memoryview | Any,
    *,
    max_peers: int = 16,
    peers: Mapping[int, int] | Iterable[int] | None = None,
    allocations: Mapping[str, int] | None = None,
) -> Region:
    """Write a fresh layout over the whole region and return it attached.

    Everything previously in the header, the membership table, the user allocations and the
    arena headers is lost; do it before peers start using channels. ``max_peers`` membership
    slots (each with an arena of ``(size - tables) / max_peers`` bytes) are created.
    ``peers`` makes a *static* membership table for a plain region with no server: the peer
    ids (or ``{id: vectors}``) that will use it. With a server, leave it out: the server keeps
    the table (:class:`MembershipWriter`). ``allocations`` reserves named, zeroed, page-aligned
    blocks (``{name: size}``), found again with :meth:`Region.allocation`.

    Every argument is checked before the first byte is written: a call that raises
    :class:`~ivshmem.errors.UsageError` leaves the region (and any layout in it) untouched.
    """
    check_platform()
    mem = _as_memory(target)
    size = len(mem)
    max_peers = _int_arg(max_peers, "max_peers")
    if not 1 <= max_peers <= MAX_PEERS_LIMIT:
        raise UsageError(f"max_peers {max_peers} must be within 1..{MAX_PEERS_LIMIT}")
    static = _static_peers(peers)
    if len(static) > max_peers:
        raise UsageError(f"{len(static)} static peers do not fit {max_peers} slots")
    user = _user_allocations(allocations)
    m_off = PAGE
    m_size = _membership_bytes(max_peers)
    cursor = m_off + m_size
    placed: list[tuple[bytes, int, int]] = []
    for raw, length in user:
        rounded = _round_up(length, PAGE)
        placed.append((raw, cursor, rounded))
        cursor += rounded
    a_off = cursor
    arena = (size - a_off) // max_peers // PAGE * PAGE if size > a_off else 0
    if arena < 2 * PAGE:
        need = a_off + 2 * PAGE * max_peers
        raise UsageError(
            f"a region of {size} bytes is too small for {max_peers} peer slots and the "
            f"requested allocations: it needs at least {need} bytes (or fewer max_peers)"
        )

    try:  # the layout being replaced, if it is one of ours
        previous: _Header | None = _parse_header(mem)
    except ChannelError:
        previous = None

    # Nothing was written above this line.
    mem[0:8] = bytes(8)  # unpublish first: readers now see "not formatted" until the end
    if previous is not None:
        # Clear the old membership table whole, first: every "joined" word in it is some
        # open end's guard, and one left behind (a bigger table than the new one, its tail
        # now inside an arena) would keep that end believing its memory is still its own.
        old_off, old_size = previous.membership_offset, previous.membership_size
        mem[old_off : old_off + old_size] = bytes(old_size)
    mem[8:PAGE] = bytes(PAGE - 8)
    mem[m_off : m_off + m_size] = bytes(m_size)
    for _, off, length in placed:
        mem[off : off + length] = bytes(length)
    for slot in range(max_peers):
        base = a_off + slot * arena
        mem[base : base + PAGE] = bytes(PAGE)
        struct.pack_into("<Q", mem, base, NO_OWNER)
    entries = [(b"membership", m_off, m_size, _KIND_MEMBERSHIP)]
    entries.append((b"arenas", a_off, arena * max_peers, _KIND_ARENAS))
    entries.extend((raw, off, length, _KIND_USER) for raw, off, length in placed)
    for i, (raw, off, length, kind) in enumerate(entries):
        _DIR_ENTRY.pack_into(mem, _DIR_OFFSET + i * 64, raw, off, length, kind, 0)
    format_id = int.from_bytes(os.urandom(8), "little")
    # Everything but the magic, which is the publishing store: ordered after all the stores
    # above by x86-64 TSO (see _ordering.py).
    _HEADER.pack_into(
        mem, 0, bytes(8), LAYOUT_VERSION, PAGE, size, format_id, max_peers, len(entries),
        m_off, m_size, a_off, arena, 0,
    )  # fmt: skip
    header = _Header(size, format_id, max_peers, m_off, m_size, a_off, arena, {})
    # The generation count starts at a random value: a "joined" word of the previous layout
    # (a channel end's guard) must not come back in this one.
    writer = _TableWriter(mem, header, WRITER_STATIC if static else WRITER_NONE, _fresh_seq())
    for peer, vectors in static.items():
        writer.joined(peer, vectors)
    mem[0:8] = MAGIC
    return Region(mem)


def _fresh_seq() -> int:
    """A random, even starting value for a new membership table's sequence word (far below
    the 2**62 at which a writer takes the word for garbage)."""
    return int.from_bytes(os.urandom(6), "little") << 1


def _static_peers(peers: Mapping[int, int] | Iterable[int] | None) -> dict[int, int]:
    """format_region's ``peers`` checked and normalised to ``{id: vectors}`` of plain ints
    (a repeated id in a list counts once, as it always did)."""
    if peers is None:
        return {}
    shape = "peers must be an iterable of peer ids or a {id: vectors} mapping"
    if isinstance(peers, Mapping):
        pairs: list[tuple[object, object]] = list(peers.items())
    elif isinstance(peers, (str, bytes, bytearray, memoryview)):
        # Iterable, but its items are characters or bytes, never what was meant.
        raise UsageError(f"{shape}, not {type(peers).__name__} ({_show(peers)})")
    else:
        try:
            ids = iter(peers)
        except TypeError:
            raise UsageError(f"{shape}, not {type(peers).__name__} ({_show(peers)})") from None
        pairs = [(peer, 0) for peer in ids]
    table: dict[int, int] = {}
    for peer, vectors in pairs:
        pid = _check_peer(peer)
        count = _int_arg(vectors, f"the vector count of peer {pid}")
        if not 0 <= count <= MAX_VECTORS:
            raise UsageError(f"peer {pid}: vector count {count} is outside 0..{MAX_VECTORS}")
        table[pid] = count
    return table


def _user_allocations(allocations: Mapping[str, int] | None) -> list[tuple[bytes, int]]:
    """format_region's ``allocations`` checked: ``(encoded name, size)`` in the given order."""
    if allocations is None:
        return []
    shape = "allocations must be a {name: size in bytes} mapping"
    if isinstance(allocations, Mapping):
        pairs: list[tuple[object, object]] = list(allocations.items())
    elif isinstance(allocations, (str, bytes, bytearray, memoryview)):
        raise UsageError(f"{shape}, not {type(allocations).__name__} ({_show(allocations)})")
    else:  # (name, size) pairs, which dict() has always accepted here
        try:
            pairs = list(dict(allocations).items())
        except (TypeError, ValueError):
            raise UsageError(
                f"{shape}, not {type(allocations).__name__} ({_show(allocations)})"
            ) from None
    if len(pairs) > MAX_ALLOCATIONS - 2:
        raise UsageError(f"at most {MAX_ALLOCATIONS - 2} named allocations fit the directory")
    placed: list[tuple[bytes, int]] = []
    for name, length in pairs:
        raw = _encode_name(name, _NAME_MAX, "allocation")
        nbytes = _int_arg(length, f"the size of allocation {name!r}")
        if nbytes <= 0:
            raise UsageError(f"allocation {name!r} needs a positive size in bytes, not {nbytes}")
        placed.append((raw, nbytes))
    return placed


def _check_peer(peer: object, what: str = "peer id") -> int:
    """``peer`` as a plain int within 0..MAX_PEER_ID; UsageError otherwise."""
    return peer_arg(peer, what)


# -- membership -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerEntry:
    """One present peer as the membership table lists it."""

    peer: int
    slot: int
    vectors: int
    joined: int  # the generation at which it joined


@dataclass(frozen=True)
class MembershipSnapshot:
    """A consistent copy of the membership table."""

    generation: int
    writer: str  # "none" (nobody keeps the table), "static", or "server"
    entries: Mapping[int, PeerEntry]
    #: The writer's run: a random number that changes when another writer (a restarted
    #: server) takes the table over.
    run: int = 0

    @property
    def peers(self) -> frozenset[int]:
        return frozenset(self.entries)

    @property
    def live(self) -> bool:
        """True when a server keeps the table current, so absence means "left"."""
        return self.writer == "server"


class _TableWriter:
    """The writing half of the membership table, used by MembershipWriter and format_region.

    The writer keeps the table privately and only ever *writes* the shared copy, so a peer
    that scribbles over the table cannot steer the server: its next update overwrites the
    slot it touches, and readers validate whatever they find.
    """

    def __init__(self, mem: memoryview, header: _Header, kind: int, start_seq: int) -> None:
        self._mem = mem
        self._h = header
        self._base = header.membership_offset
        self._words = mem[self._base : self._base + _M_SLOTS].cast("Q")
        self._table = mem[self._base : self._base + header.membership_size].cast("Q")
        self._table_words_base = _M_SLOTS
        self._slots: list[PeerEntry | None] = [None] * header.max_peers
        self._seq = start_seq + (start_seq & 1)
        #: Non-zero, and new for every writer: tells ends that the table was taken over.
        self.run = int.from_bytes(os.urandom(8), "little") | 1
        self._next = 0
        self._lock = threading.Lock()  # the server may call from several threads
        self._words[_M_SEQ] = self._seq + 1
        for slot in range(header.max_peers):
            word = (_M_SLOTS + slot * _SLOT_SIZE) // 8
            self._table[word] = EMPTY
            self._table[word + 1] = 0
        self._words[_M_KIND] = kind
        self._words[_M_MAXPEERS] = header.max_peers
        self._words[_M_RUN] = self.run
        self._seq += 2
        self._words[_M_SEQ] = self._seq

    @property
    def generation(self) -> int:
        return self._seq // 2

    @property
    def peers(self) -> frozenset[int]:
        return frozenset(e.peer for e in self._slots if e is not None)

    def _publish_slot(self, slot: int, entry: PeerEntry | None) -> None:
        # Seqlock write: odd sequence, the slot, even sequence. The three stores reach memory
        # in this order (TSO), which is what Membership.snapshot relies on.
        self._words[_M_SEQ] = self._seq + 1
        # Two single 8-byte stores (peer+vectors, then joined): the joined word alone is also
        # read without the seqlock, as a channel's guard (membership_guard), so it must never
        # be seen half written.
        word = (self._table_words_base + slot * _SLOT_SIZE) // 8
        if entry is None:
            self._table[word] = EMPTY
            self._table[word + 1] = 0
        else:
            self._table[word] = entry.peer | entry.vectors << 32
            self._table[word + 1] = entry.joined
        self._seq += 2
        self._words[_M_SEQ] = self._seq
        self._slots[slot] = entry

    def joined(self, peer: int, vectors: int) -> int:
        # Checked (and made plain ints) before anything is written: a bad value found while
        # publishing would leave the seqlock odd and the table unreadable.
        peer = _check_peer(peer)
        vectors = _int_arg(vectors, "vector count")
        if not 0 <= vectors <= MAX_VECTORS:
            raise UsageError(f"vector count {vectors} is outside 0..{MAX_VECTORS}")
        with self._lock:
            if any(e is not None and e.peer == peer for e in self._slots):
                raise UsageError(f"peer {peer} is already in the membership table")
            n = self._h.max_peers
            # Round-robin from the last slot handed out: a freed slot (and its arena) is
            # reused as late as possible, which gives peers of the old owner time to notice.
            for i in range(n):
                slot = (self._next + i) % n
                if self._slots[slot] is None:
                    break
            else:
                raise RegionFullError(
                    f"the membership table is full ({n} slots): peer {peer} is not listed and "
                    "cannot receive on channels; format the region with more max_peers"
                )
            self._next = (slot + 1) % n
            generation = self._seq // 2 + 1
            # Reset the arena before publishing the slot: nobody owns it now (the slot is
            # free), and the new owner starts writing only after it sees itself listed. The
            # directory seqlock too: a previous owner killed between its odd and even stores
            # would otherwise leave every reader of the arena retrying for ever.
            arena = self._h.arenas_offset + slot * self._h.arena_size
            struct.pack_into("<QQQQQ", self._mem, arena, peer, generation, 0, 0, 0)
            self._publish_slot(slot, PeerEntry(peer, slot, vectors, generation))
            return slot

    def left(self, peer: int) -> bool:
        peer = _check_peer(peer)
        with self._lock:
            for slot, entry in enumerate(self._slots):
                if entry is not None and entry.peer == peer:
                    self._publish_slot(slot, None)
                    return True
            return False


class MembershipWriter:
    """The server's handle on the membership table; the table's only writer.

    Create it once the region is formatted (it clears the table: nobody is connected yet),
    then call :meth:`joined` when a peer connects - before sending it its id, so that the
    peer finds itself listed - and :meth:`left` when it disconnects. Never run two writers
    (two servers) on one region.
    """

    def __init__(self, target: Region | Endpoint | memoryview | Any) -> None:
        region = _region(target)
        words = region.memory[region._header.membership_offset :][:_M_SLOTS].cast("Q")
        # Continue the generation count of a previous writer (a restarted server), so that a
        # reader that cached a generation sees a change and no slot's "joined" word (a channel
        # end's guard) takes a value it had before; an absurd value restarts at random.
        old = words[_M_SEQ]
        start = old if old < 1 << 62 else _fresh_seq()
        self._table = _TableWriter(region.memory, region._header, WRITER_SERVER, start)

    @property
    def generation(self) -> int:
        return self._table.generation

    @property
    def run(self) -> int:
        """The random number this writer wrote into the table when it took it over."""
        return self._table.run

    @property
    def peers(self) -> frozenset[int]:
        return self._table.peers

    def joined(self, peer: int, vectors: int) -> int:
        """List ``peer`` with its vector count; returns its slot. Raises RegionFullError
        when every slot is taken (the peer can still ring doorbells, but has no arena)."""
        return self._table.joined(peer, vectors)

    def left(self, peer: int) -> bool:
        """Remove ``peer``; False if it was not listed."""
        return self._table.left(peer)


class Membership:
    """Reads the membership table with a seqlock, from any process or guest.

    Seqlock argument (x86-64, see ``_ordering.py``): the writer stores an odd sequence, then
    the slot, then the next even sequence; stores reach memory in that order. A reader loads
    the sequence, copies the whole table (loads), and loads the sequence again; loads are not
    reordered with loads. If both sequence loads return the same even value, no write
    overlapped the copy, so the copy is one consistent state. An odd or changed value means
    a write was in progress: retry. Retries are bounded in time, so a peer that keeps the
    word odd on purpose produces :class:`RegionCorrupted`, not a hang.
    """

    def __init__(self, target: Region | Endpoint | memoryview | Any) -> None:
        self.region = _region(target)
        h = self.region._header
        self._max = h.max_peers
        self._table = self.region.memory[
            h.membership_offset : h.membership_offset + h.membership_size
        ]
        self._words = self._table[:_M_SLOTS].cast("Q")
        self._end = _M_SLOTS + _SLOT_SIZE * h.max_peers

    @property
    def generation(self) -> int:
        """Changes whenever a peer joins or leaves (one load; no consistency needed)."""
        return (self._words[_M_SEQ] + 1) // 2

    @property
    def run(self) -> int:
        """The table writer's run (one load): changes when a restarted server takes over."""
        return int(self._words[_M_RUN])

    def snapshot(self, patience: float = 0.5) -> MembershipSnapshot:
        """A consistent copy of the table. A write still in progress after ``patience``
        seconds (a stuck or hostile writer) raises :class:`RegionCorrupted`."""
        if type(patience) is not float or not patience >= 0:  # one test in the common case
            patience = _seconds_arg(patience, "patience")
        deadline = time.monotonic() + patience
        words, table, end = self._words, self._table, self._end
        tries = 0
        while True:
            s1 = words[_M_SEQ]
            if not s1 & 1:
                copy = bytes(table[:end])
                if words[_M_SEQ] == s1:
                    return self._parse(s1, copy)
            tries += 1
            if tries > 64:
                if time.monotonic() > deadline:
                    raise RegionCorrupted(
                        "membership table",
                        "seq",
                        f"never stable for {patience}s: a writer is stuck or the word is "
                        "being scribbled",
                    )
                time.sleep(0.0001)

    def _parse(self, seq: int, copy: bytes) -> MembershipSnapshot:
        where = "membership table"
        kind, max_peers, run = struct.unpack_from("<QQQ", copy, 8)
        if kind not in _WRITER_NAMES:
            raise RegionCorrupted(where, "writer", f"unknown writer kind {kind}")
        if max_peers != self._max:
            raise RegionCorrupted(where, "max_peers", f"{max_peers} != header's {self._max}")
        entries: dict[int, PeerEntry] = {}
        for slot in range(self._max):
            peer, vectors, joined = _SLOT.unpack_from(copy, _M_SLOTS + slot * _SLOT_SIZE)
            if peer == EMPTY:
                continue
            field = f"slot[{slot}]"
            if peer > MAX_PEER_ID or vectors > MAX_VECTORS:
                raise RegionCorrupted(where, field, f"peer {peer} / vectors {vectors}")
            if peer in entries:
                raise RegionCorrupted(where, field, f"peer {peer} is listed twice")
            entries[peer] = PeerEntry(peer, slot, vectors, joined)
        return MembershipSnapshot(seq // 2, _WRITER_NAMES[kind], entries, run)

    def peers(self) -> frozenset[int]:
        """Ids of the peers the table lists now."""
        return self.snapshot().peers


def listed_peers(target: Endpoint | memoryview | Any, me: int, unknown: str) -> frozenset[int]:
    """The other peers a server-kept membership table in ``target`` lists (every id but
    ``me``): the answer of ``peers`` for endpoints that cannot learn it otherwise (a guest's
    device, a plain region). Raises :class:`~ivshmem.errors.PeersUnknownError` with the
    message ``unknown`` when the region carries no layout, and says why when its table is not
    kept by a server (a static table lists who may use a region, not who is there) or cannot
    be read."""
    try:
        if not is_formatted(target):
            raise PeersUnknownError(unknown)
        snapshot = Membership(target).snapshot()
    except ChannelError as err:  # another version, resized, corrupted
        raise PeersUnknownError(f"{unknown} (its membership table cannot be read: {err})") from err
    if not snapshot.live:
        why = (
            "static (format_region(peers=...)): it lists who may use the region, not who is "
            "connected; Membership(endpoint).snapshot().peers reads that list"
            if snapshot.writer == "static"
            else "kept by no server (start the server with --format)"
        )
        raise PeersUnknownError(f"{unknown}; the region's membership table is {why}")
    return snapshot.peers - {me}


# -- arenas: the channel directory of one peer ------------------------------------------------


@dataclass(frozen=True)
class ChannelEntry:
    """A channel as its receiver's arena directory lists it (offsets are region offsets)."""

    name: str
    sender: int
    receiver: int
    offset: int
    size: int
    index: int


@dataclass(frozen=True)
class _ArenaState:
    owner: int
    epoch: int
    used: int
    #: Directory slots in use (live and free entries).
    count: int
    entries: tuple[ChannelEntry, ...]
    #: Reclaimed entries: (directory index, arena offset, size).
    free: tuple[tuple[int, int, int], ...]


def _copy_arena_page(region: Region, slot: int, patience: float = 0.5) -> bytes:
    """A consistent copy of arena ``slot``'s header page.

    Entries are appended by publishing the count (TSO orders the entry before it), but an
    entry is *reused* in place, which a plain copy could see half done. So the owner makes the
    directory seqlock word odd before rewriting an entry and even after, and a reader copies
    the page between two equal even reads of it (the argument of :class:`Membership`).
    Bounded: a word kept odd (a stuck or hostile writer) gives RegionCorrupted, not a hang.
    """
    base = region.arena_offset(slot)
    mem = region.memory
    words = mem[base : base + 64].cast("Q")
    deadline = time.monotonic() + patience
    tries = 0
    while True:
        s1 = words[_A_SEQ]
        if not s1 & 1:
            page = bytes(mem[base : base + PAGE])
            if words[_A_SEQ] == s1:
                return page
        tries += 1
        if tries > 64:
            if time.monotonic() > deadline:
                raise RegionCorrupted(
                    f"arena {slot}", "seq", f"directory never stable for {patience}s"
                )
            time.sleep(0.0001)


def read_arena(region: Region, slot: int) -> _ArenaState:
    """Copy arena ``slot``'s header page once and validate it (any peer may read)."""
    base = region.arena_offset(slot)
    limit = region.arena_size
    page = _copy_arena_page(region, slot)
    owner, epoch, count, used = struct.unpack_from("<QQQQ", page, 0)
    where = f"arena {slot}"
    if count > MAX_CHANNELS_PER_ARENA:
        raise RegionCorrupted(where, "count", f"{count} > {MAX_CHANNELS_PER_ARENA}")
    if used % PAGE or used > limit - PAGE:
        raise RegionCorrupted(where, "used", f"{used} is misaligned or beyond the arena")
    entries = []
    free: list[tuple[int, int, int]] = []
    extents: list[tuple[int, int, int]] = []
    for i in range(count):
        raw, sender, receiver, off, length, state = _ARENA_ENTRY.unpack_from(
            page, _A_ENTRIES + i * _ARENA_ENTRY_SIZE
        )
        field = f"entry[{i}]"
        # Free entries are reused in place by the owner, so their extents are checked like
        # live ones: a liar must not steer an allocation outside this arena.
        if off % PAGE or off < PAGE or length < MIN_AREA or off + length > PAGE + used:
            raise RegionCorrupted(where, field, f"extent {off}+{length} outside the used space")
        extents.append((off, length, i))
        if state == _STATE_FREE:
            free.append((i, off, length))
            continue
        name = _decode_name(raw, where, field)
        if state != _STATE_LIVE or sender > MAX_PEER_ID or receiver > MAX_PEER_ID:
            raise RegionCorrupted(where, field, "bad state or peer id")
        entries.append(ChannelEntry(name, sender, receiver, base + off, length, i))
    # No two channels share memory: an honest owner never overlaps extents, and a liar who
    # does could point a sender at another channel's ring.
    extents.sort()
    for (off_a, len_a, a), (off_b, _len_b, b) in itertools.pairwise(extents):
        if off_a + len_a > off_b:
            raise RegionCorrupted(where, f"entry[{b}]", f"overlaps entry[{a}]")
    return _ArenaState(owner, epoch, used, count, tuple(entries), tuple(free))


def find_channel(
    region: Region, slot: int, name: str, sender: int, receiver: int
) -> ChannelEntry | None:
    """Channel ``name`` from ``sender`` to ``receiver`` as arena ``slot`` lists it, or None."""
    _encode_name(name, CHANNEL_NAME_MAX, "channel")
    sender = _check_peer(sender, "sender id")
    receiver = _check_peer(receiver, "receiver id")
    for entry in read_arena(region, slot).entries:
        if (entry.name, entry.sender, entry.receiver) == (name, sender, receiver):
            return entry
    return None


def membership_guard(region: Region, entry: PeerEntry) -> tuple[memoryview, int, int]:
    """``(words, index, value)`` for Ring.set_guard: the "joined" word of ``entry``'s
    membership slot, which the membership writer changes when the peer leaves (to 0) and
    again when the slot goes to a newcomer, whose arena it resets only after that (and a
    restarted server clears every slot first). An end that checks this word before every
    write therefore never writes into an arena recycled for someone else (short of the check
    racing a leave *and* a join in the microseconds before its store; the newcomer would then
    see garbage it validates like any other), and a receiver that checks it after copying a
    message out never hands over bytes written by the arena's next user. The
    word is in the membership table, which every peer reads anyway; it is one aligned
    8-byte word, so it needs no seqlock."""
    h = region._header
    table = region.memory[h.membership_offset : h.membership_offset + h.membership_size]
    return table.cast("Q"), (_M_SLOTS + entry.slot * _SLOT_SIZE) // 8 + 1, entry.joined


_alloc_lock = threading.Lock()  # one allocator per process per arena: serialise threads


def allocate_channel(
    region: Region, slot: int, owner: int, name: str, sender: int, receiver: int, size: int,
    init: Any, in_use: Callable[[ChannelEntry], bool] = lambda entry: True,
    *, held: Callable[[int, int], str | None] = lambda offset, size: None,
) -> ChannelEntry:  # fmt: skip
    """Create (or find) channel ``name`` from ``sender`` in arena ``slot``, owned by ``owner``.

    Only the arena's owner calls this. ``init(area)`` initialises the channel's memory before
    the entry is published; publication is the store of the new entry count, ordered after
    the entry and the area by TSO.

    **Reclaiming.** Peers come and go (QEMU gives a restarted VM a new id), so a long-lived
    receiver's arena would fill with channels from the departed. When the directory or the
    space runs out, an entry is reclaimed if a server keeps the membership table, its sender
    is not listed there (it left; a static table never says so), and ``in_use(entry)`` is
    false (no end of it is open in this process). A reclaimed entry is marked free and reused
    in place, under the directory seqlock, for a channel that fits its area. A departed sender
    writes nothing; a disconnected process that still maps the region and writes anyway meets
    a receiver that validates everything it reads (a ``ChannelCorrupted``, nothing worse).

    **Never over a live end.** ``held(offset, size)`` names a channel end this process has
    open on region bytes ``[offset, offset + size)`` under the arena's current owner (or
    returns None). Before anything is written, every free entry and the space chosen for the
    new channel are checked against it: an entry marked free over a channel still open here
    was forged by another peer (an honest owner frees only channels nobody here uses), and is
    reported as :class:`RegionCorrupted` naming it, instead of being laid over a live channel
    and losing its messages.
    """
    # Everything is checked before the lock and before any write: a sender id above
    # MAX_PEER_ID, say, would publish an entry every reader then rejects as corrupt.
    raw = _encode_name(name, CHANNEL_NAME_MAX, "channel")
    slot = _int_arg(slot, "slot")
    owner = _check_peer(owner, "owner id")
    sender = _check_peer(sender, "sender id")
    receiver = _check_peer(receiver, "receiver id")
    size = _int_arg(size, "channel area size")
    if size < MIN_AREA:
        raise UsageError(f"a channel area needs at least {MIN_AREA} bytes, not {size}")
    for what, fn in (("init", init), ("in_use", in_use), ("held", held)):
        if not callable(fn):
            raise UsageError(f"{what} must be callable, not {type(fn).__name__}")
    rounded = _round_up(size, PAGE)
    with _alloc_lock:
        state = read_arena(region, slot)
        if state.owner != owner:
            raise RegionCorrupted(
                f"arena {slot}", "owner", f"{state.owner}, but the table gives it to {owner}"
            )
        base = region.arena_offset(slot)
        for index, off, length in state.free:
            label = held(base + off, length)
            if label is not None:
                raise RegionCorrupted(
                    f"arena {slot}", f"entry[{index}]",
                    f"marked free, but channel {label} is open on its memory in this process "
                    "(another peer wrote the entry's state word): the channel is left as it is",
                )  # fmt: skip
        for entry in state.entries:
            if (entry.name, entry.sender, entry.receiver) == (name, sender, receiver):
                return entry
        mem = region.memory
        words = mem[base : base + 64].cast("Q")
        fits = [(i, off, n) for i, off, n in state.free if _round_up(n, PAGE) >= rounded]
        off = PAGE + state.used
        if not fits and (
            state.count >= MAX_CHANNELS_PER_ARENA or off + rounded > region.arena_size
        ):
            fits = _reclaim(region, slot, state, rounded, in_use)
        if fits:
            index, off, _ = min(fits, key=lambda f: f[2])  # the smallest area that fits
            _check_unheld(slot, f"entry[{index}]", base + off, size, held)
            entry_off = base + _A_ENTRIES + index * _ARENA_ENTRY_SIZE
            words[_A_SEQ] = state_seq = words[_A_SEQ] | 1  # odd: readers retry
            try:
                init(mem[base + off : base + off + size])
                _ARENA_ENTRY.pack_into(
                    mem, entry_off, raw, sender, receiver, off, size, _STATE_LIVE
                )
            finally:
                words[_A_SEQ] = state_seq + 1  # even again: the entry is published
            return ChannelEntry(name, sender, receiver, base + off, size, index)
        count = state.count
        if count >= MAX_CHANNELS_PER_ARENA:
            raise RegionFullError(
                f"peer {owner} already receives on {count} channels, the most one arena lists"
            )
        if off + rounded > region.arena_size:
            raise RegionFullError(
                f"channel {name!r} needs {rounded} bytes but peer {owner}'s arena has "
                f"{region.arena_size - off} left: use a smaller capacity, or format the region "
                "bigger or with fewer max_peers"
            )
        _check_unheld(slot, "used", base + off, size, held)
        init(mem[base + off : base + off + size])
        entry_off = base + _A_ENTRIES + count * _ARENA_ENTRY_SIZE
        _ARENA_ENTRY.pack_into(mem, entry_off, raw, sender, receiver, off, size, _STATE_LIVE)
        words[_A_USED] = state.used + rounded
        words[_A_COUNT] = count + 1  # the publishing store
        return ChannelEntry(name, sender, receiver, base + off, size, count)


def _check_unheld(
    slot: int, field: str, offset: int, size: int, held: Callable[[int, int], str | None]
) -> None:
    """RegionCorrupted if space the directory says is free holds a channel open here."""
    label = held(offset, size)
    if label is not None:
        raise RegionCorrupted(
            f"arena {slot}", field,
            f"gives bytes {offset}+{size} to a new channel, but channel {label} is open on "
            "them in this process (another peer rewrote the directory)",
        )  # fmt: skip


def _reclaim(
    region: Region,
    slot: int,
    state: _ArenaState,
    rounded: int,
    in_use: Callable[[ChannelEntry], bool],
) -> list[tuple[int, int, int]]:
    """Mark the entries of departed senders free; return the free entries that fit."""
    snapshot = region.membership.snapshot()
    if not snapshot.live:
        return []
    base = region.arena_offset(slot)
    fits: list[tuple[int, int, int]] = []
    for entry in state.entries:
        if entry.sender in snapshot.peers or in_use(entry):
            continue
        state_word = base + _A_ENTRIES + entry.index * _ARENA_ENTRY_SIZE + _ENTRY_STATE
        # One aligned 8-byte store: a reader's copy has the entry either whole and live, or
        # free (skipped); nothing in between.
        region.memory[state_word : state_word + 8].cast("Q")[0] = _STATE_FREE
        if _round_up(entry.size, PAGE) >= rounded:
            fits.append((entry.index, entry.offset - base, entry.size))
    return fits

"""The region layout: header, directory, membership table and arenas, on real shared memory."""

from __future__ import annotations

import multiprocessing
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivshmem
from ivshmem.channel import (
    Membership,
    MembershipWriter,
    NotFormattedError,
    Region,
    RegionCorrupted,
    RegionFullError,
    UnsupportedPlatformError,
    format_region,
    is_formatted,
    layout,
)
from ivshmem.channel._ordering import check_platform, machine_is_supported
from ivshmem.errors import UsageError

SIZE = 1 << 20


@pytest.fixture
def region_path(short_tmp: Path) -> Iterator[str]:
    path = str(short_tmp / "region")
    yield path


@pytest.fixture
def ep(region_path: str) -> Iterator[ivshmem.RegionEndpoint]:
    with ivshmem.open_region(region_path, id=0, size=SIZE) as endpoint:
        yield endpoint


def test_format_then_attach_from_another_mapping(
    ep: ivshmem.RegionEndpoint, region_path: str
) -> None:
    region = format_region(ep, max_peers=4, allocations={"counter": 100, "table": 5000})
    assert region.max_peers == 4
    assert region.allocations["counter"][1] == 4096
    assert region.allocations["table"][1] == 8192
    with ivshmem.open_region(region_path, id=1) as other:
        again = Region(other)
        assert again.format_id == region.format_id
        assert again.arena_size == region.arena_size
        assert again.allocations == region.allocations
        # A user allocation is the same memory in both mappings.
        again.allocation("counter")[0:4] = b"abcd"
        assert bytes(region.allocation("counter")[0:4]) == b"abcd"
        with pytest.raises(UsageError, match="no allocation named 'nope'"):
            again.allocation("nope")
    assert is_formatted(ep)


def test_reformat_changes_identity_and_clears(ep: ivshmem.RegionEndpoint) -> None:
    first = format_region(ep, allocations={"a": 10})
    first.allocation("a")[0] = 7
    second = format_region(ep, allocations={"a": 10})
    assert second.format_id != first.format_id
    assert second.allocation("a")[0] == 0


def test_unformatted_region_is_a_clear_error(ep: ivshmem.RegionEndpoint) -> None:
    assert not is_formatted(ep)
    with pytest.raises(NotFormattedError, match="not formatted for channels"):
        Region(ep)
    with pytest.raises(NotFormattedError):
        Membership(ep)


def test_other_layout_version_is_refused(ep: ivshmem.RegionEndpoint) -> None:
    format_region(ep)
    struct.pack_into("<I", ep.memory, 8, layout.LAYOUT_VERSION + 1)
    with pytest.raises(NotFormattedError, match=f"layout version {layout.LAYOUT_VERSION + 1}"):
        Region(ep)


def test_resized_region_is_refused(ep: ivshmem.RegionEndpoint, region_path: str) -> None:
    format_region(ep)
    os.truncate(region_path, 2 * SIZE)
    with ivshmem.open_region(region_path, id=1) as bigger:
        with pytest.raises(NotFormattedError, match="resized"):
            Region(bigger)


def test_region_too_small_says_what_it_needs() -> None:
    buf = bytearray(8 * 4096)
    with pytest.raises(UsageError, match="too small for 16 peer slots"):
        format_region(buf)
    region = format_region(buf, max_peers=2)
    assert region.arena_size == 3 * 4096


def test_bad_arguments() -> None:
    buf = bytearray(SIZE)
    with pytest.raises(UsageError, match="max_peers"):
        format_region(buf, max_peers=0)
    with pytest.raises(UsageError, match="peer id 70000"):
        format_region(buf, peers=[70000])
    with pytest.raises(UsageError, match="allocation name"):
        format_region(buf, allocations={"x" * 41: 1})
    with pytest.raises(UsageError, match="must be writable"):
        format_region(bytes(SIZE))


def test_non_x86_64_is_refused() -> None:
    assert machine_is_supported("x86_64") and machine_is_supported("AMD64")
    assert not machine_is_supported("aarch64")
    with pytest.raises(UnsupportedPlatformError, match="'aarch64'"):
        check_platform("aarch64")


# -- membership -------------------------------------------------------------------------------


def test_static_membership(ep: ivshmem.RegionEndpoint) -> None:
    format_region(ep, max_peers=4, peers={3: 2, 9: 0})
    snap = Membership(ep).snapshot()
    assert snap.writer == "static" and not snap.live
    assert snap.peers == {3, 9}
    assert snap.entries[3].vectors == 2
    assert {e.slot for e in snap.entries.values()} == {0, 1}


def test_unmanaged_table_is_empty(ep: ivshmem.RegionEndpoint) -> None:
    format_region(ep)
    snap = Membership(ep).snapshot()
    assert snap.writer == "none" and snap.peers == frozenset()


def test_writer_joins_and_leaves(ep: ivshmem.RegionEndpoint, region_path: str) -> None:
    format_region(ep, max_peers=3)
    writer = MembershipWriter(ep)
    with ivshmem.open_region(region_path, id=5) as guest:
        reader = Membership(guest)
        g0 = reader.generation
        assert writer.joined(0, 1) == 0
        assert writer.joined(1, 4) == 1
        assert reader.peers() == {0, 1}
        assert reader.snapshot().live
        assert reader.generation == g0 + 2
        assert writer.left(0) and not writer.left(0)
        assert reader.peers() == {1}
        # Slots are reused round-robin: the freed slot 0 comes after slot 2.
        assert writer.joined(2, 1) == 2
        assert writer.joined(3, 1) == 0
        with pytest.raises(RegionFullError, match="membership table is full"):
            writer.joined(4, 1)
        with pytest.raises(UsageError, match="already"):
            writer.joined(3, 1)
        assert reader.peers() == {1, 2, 3} == writer.peers
        # The arena of a slot is reset and handed to its new owner before it is listed.
        arena = layout.read_arena(reader.region, 0)
        assert arena.owner == 3 and arena.entries == ()


def test_restarted_writer_continues_the_generation(ep: ivshmem.RegionEndpoint) -> None:
    format_region(ep)
    first = MembershipWriter(ep)
    first.joined(7, 1)
    g = Membership(ep).generation
    second = MembershipWriter(ep)  # a restarted server: nobody is connected any more
    assert Membership(ep).peers() == frozenset()
    assert second.generation > g


def _churn(path: str, rounds: int) -> None:
    """A server that keeps peers joining and leaving; vectors always equal peer % 5 + 1."""
    with ivshmem.open_region(path, id=0) as endpoint:
        writer = MembershipWriter(endpoint)
        for i in range(rounds):
            peer = 100 + i % 50
            writer.joined(peer, peer % 5 + 1)
            if i >= 3:
                writer.left(100 + (i - 3) % 50)


def test_seqlock_snapshots_are_consistent_across_processes(
    ep: ivshmem.RegionEndpoint, region_path: str
) -> None:
    format_region(ep, max_peers=8)
    MembershipWriter(ep)  # so the table is live before the child starts
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_churn, args=(region_path, 20000))
    child.start()
    reader = Membership(ep)
    last = -1
    seen = 0
    try:
        while child.is_alive() or seen == 0:
            snap = reader.snapshot()
            assert snap.generation >= last
            last = snap.generation
            assert len(snap.entries) <= 4
            for entry in snap.entries.values():
                assert entry.vectors == entry.peer % 5 + 1  # never a torn slot
            seen += 1
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert seen > 0


def test_stuck_seqlock_is_reported_not_waited_for(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep)
    words = ep.memory[4096 : 4096 + 8].cast("Q")
    words[0] = 12345  # odd: "a write is in progress", forever
    with pytest.raises(RegionCorrupted, match="seq"):
        Membership(region).snapshot(patience=0.05)


# -- arenas --------------------------------------------------------------------------------


def test_arena_allocation_and_limits(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=2, peers=[0, 1])
    inits: list[int] = []

    def init(area: memoryview) -> None:
        inits.append(len(area))

    a = layout.allocate_channel(region, 0, 0, "a", 1, 0, 4096 + 256, init)
    again = layout.allocate_channel(region, 0, 0, "a", 1, 0, 4096 + 256, init)
    assert a == again and inits == [4352]  # found, not made twice
    b = layout.allocate_channel(region, 0, 0, "a", 2, 0, 512, init)  # other sender: other channel
    assert b.offset >= a.offset + 8192
    assert layout.find_channel(region, 0, "a", 2, 0) == b
    assert layout.find_channel(region, 1, "a", 2, 0) is None
    with pytest.raises(RegionFullError, match="arena has"):
        layout.allocate_channel(region, 0, 0, "big", 1, 0, region.arena_size, init)
    with pytest.raises(RegionCorrupted, match="owner"):
        layout.allocate_channel(region, 1, 0, "x", 1, 0, 512, init)  # slot 1 belongs to peer 1
    with pytest.raises(UsageError, match="channel name"):
        layout.allocate_channel(region, 0, 0, "n" * 33, 1, 0, 512, init)


def test_channels_of_departed_senders_are_reclaimed_in_place(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=3)
    writer = MembershipWriter(region)  # a server keeps this table: absence means "left"
    assert writer.joined(0, 1) == 0

    def init(area: memoryview) -> None:
        area[:8] = b"fresh!!!"

    def churn(in_use: Callable[[layout.ChannelEntry], bool]) -> list[layout.ChannelEntry]:
        made = []
        for sender in range(1, 1 + 3 * layout.MAX_CHANNELS_PER_ARENA):
            writer.joined(sender, 1)
            made.append(layout.allocate_channel(region, 0, 0, "c", sender, 0, 512, init, in_use))
            writer.left(sender)
        return made

    # Far more channels than one arena lists, each from a sender that then left: the space of
    # the departed is reused, and every new channel starts from a freshly initialised area.
    made = churn(lambda entry: False)
    assert len({e.offset for e in made}) <= layout.MAX_CHANNELS_PER_ARENA < len(made)
    assert all(bytes(ep.memory[e.offset : e.offset + 8]) == b"fresh!!!" for e in made)
    live = layout.read_arena(region, 0).entries
    assert [(e.name, e.sender) for e in live if e.sender == made[-1].sender] == [
        ("c", made[-1].sender)
    ]
    # A channel with an end still open in this process is never reclaimed; nor one whose sender
    # is still listed.
    writer.joined(999, 1)
    kept = layout.allocate_channel(region, 0, 0, "keep", 999, 0, 512, init, lambda e: False)
    churn(lambda entry: entry.sender == 999 or entry == kept)
    assert layout.find_channel(region, 0, "keep", 999, 0) == kept


def test_a_static_table_never_reclaims(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=2, peers=[0, 1])  # no server: absence proves nothing

    def init(area: memoryview) -> None:
        pass

    for i in range(layout.MAX_CHANNELS_PER_ARENA):
        layout.allocate_channel(region, 0, 0, f"c{i}", 7, 0, 512, init, lambda e: False)
    with pytest.raises(RegionFullError, match="63 channels"):
        layout.allocate_channel(region, 0, 0, "one more", 7, 0, 512, init, lambda e: False)


def _arena_words(region: Region, slot: int) -> memoryview:
    base = region.arena_offset(slot)
    return region.memory[base : base + 4096].cast("Q")


def test_a_lying_free_entry_cannot_steer_an_allocation_out_of_the_arena(
    ep: ivshmem.RegionEndpoint,
) -> None:
    region = format_region(ep, max_peers=3, peers=[0, 1, 2])

    def init(area: memoryview) -> None:
        area[:] = b"\xee" * len(area)

    layout.allocate_channel(region, 0, 0, "a", 1, 0, 512, init)
    before = bytes(ep.memory[region.arena_offset(1) : region.arena_offset(1) + region.arena_size])
    # A liar marks entry 0 free and points it into arena 1 (and, in a second try, far away).
    entry = layout._A_ENTRIES // 8  # word index of entry 0
    words = _arena_words(region, 0)
    for off in (region.arena_size + 4096, 2**40):
        words[entry + 5] = off  # offset (name 32 bytes = 4 words, sender/receiver 1 word)
        words[entry + 7] = layout._STATE_FREE
        with pytest.raises(RegionCorrupted, match="outside the used space"):
            layout.allocate_channel(region, 0, 0, "b", 2, 0, 512, init, lambda e: False)
    after = bytes(ep.memory[region.arena_offset(1) : region.arena_offset(1) + region.arena_size])
    assert after == before


def test_overlapping_directory_entries_are_refused(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=2, peers=[0, 1])

    def init(area: memoryview) -> None:
        pass

    a = layout.allocate_channel(region, 0, 0, "a", 1, 0, 8192 + 256, init)
    layout.allocate_channel(region, 0, 0, "b", 1, 0, 512, init)
    words = _arena_words(region, 0)
    second = (layout._A_ENTRIES + layout._ARENA_ENTRY_SIZE) // 8
    words[second + 5] = a.offset - region.arena_offset(0) + 4096  # inside channel a
    with pytest.raises(RegionCorrupted, match="overlaps"):
        layout.read_arena(region, 0)


def test_a_dead_owners_odd_directory_seqlock_does_not_outlive_its_slot(
    ep: ivshmem.RegionEndpoint,
) -> None:
    region = format_region(ep, max_peers=1)
    writer = MembershipWriter(region)
    slot = writer.joined(5, 1)
    # Peer 5 dies between the odd and the even store of an allocation.
    _arena_words(region, slot)[layout._A_SEQ] = 7
    writer.left(5)
    assert writer.joined(6, 1) == slot
    assert layout.read_arena(region, slot).entries == ()  # readable again, and empty


# -- hostile bytes ---------------------------------------------------------------------------

_REGION_ERRORS = (NotFormattedError, RegionCorrupted)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=16)), min_size=1, max_size=8
    )
)
def test_scribbled_header_gives_only_region_errors(writes: list[tuple[int, bytes]]) -> None:
    buf = bytearray(64 * 4096)
    format_region(buf, max_peers=2, peers=[0, 1], allocations={"u": 1})
    for offset, data in writes:
        chunk = data[: 4096 - offset]
        buf[offset : offset + len(chunk)] = chunk
    try:
        region = Region(buf)
    except _REGION_ERRORS:
        return
    for off, length in [*region.allocations.values()]:
        assert off >= 4096 and off + length <= len(buf)
    try:
        Membership(region).snapshot(patience=0.01)
        layout.read_arena(region, 0)
    except _REGION_ERRORS:
        pass


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=16)), max_size=8),
    arena=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=16)), max_size=8),
)
def test_scribbled_membership_and_arena_give_only_region_errors(
    table: list[tuple[int, bytes]], arena: list[tuple[int, bytes]]
) -> None:
    buf = bytearray(64 * 4096)
    region = format_region(buf, max_peers=4, peers=[0, 1])
    layout.allocate_channel(region, 0, 0, "c", 1, 0, 4096 + 256, lambda area: None)
    base = region.arena_offset(0)
    for offset, data in table:
        buf[4096 + offset : 4096 + offset + len(data)] = data
    for offset, data in arena:
        chunk = data[: 4096 - offset]
        buf[base + offset : base + offset + len(chunk)] = chunk
    try:
        snap = Membership(region).snapshot(patience=0.01)
        assert all(0 <= e.peer <= 0xFFFF and 0 <= e.slot < 4 for e in snap.entries.values())
    except RegionCorrupted:
        pass
    try:
        state = layout.read_arena(region, 0)
    except RegionCorrupted:
        return
    for entry in state.entries:
        assert base + 4096 <= entry.offset
        assert entry.offset + entry.size <= base + region.arena_size


# -- argument checking: bad input is a UsageError, and nothing is written before it ----------


class _Index:
    """An integer type that is not int (like numpy's): accepted wherever an int is."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_peers": 4.0}, "max_peers must be an int, not float"),
        ({"max_peers": 2.5}, "max_peers must be an int, not float"),
        ({"max_peers": True}, "max_peers must be an int, not bool"),
        ({"max_peers": "4"}, "max_peers must be an int, not str"),
        ({"peers": {1: 2.0}}, "vector count of peer 1 must be an int, not float"),
        ({"peers": {1: True}}, "vector count of peer 1 must be an int, not bool"),
        ({"peers": {1: 2000}}, "vector count 2000 is outside"),
        ({"peers": [1.5]}, "peer id must be an int, not float"),
        ({"peers": {True: 1}}, "peer id must be an int, not bool"),
        ({"peers": "12"}, "peers must be an iterable of peer ids or a {id: vectors} mapping"),
        ({"peers": b"\x01"}, "peers must be an iterable of peer ids or a {id: vectors} mapping"),
        ({"peers": 5}, "peers must be an iterable of peer ids or a {id: vectors} mapping, not int"),
        ({"max_peers": 4, "peers": range(5)}, "5 static peers do not fit 4 slots"),
        ({"allocations": {1: 10}}, "allocation names must be str, not int"),
        ({"allocations": {"a": 2.5}}, "size of allocation 'a' must be an int, not float"),
        ({"allocations": {"a": True}}, "size of allocation 'a' must be an int, not bool"),
        ({"allocations": {"a": 0}}, "allocation 'a' needs a positive size in bytes"),
        ({"allocations": 5}, "allocations must be a {name: size in bytes} mapping, not int"),
        ({"allocations": "ab"}, "allocations must be a {name: size in bytes} mapping, not str"),
        ({"allocations": {"ok": 1, "big": 1 << 40}}, "too small"),
    ],
)
def test_a_failed_format_leaves_the_formatted_region_intact(
    ep: ivshmem.RegionEndpoint, region_path: str, kwargs: dict[str, object], message: str
) -> None:
    region = format_region(ep, max_peers=4, peers={3: 2}, allocations={"keep": 10})
    region.allocation("keep")[0:4] = b"data"
    with pytest.raises(UsageError) as caught:
        format_region(ep, **kwargs)  # type: ignore[arg-type]
    assert message in str(caught.value)
    # Nothing was written: another mapping attaches to the very same layout and contents.
    with ivshmem.open_region(region_path, id=1) as other:
        again = Region(other)
        assert again.format_id == region.format_id
        assert again.max_peers == 4 and again.allocations == region.allocations
        assert bytes(again.allocation("keep")[0:4]) == b"data"
        snap = Membership(again).snapshot(patience=0.05)
        assert snap.writer == "static" and snap.peers == {3} and snap.entries[3].vectors == 2


@pytest.mark.parametrize("target", [None, 42, "/dev/shm/region", Path("/dev/shm/region")])
def test_the_region_must_be_an_endpoint_or_a_writable_buffer(target: object) -> None:
    expected = "must be an ivshmem Endpoint, a Region or a writable buffer"
    calls: list[Callable[[object], object]] = [
        Region,
        format_region,
        is_formatted,
        Membership,
        MembershipWriter,
    ]
    for call in calls:
        with pytest.raises(UsageError, match=expected) as caught:
            call(target)
        assert type(target).__name__ in str(caught.value)
        if isinstance(target, (str, Path)):  # a path: say how to open it
            assert "ivshmem.open_region(path" in str(caught.value)


def test_unusable_buffers_are_refused() -> None:
    with pytest.raises(UsageError, match="contiguous"):
        format_region(memoryview(bytearray(2 * SIZE))[::2])
    released = memoryview(bytearray(SIZE))
    released.release()
    with pytest.raises(UsageError, match="cannot be used"):
        Region(released)
    with pytest.raises(UsageError, match="must be writable"):
        is_formatted(bytes(SIZE))


def test_a_region_object_is_accepted_where_a_buffer_is(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=2)
    assert is_formatted(region)
    assert Region(region).format_id == region.format_id
    assert format_region(region, max_peers=2).format_id != region.format_id


def test_region_methods_refuse_wrong_types(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=4, allocations={"a": 1})
    for slot in (1.5, "0", True, None):
        with pytest.raises(UsageError, match="slot must be an int") as caught:
            region.arena_offset(slot)  # type: ignore[arg-type]
        assert type(slot).__name__ in str(caught.value)
    with pytest.raises(UsageError, match=r"slot 4 is outside 0\.\.3"):
        region.arena_offset(4)
    assert region.arena_offset(_Index(1)) == region.arena_offset(1)  # type: ignore[arg-type]
    names: list[object] = [[], 1, b"a"]
    for name in names:
        with pytest.raises(UsageError, match="allocation names are str"):
            region.allocation(name)  # type: ignore[arg-type]
    membership = region.membership
    for patience in ("x", -1, float("nan"), True, None):
        with pytest.raises(UsageError, match="patience must be a number of seconds >= 0"):
            membership.snapshot(patience)  # type: ignore[arg-type]
    assert membership.snapshot(0).writer == "none"  # an int number of seconds is fine
    assert membership.snapshot(patience=float("inf")).peers == frozenset()


def test_membership_writer_checks_before_writing(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=2)
    writer = MembershipWriter(region)
    reader = Membership(region)
    generation = reader.generation
    bad_joins: list[tuple[object, object, str]] = [
        (1, 2.0, "vector count must be an int, not float"),
        (1, "2", "vector count must be an int, not str"),
        (1, True, "vector count must be an int, not bool"),
        (1.0, 1, "peer id must be an int, not float"),
        (True, 1, "peer id must be an int, not bool"),
        ("1", 1, "peer id must be an int, not str"),
        (70000, 1, "peer id 70000 is outside 0..65535"),
        (1, 2000, "vector count 2000 is outside"),
    ]
    for peer, vectors, message in bad_joins:
        with pytest.raises(UsageError, match=message):
            writer.joined(peer, vectors)  # type: ignore[arg-type]
    for peer, message in [("1", "must be an int, not str"), (1.0, "not float"), (-1, "outside")]:
        with pytest.raises(UsageError, match=message):
            writer.left(peer)  # type: ignore[arg-type]
    # Nothing was published, the seqlock is even, and the first slot is still the next one.
    assert reader.generation == generation
    assert reader.snapshot(patience=0.05).peers == frozenset()
    assert writer.joined(_Index(1), _Index(2)) == 0  # type: ignore[arg-type]
    entry = reader.snapshot().entries[1]
    assert type(entry.peer) is int and entry.vectors == 2
    assert writer.left(_Index(1)) and not writer.left(1)  # type: ignore[arg-type]


def test_channel_directory_helpers_check_before_writing(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(ep, max_peers=2, peers=[0, 1])

    def init(area: memoryview) -> None:
        pass

    bad: list[tuple[tuple[object, ...], str]] = [
        ((0, 0, "c", 70000, 0, 512, init), "sender id 70000 is outside"),
        ((0, 0, "c", 1.0, 0, 512, init), "sender id must be an int, not float"),
        ((0, 0, "c", 1, True, 512, init), "receiver id must be an int, not bool"),
        ((0, "0", "c", 1, 0, 512, init), "owner id must be an int, not str"),
        ((0.0, 0, "c", 1, 0, 512, init), "slot must be an int, not float"),
        ((5, 0, "c", 1, 0, 512, init), "slot 5 is outside"),
        ((0, 0, b"c", 1, 0, 512, init), "channel names must be str, not bytes"),
        ((0, 0, "c", 1, 0, 600.5, init), "channel area size must be an int, not float"),
        ((0, 0, "c", 1, 0, 100, init), "at least 512 bytes"),
        ((0, 0, "c", 1, 0, 512, None), "init must be callable"),
    ]
    for args, message in bad:
        with pytest.raises(UsageError, match=message):
            layout.allocate_channel(region, *args)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="in_use must be callable"):
        layout.allocate_channel(region, 0, 0, "c", 1, 0, 512, init, 1)  # type: ignore[arg-type]
    arena = layout.read_arena(region, 0)  # still readable, and nothing was published
    assert arena.entries == () and arena.count == 0 and arena.used == 0
    with pytest.raises(UsageError, match="channel names must be str"):
        layout.find_channel(region, 0, 5, 1, 0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="sender id must be an int, not str"):
        layout.find_channel(region, 0, "c", "1", 0)  # type: ignore[arg-type]
    made = layout.allocate_channel(region, _Index(0), 0, "c", _Index(1), 0, 512, init)  # type: ignore[arg-type]
    assert layout.find_channel(region, 0, "c", 1, 0) == made


def test_integer_like_and_iterable_inputs_are_accepted(ep: ivshmem.RegionEndpoint) -> None:
    region = format_region(
        ep,
        max_peers=_Index(3),  # type: ignore[arg-type]
        peers=(peer for peer in [2, _Index(5), 2]),  # type: ignore[misc]
        allocations=[("a", _Index(10))],  # type: ignore[arg-type]
    )
    assert region.max_peers == 3 and region.allocations["a"][1] == 4096
    assert Membership(region).peers() == {2, 5}  # a repeated id counts once, as before
    format_region(ep, peers={_Index(7): _Index(3)})  # type: ignore[dict-item]
    assert Membership(ep).snapshot().entries[7].vectors == 3


def test_reformatting_clears_the_whole_old_membership_table(short_tmp: Path) -> None:
    """Every "joined" word of the old table is an open end's guard: a reformat for fewer
    peers, whose table is smaller, clears the old one whole, so that no guard survives in
    memory the new layout gives to an arena."""
    path = str(short_tmp / "region")
    with ivshmem.open_region(path, id=0, size=16 << 20) as ep:
        old = format_region(ep, max_peers=600, peers=range(600))
        m_off = old._header.membership_offset
        m_size = old._header.membership_size
        assert m_size > 2 * layout.PAGE
        joined = layout.Membership(old).snapshot().entries[599].joined
        words, index, value = layout.membership_guard(old, layout.PeerEntry(599, 599, 0, joined))
        assert words[index] == value != 0
        new = format_region(ep, max_peers=2, peers=[0, 1])
        assert new._header.membership_size < m_size
        # The guard word now lies in arena 0's channel space, which formatting leaves alone.
        assert m_off + index * 8 >= new._header.arenas_offset + layout.PAGE
        assert words[index] == 0

"""Endpoints that cannot learn the other peers themselves (a guest's device, a plain region)
answer ``peers`` from a formatted region's membership table when a server keeps it, and say
why they cannot otherwise."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from fakesysfs import FakeSysfs
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import MembershipWriter, format_region
from ivshmem.errors import PeersUnknownError
from ivshmem.pci import open_pci


def test_a_guest_endpoint_reads_peers_from_the_membership_table(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_device("0000:00:04.0", ivposition=3)
    with open_pci(sysfs_root=str(fake.root)) as ep:
        format_region(ep, max_peers=4)
        writer = MembershipWriter(ep)  # what the server does with --format
        for peer in (0, 3, 9):
            writer.joined(peer, 1)
        assert ep.peers == frozenset({0, 9})  # every listed id but ours
        writer.left(0)
        assert ep.peers == frozenset({9})
        # A source set by a layer above still comes first (device registers, say).
        ep.set_peers_source(lambda: frozenset({42}))
        assert ep.peers == frozenset({42})
        ep.set_peers_source(None)
        assert ep.peers == frozenset({9})
        # Where the table cannot answer, the error says why.
        struct.pack_into("<I", ep.memory, 32, 0)  # a corrupted header: max_peers 0
        with pytest.raises(PeersUnknownError, match=r"cannot be read.*max_peers"):
            _ = ep.peers
        format_region(ep, max_peers=4)
        with pytest.raises(PeersUnknownError, match=r"kept by no server"):
            _ = ep.peers
        ep.memory[0:8] = bytes(8)  # not formatted at all
        with pytest.raises(PeersUnknownError, match=r"guest cannot learn.*--format"):
            _ = ep.peers


def test_a_static_table_says_who_may_use_the_region_not_who_is_there(tmp_path: Path) -> None:
    path = str(tmp_path / "region")
    with ivshmem.open_region(path, id=1, size=1 << 20) as ep:
        with pytest.raises(PeersUnknownError, match=r"plain region has no server"):
            _ = ep.peers
        format_region(ep, peers=[1, 2])
        with pytest.raises(PeersUnknownError, match=r"static .*snapshot\(\)\.peers"):
            _ = ep.peers


def test_a_plain_endpoint_on_a_served_region_sees_the_servers_peers(short_tmp: Path) -> None:
    """A plain endpoint on the named backing of a server with --format: peers follows the
    server's joins and leaves."""
    region = str(short_tmp / "region")
    args = ["--file", region, "--format"]
    with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=args) as server:
        a = ivshmem.connect(server.socket_path)
        b = ivshmem.connect(server.socket_path)
        with ivshmem.open_region(region, id=1000) as plain:
            assert plain.peers == frozenset({a.id, b.id})
            b.close()
            end = time.monotonic() + 10
            while plain.peers != frozenset({a.id}):
                assert time.monotonic() < end, plain.peers
                time.sleep(0.01)
        a.close()

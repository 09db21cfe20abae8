"""The server's membership table in a formatted region, and the membership vector."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import Membership, Region, is_formatted


def test_formatted_region_lists_peers_as_they_come_and_go(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=2, extra_args=["--format"]) as server:
        a = ivshmem.connect(server.socket_path, vectors=2)
        try:
            assert is_formatted(a.memory)
            table = Membership(a.memory)
            # Listed before its handshake was sent: no waiting needed.
            assert table.peers() == {a.id}
            with ivshmem.connect(server.socket_path, vectors=2) as b:
                assert Membership(b.memory).peers() == {a.id, b.id}
                generation = table.generation
            server.wait_until(lambda: table.peers() == {a.id}, what="b unlisted")
            assert table.generation > generation
            status = server.status()["membership"]
            assert status["listed"] == [a.id]
        finally:
            a.close()


def test_membership_vector_rings_the_others_on_join_and_leave(short_tmp: Path) -> None:
    args = ["--format", "--membership-vector", "1"]
    with ServerProcess(short_tmp, size="1M", vectors=2, extra_args=args) as server:
        with ivshmem.connect(server.socket_path, vectors=2) as a:
            assert a.wait(1, timeout=0.2) is None  # nobody else yet: no ring
            with ivshmem.connect(server.socket_path, vectors=2) as b:
                assert a.wait(1, timeout=10) == 1  # b joined
                assert b.wait(1, timeout=0.2) is None  # the joiner itself is not rung
            assert a.wait(1, timeout=10) == 1  # b left
            assert Membership(a.memory).peers() == {a.id}


def test_table_is_emptied_at_shutdown_and_content_kept_across_restart(short_tmp: Path) -> None:
    name = f"ivt-membership-{os.getpid()}"
    args = ["-M", name, "--format"]
    try:
        with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=args) as server:
            with ivshmem.connect(server.socket_path, vectors=1) as peer:
                user_offset = peer.size - 4096  # inside the last arena, away from headers
                peer.memory[user_offset : user_offset + 5] = b"kept!"
                format_id = bytes(peer.memory[24:32])
        region = ivshmem.open_region(f"shm:{name}")
        try:
            assert Membership(region.memory).peers() == frozenset()
        finally:
            region.close()
        with ServerProcess(short_tmp, size="1M", vectors=1, extra_args=args) as server:
            with ivshmem.connect(server.socket_path, vectors=1) as peer:
                assert bytes(peer.memory[user_offset : user_offset + 5]) == b"kept!"
                assert bytes(peer.memory[24:32]) == format_id  # not reformatted
                assert Membership(peer.memory).peers() == {peer.id}
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


def _server(short_tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Start the server command; it must refuse to start (else it is stopped and fails)."""
    cmd = [sys.executable, "-m", "ivshmem.cli.server", "-F", "-S", str(short_tmp / "s"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert "serving" not in proc.stderr
    return proc


@pytest.mark.parametrize("backing", ["-M", "--file"])
def test_restart_with_another_size_keeps_the_layout_or_reformats_on_request(
    short_tmp: Path, backing: str
) -> None:
    """A named region formatted for 1M, restarted with -l 2M: the server refuses before it
    grows anything (the layout records the size) and names both ways on; --reformat lays it
    out afresh for 2M; --max-peers differing from the kept layout is warned about."""
    name = f"ivt-reformat-{os.getpid()}"
    target = name if backing == "-M" else str(short_tmp / "region")
    path = Path("/dev/shm", name) if backing == "-M" else Path(target)
    try:
        with ServerProcess(short_tmp, size="1M", extra_args=[backing, target, "--format"]):
            pass
        first = Region(ivshmem.open_region(str(path)).memory)
        proc = _server(short_tmp, backing, target, "-l", "2M", "--format")
        assert proc.returncode == 1
        assert f"{path} ({backing}) carries a channel layout for 1M" in proc.stderr
        assert "start with -l 1M to keep its channels, or add --reformat" in proc.stderr
        assert path.stat().st_size == 1 << 20  # not grown
        # Same size, other --max-peers: the layout is kept, and that is said.
        extra = [backing, target, "--format", "--max-peers", "4"]
        with ServerProcess(short_tmp, size="1M", extra_args=extra) as server:
            assert "--max-peers 4 is not applied: the region keeps its layout for 16" in (
                server.log()
            )
        # --reformat (which implies --format) grows the region and lays it out afresh.
        extra = [backing, target, "--reformat", "--max-peers", "4"]
        with ServerProcess(short_tmp, size="2M", extra_args=extra) as server:
            assert "reformatted the region for 4 peers" in server.log()
            with ivshmem.connect(server.socket_path) as peer:
                region = Region(peer.memory)
                assert (region.size, region.max_peers) == (2 << 20, 4)
                assert region.format_id != first.format_id
                assert Membership(peer.memory).peers() == {peer.id}
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda page: struct.pack_into("<I", page, 8, 7), "layout of version 7; this server"),
        (lambda page: struct.pack_into("<I", page, 32, 0), "max_peers"),
    ],
    ids=["other-version", "corrupted-header"],
)
def test_an_unusable_layout_is_refused_until_reformat(
    short_tmp: Path, edit: Any, message: str
) -> None:
    name = f"ivt-badlayout-{os.getpid()}"
    path = Path("/dev/shm", name)
    try:
        with ServerProcess(short_tmp, size="1M", extra_args=["-M", name, "--format"]):
            pass
        with path.open("r+b") as f:
            page = bytearray(f.read(4096))
            edit(page)
            f.seek(0)
            f.write(page)
        proc = _server(short_tmp, "-M", name, "-l", "1M", "--format")
        assert proc.returncode == 1
        assert message in proc.stderr and "add --reformat" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        extra = ["-M", name, "--reformat"]
        with ServerProcess(short_tmp, size="1M", extra_args=extra) as server:
            with ivshmem.connect(server.socket_path) as peer:
                assert Region(peer.memory).max_peers == 16
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--membership-vector", "0"], "needs the membership table"),
        (["--format", "--membership-vector", "2"], "membership vector 2 does not exist"),
        (["--reformat", "--membership-vector", "2"], "membership vector 2 does not exist"),
    ],
)
def test_bad_membership_options_are_refused(short_tmp: Path, args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "ivshmem.cli.server", "-F", "-S", str(short_tmp / "s")]
    proc = subprocess.run(
        [*cmd, "--memfd", "-n", "2", *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert message in proc.stderr

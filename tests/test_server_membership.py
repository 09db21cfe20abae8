"""The server's membership table in a formatted region, and the membership vector."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import Membership, is_formatted


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--membership-vector", "0"], "needs the membership table"),
        (["--format", "--membership-vector", "2"], "membership vector 2 does not exist"),
    ],
)
def test_bad_membership_options_are_refused(short_tmp: Path, args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "ivshmem.cli.server", "-F", "-S", str(short_tmp / "s")]
    proc = subprocess.run(
        [*cmd, "--memfd", "-n", "2", *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert message in proc.stderr

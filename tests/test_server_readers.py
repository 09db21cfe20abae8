"""The server's one epoll set over client sockets (ivshmem.server.readers).

The set on its own, over real socketpairs: it hands over only ready clients, at most
``maxevents`` per call with the rest at the next, never a client dropped earlier in the same
batch, and its fd is closed by close(). Then the server around it: a real server process whose
many clients leave at once, a client that sends data, and an in-process server whose fds are
all closed after it stops.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import RawPeer, ServerProcess, pump_all

from ivshmem.errors import UsageError
from ivshmem.protocol import PeerLeft
from ivshmem.server import Server, ServerConfig, run
from ivshmem.server.readers import ClientReaders, refusal


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def is_epoll(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"
    except FileNotFoundError:
        return False


class Pair:
    """A watched socket (the server's end) and the client's end of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server, self.client = socket.socketpair()
        self.server.setblocking(False)

    def move_to(self, number: int) -> None:
        """Give the server's end that (free) number, as the kernel gives the lowest."""
        os.dup2(self.server.fileno(), number, inheritable=False)
        self.server.close()
        self.server = socket.socket(fileno=number)

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    made = [Pair(f"c{i}") for i in range(10)]
    yield made
    for pair in made:
        pair.close()


def test_only_ready_clients_are_handed_over(pairs: list[Pair]) -> None:
    seen: list[str] = []
    readers: ClientReaders[Pair] = ClientReaders(lambda p: seen.append(p.name))
    try:
        for pair in pairs:
            readers.add(pair.server.fileno(), pair)
        readers.dispatch()
        assert seen == []  # nothing to read anywhere: nobody handed over
        pairs[3].client.close()  # a leave (EOF)
        pairs[5].client.send(b"x")  # a client that sends data
        readers.dispatch()
        assert sorted(seen) == ["c3", "c5"]
        # Level-triggered: still ready, handed over again until the owner drops them.
        seen.clear()
        readers.dispatch()
        assert sorted(seen) == ["c3", "c5"]
        for pair in (pairs[3], pairs[5]):
            readers.discard(pair.server.fileno(), pair)
        seen.clear()
        readers.dispatch()
        assert seen == []
        assert len(readers) == 8
    finally:
        readers.close()


def test_a_storm_is_taken_maxevents_at_a_time(pairs: list[Pair]) -> None:
    seen: list[str] = []

    def leave(pair: Pair) -> None:
        seen.append(pair.name)
        readers.discard(pair.server.fileno(), pair)  # what the server's drop does
        pair.server.close()

    readers: ClientReaders[Pair] = ClientReaders(leave, maxevents=4)
    try:
        for pair in pairs:
            readers.add(pair.server.fileno(), pair)
        for pair in pairs:
            pair.client.close()
        batches = []
        while len(seen) < len(pairs):
            before = len(seen)
            readers.dispatch()
            batches.append(len(seen) - before)
            assert len(batches) <= 3, batches
        assert batches == [4, 4, 2]
        assert sorted(seen) == sorted(p.name for p in pairs)
        assert len(readers) == 0
    finally:
        readers.close()


def test_a_client_dropped_earlier_in_the_batch_is_not_handed_over(pairs: list[Pair]) -> None:
    """Every client leaves at once, and the first one handled drops all the others (as a
    leave's fan-out can disconnect clients past their queue bound) and takes the first freed
    number for a new client that has nothing to read: no dropped client is handed over, and
    the new one at worst finds nothing to read."""
    handed: list[Pair] = []
    newcomer: list[Pair] = []
    fresh = Pair("new")  # made beforehand, so that only its server's end takes the number

    def on_readable(pair: Pair) -> None:
        handed.append(pair)
        if len(handed) > 1:
            return
        for other in pairs:
            if other is not pair:
                number = other.server.fileno()
                readers.discard(number, other)
                other.server.close()
                if not newcomer:  # the number is free: a new client gets it
                    fresh.move_to(number)
                    readers.add(number, fresh)
                    newcomer.append(fresh)

    readers: ClientReaders[Pair] = ClientReaders(on_readable)
    try:
        for pair in pairs:
            readers.add(pair.server.fileno(), pair)
        for pair in pairs:
            pair.client.close()
        readers.dispatch()
        assert handed[0] in pairs
        assert all(p is handed[0] or p is newcomer[0] for p in handed), [p.name for p in handed]
        with pytest.raises(BlockingIOError):  # why a handed-over newcomer is harmless
            newcomer[0].server.recv(1, socket.MSG_PEEK)
    finally:
        readers.close()
        fresh.close()


def test_a_failing_handler_does_not_cost_the_rest_of_the_batch(
    pairs: list[Pair], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def on_readable(pair: Pair) -> None:
        seen.append(pair.name)
        if pair.name == "c0":
            raise RuntimeError("a bug")

    readers: ClientReaders[Pair] = ClientReaders(on_readable)
    try:
        for pair in pairs[:4]:
            readers.add(pair.server.fileno(), pair)
            pair.client.close()
        with caplog.at_level(logging.ERROR, logger="ivshmem.server"):
            readers.dispatch()
        assert sorted(seen) == ["c0", "c1", "c2", "c3"]
        assert "unexpected error while handling a client's socket" in caplog.text
        assert "RuntimeError: a bug" in caplog.text
    finally:
        readers.close()


def test_close_closes_the_epoll_fd_and_is_idempotent(pairs: list[Pair]) -> None:
    pairs[0].client.close()  # ready to read: nothing may hand it over after close()
    before = open_fds()
    seen: list[Pair] = []
    readers: ClientReaders[Pair] = ClientReaders(seen.append)
    number = readers.fileno()
    assert is_epoll(number)
    readers.add(pairs[0].server.fileno(), pairs[0])
    readers.close()
    readers.close()
    assert readers.closed and len(readers) == 0
    assert open_fds() == before
    readers.dispatch()  # nothing touches the closed set, nothing is handed over
    readers.discard(pairs[0].server.fileno(), pairs[0])
    assert seen == []
    with pytest.raises(ValueError, match="closed"):
        readers.fileno()
    with pytest.raises(ValueError, match="closed"):
        readers.add(pairs[1].server.fileno(), pairs[1])


def test_an_fd_the_kernel_will_not_watch_is_refused_with_a_reason() -> None:
    readers: ClientReaders[str] = ClientReaders(lambda _c: None)
    try:
        with tempfile.TemporaryFile() as f:  # regular files cannot be polled
            with pytest.raises(OSError) as caught:
                readers.add(f.fileno(), "file")
        assert caught.value.errno == errno.EPERM
        assert "epoll_ctl failed" in refusal(caught.value)
        assert "max_user_watches" in refusal(OSError(errno.ENOSPC, "No space left on device"))
        assert len(readers) == 0
    finally:
        readers.close()
    with pytest.raises(UsageError, match="maxevents"):
        ClientReaders(lambda _c: None, maxevents=0)


# --------------------------------------------------------------------------------------------
# The server around it


def test_a_hundred_clients_leaving_at_once_are_all_heard(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=2) as server:
        baseline = server.fd_count()
        survivors = [RawPeer(server.socket_path) for _ in range(3)]
        leavers = [RawPeer(server.socket_path) for _ in range(100)]
        everyone = survivors + leavers
        ids = set(range(len(everyone)))
        pump_all(everyone, lambda: all(p.complete(ids - {p.id}, 2) for p in everyone))
        for peer in leavers:
            peer.close()
        kept = {p.id for p in survivors if p.id is not None}
        pump_all(survivors, lambda: all(p.complete(kept - {p.id}, 2) for p in survivors))
        left = sum(1 for p in survivors for e in p.events if isinstance(e, PeerLeft))
        assert left == 3 * 100  # every survivor heard every leave, once
        assert server.status()["counters"]["leaves"] == 100
        assert set(server.peer_ids()) == kept
        for peer in survivors:
            peer.close()
        server.wait_for_fd_count(baseline)
        assert "WARNING" not in server.log()


def test_a_client_that_sends_data_is_still_disconnected_with_a_warning(
    short_tmp: Path,
) -> None:
    with ServerProcess(short_tmp) as server:
        baseline = server.fd_count()
        good = RawPeer(server.socket_path)
        quiet = [RawPeer(server.socket_path) for _ in range(5)]
        bad = RawPeer(server.socket_path)
        everyone = [good, *quiet, bad]
        pump_all(everyone, lambda: all(p.complete(set(range(7)) - {p.id}, 1) for p in everyone))
        bad.sock.send(b"not a protocol")
        bad.wait_eof()
        good.wait(lambda: good.complete(set(range(1, 6)), 1))
        # The line is logged just after the leave went out: it may trail what good read.
        server.wait_until(lambda: "sent data" in server.log(), what="the warning")
        line = next(x for x in server.log().splitlines() if "sent data" in x)
        assert "WARNING" in line and f"peer {bad.id}" in line
        assert server.status()["counters"]["clients_sent_data"] == 1
        for peer in everyone:
            peer.close()
        server.wait_for_fd_count(baseline)


def test_an_in_process_server_closes_its_epoll_fd_when_it_stops(short_tmp: Path) -> None:
    before = open_fds()
    config = ServerConfig(socket_path=str(short_tmp / "s"), backing="memfd", size=4096)
    server = Server(config)
    server.open()  # the socket exists once this returns; serve() makes the epoll set
    thread = threading.Thread(target=run, args=(server,))
    thread.start()
    try:
        a = RawPeer(config.socket_path)
        a.wait(lambda: a.complete(set(), 1))
        b = RawPeer(config.socket_path)
        b.wait(lambda: b.complete({0}, 1))
        readers = server._readers
        assert readers is not None and len(readers) == 2
        number = readers.fileno()
        assert is_epoll(number)
        b.close()
        a.wait(lambda: a.complete(set(), 1))
        # The leave is sent before the leaver's socket is closed: wait for the close.
        deadline = time.monotonic() + 10
        while len(readers) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(readers) == 1  # the leaver's entry went with its socket
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
    a.wait_eof()  # the server hung up on the one still connected
    a.close()
    assert server._readers is None and readers.closed
    assert open_fds() == before  # the epoll set, the loop's and every client's fd: all closed


def test_a_client_whose_socket_cannot_be_watched_is_refused_with_a_reason(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If the kernel will not watch a client's socket (ENOSPC past fs.epoll.max_user_watches,
    ENOMEM), that client is refused and the server goes on. Made real here by putting
    /dev/null under the epoll set's fd number, so every epoll_ctl on it fails (EINVAL)."""
    before = open_fds()
    config = ServerConfig(socket_path=str(short_tmp / "s"), backing="memfd", size=4096)
    server = Server(config)
    server.open()
    thread = threading.Thread(target=run, args=(server,))
    with caplog.at_level(logging.INFO, logger="ivshmem.server"):
        thread.start()
        try:
            a = RawPeer(config.socket_path)
            a.wait(lambda: a.complete(set(), 1))
            readers = server._readers
            assert readers is not None
            with open("/dev/null") as devnull:
                os.dup2(devnull.fileno(), readers.fileno())
            b = RawPeer(config.socket_path)
            b.wait_eof()  # refused before anything was sent to it
            assert b.messages == 0
            b.close()
            deadline = time.monotonic() + 10
            while "cannot watch its socket" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.status()["counters"]["clients_refused"] == 1
            assert server.peers == frozenset({0})
            a.pump()
            assert a.complete(set(), 1) and not a.eof  # it never heard of b
        finally:
            server.stop()
            thread.join(10)
    assert not thread.is_alive()
    a.wait_eof()
    a.close()
    line = next(x for x in caplog.text.splitlines() if "cannot watch its socket" in x)
    assert "WARNING" in line and "epoll_ctl failed: Invalid argument" in line
    assert open_fds() == before  # its eventfds and socket, and the set's number: all closed

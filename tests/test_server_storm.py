"""The server under churn: a connection storm beside peers that read, a process flooding
connections, and how departures are logged (issue 9, items 2 and 5)."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from pathlib import Path

from serverproc import RawPeer, ServerProcess

import ivshmem


def _reader_child(path: str, ready: int, stop: int, others: tuple[int, ...]) -> int:
    """Fork a peer that reads its socket all the time until ``stop`` is readable (at EOF);
    it exits 0 if the server never hung up on it, 1 if it did. ``others``: the parent's
    pipe ends, which the child closes."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            for fd in others:
                os.close(fd)
            peer = RawPeer(path)
            peer.wait(lambda: peer.state.own_vectors == 1)
            os.write(ready, b"x")
            poll = select.epoll()
            poll.register(peer.fileno(), select.EPOLLIN)
            poll.register(stop, select.EPOLLIN)
            while not peer.eof:
                events = poll.poll(1.0)
                if any(fd == stop for fd, _ in events):
                    code = 0
                    break
                peer.pump()
        finally:
            os._exit(code)
    return pid


def _storm_child(path: str, seconds: float, others: tuple[int, ...]) -> int:
    """Fork a process that connects and closes as fast as it can for ``seconds``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            for fd in others:
                os.close(fd)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                sock = socket.socket(socket.AF_UNIX)
                try:
                    sock.connect(path)
                except OSError:
                    pass
                sock.close()
        finally:
            os._exit(0)
    return pid


def test_readers_are_not_dropped_by_a_connection_storm(short_tmp: Path) -> None:
    """Three peers that read all the time, while one process connects and closes as fast as
    it can: none of them is disconnected, even with a small --max-queue. A join whose leave
    follows it while both are still queued costs them nothing, and "not reading" means
    reading nothing, not a long queue."""
    with ServerProcess(short_tmp, vectors=1, extra_args=["--max-queue", "20"]) as server:
        baseline = server.fd_count()
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        readers = [
            _reader_child(server.socket_path, ready_w, stop_r, (ready_r, stop_w)) for _ in range(3)
        ]
        try:
            for _ in readers:
                assert os.read(ready_r, 1) == b"x"
            storm = _storm_child(server.socket_path, 4.0, (ready_r, ready_w, stop_r, stop_w))
            os.waitpid(storm, 0)
            server.wait_until(
                lambda: server.status()["counters"]["peers"] == 3, timeout=60, what="the storm"
            )
        finally:
            os.close(stop_w)  # the readers see EOF on the pipe and stop
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in readers]
            for fd in (ready_r, ready_w, stop_r):
                os.close(fd)
        counters = server.status()["counters"]
        assert counters["joins"] > 200, "the storm did not happen"
        assert codes == [0, 0, 0], server.log()[-3000:]
        assert counters["slow_clients_dropped"] == 0
        assert counters["queue_budget_drops"] == 0
        assert "not reading" not in server.log()
        server.wait_for_fd_count(baseline)


def _flooder_child(path: str, count: int, ready: int) -> int:
    """Fork a process that opens ``count`` connections, reads none of them, and holds them
    until it is killed. Returns its pid once they are all connected."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            socks = []
            for _ in range(count):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                socks.append(sock)
            os.write(ready, b"x")
            time.sleep(120)
        finally:
            os._exit(0)
    return pid


def test_one_process_flooding_connections_waits_and_others_join(short_tmp: Path) -> None:
    """A process that opens many connections and reads none of their handshakes has at most
    --max-pending of them unsent; the rest wait (logged once), and another process still
    joins at once. When the flooder goes, its waiting connections never join."""
    args = ["--max-pending", "4"]
    with ServerProcess(short_tmp, vectors=16, extra_args=args) as server:
        baseline = server.fd_count()
        ready_r, ready_w = os.pipe()
        # 16 vectors: from the ~18th peer on, a handshake does not fit in a socket buffer.
        flooder = _flooder_child(server.socket_path, 60, ready_w)
        try:
            assert os.read(ready_r, 1) == b"x"
            server.wait_until(
                lambda: server.status()["limits"]["clients_waiting"] > 0,
                timeout=30,
                what="the flooder's connections to wait",
            )
            with RawPeer(server.socket_path) as honest:
                honest.wait(lambda: honest.state.own_vectors == 16, timeout=30)
                status = server.status()
                assert status["limits"]["clients_waiting"] > 0  # the flooder's still wait
                joined = status["counters"]["joins"]
                assert joined < 60 + 1
            lines = [line for line in server.log().splitlines() if "it has not read" in line]
            assert len(lines) == 1, lines
            assert f"pid {flooder} " in lines[0] and "--max-pending 4" in lines[0]
        finally:
            os.kill(flooder, signal.SIGKILL)
            os.waitpid(flooder, 0)
            os.close(ready_r)
            os.close(ready_w)
        server.wait_until(
            lambda: (
                server.status()["limits"]["clients_waiting"] == 0
                and server.status()["counters"]["peers"] == 0
            ),
            timeout=30,
            what="the flooder's connections to go",
        )
        assert server.status()["counters"]["joins"] == joined  # none of the waiting joined
        assert f"pid {flooder} (uid" in server.log().split("no connection waiting any more")[0]
        server.wait_for_fd_count(baseline)


def test_client_that_closed_during_a_flood_left_and_is_no_warning(short_tmp: Path) -> None:
    """A client whose queue passes the bound because it closed (and so reads no more) is
    logged as having left, at INFO -- not as a client that is not reading."""
    with ServerProcess(short_tmp, vectors=4, extra_args=["--max-queue", "10"]) as server:
        baseline = server.fd_count()
        sleeper = RawPeer(server.socket_path)
        visitors = []
        for _ in range(80):  # their joins fill the sleeper's socket
            visitor = RawPeer(server.socket_path)
            visitor.wait(lambda v=visitor: v.state.own_vectors == 4)  # type: ignore[misc]
            visitors.append(visitor)
        sleeper.pump(8)  # it read a little a moment ago: it is not "not reading"
        for visitor in visitors:  # their leaves pass the sleeper's bound...
            visitor.close()
        sleeper.close()  # ... and the sleeper goes
        server.wait_until(
            lambda: server.status()["counters"]["peers"] == 0, timeout=30, what="everyone left"
        )
        log = server.log()
        assert "not reading" not in log
        assert "WARNING" not in log
        assert "peer 0 (pid" in log and "left" in log.split("peer 0 (pid")[-1].split("\n")[0]
        assert server.status()["counters"]["slow_clients_dropped"] == 0
        server.wait_for_fd_count(baseline)


def test_host_peer_exiting_without_close_is_a_leave(short_tmp: Path) -> None:
    """A host peer whose process exits without close(), with messages unread (the kernel
    then resets the connection), is logged as a leave, not as a broken connection."""
    with ServerProcess(short_tmp, vectors=1) as server:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                peer = ivshmem.connect(server.socket_path, timeout=10)
                os.write(ready_w, str(peer.id).encode())
                os.read(go_r, 1)  # another peer joined meanwhile: its messages are unread
            finally:
                os._exit(0)  # no close()
        try:
            child_id = int(os.read(ready_r, 16))
            other = RawPeer(server.socket_path)
            other.wait(lambda: other.complete({child_id}, 1))
            os.write(go_w, b"x")
            os.waitpid(pid, 0)
            other.wait(lambda: other.complete(set(), 1))
        finally:
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)

        def lines() -> list[str]:
            return [line for line in server.log().splitlines() if f"peer {child_id} (pid" in line]

        # The line is written once the leave is announced: the other peer may be first.
        server.wait_until(lambda: len(lines()) == 1, what="the leave's log line")
        line = lines()[0]
        assert "left" in line and "connection broke" not in line, line
        other.close()

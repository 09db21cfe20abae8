"""ivshmem-server as a real process, with real sockets, eventfds and shared memory.

Clients are :class:`serverproc.RawPeer` (protocol.Decoder + ClientState over a socket), so a
failure here is the server's. After clients come and go, the server's open fd count must be
back at its baseline (``/proc/PID/fd``).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import require
from serverproc import (
    RawPeer,
    ServerProcess,
    fork_client,
    membership_settled,
    pump_all,
    wait_gone,
)

from ivshmem.server import (
    Server,
    ServerConfig,
    client_allowed,
    peer_credentials,
    peer_groups,
    query_status,
    sd_notify,
)

SERVER = [sys.executable, "-m", "ivshmem.cli.server"]


def ring(sender: RawPeer, peer: int, vector: int) -> None:
    os.eventfd_write(sender.peer_fds[peer][vector], 1)


def rung(receiver: RawPeer, vector: int, timeout: float = 5.0) -> bool:
    fd = receiver.own_fds[vector]
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return False
    return os.eventfd_read(fd) >= 1


def connect_all(path: str, count: int, keep_fds: bool = False) -> list[RawPeer]:
    return [RawPeer(path, keep_fds=keep_fds) for _ in range(count)]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_consistent(server: ServerProcess, survivors: list[RawPeer], baseline: int) -> None:
    """Wait until the server's membership, every survivor's view and the server's fd count
    agree. Survivors are drained as we go: messages still queued for them in the server
    rightly keep departed peers' eventfds open there until sent."""

    def settled() -> bool:
        for peer in survivors:
            peer.pump()
            assert not peer.eof, "the server hung up on a survivor"
        return membership_settled(server, survivors, baseline)

    try:
        server.wait_until(settled, timeout=30, what="membership and fds to settle")
    except AssertionError:
        raise AssertionError(
            f"server peers {server.peer_ids()}, survivors' views "
            f"{[(p.id, sorted(p.peers)) for p in survivors]}, fds {server.fd_count()} "
            f"(baseline {baseline})\n{server.log()[-3000:]}"
        ) from None
    assert server.alive


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"ivshmem-test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{name}")


# --------------------------------------------------------------------------------------------
# The protocol, end to end


def test_handshake_membership_doorbells_and_memory(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=2) as server:
        baseline = server.fd_count()
        a = RawPeer(server.socket_path, keep_fds=True)
        a.wait(lambda: a.complete(set(), 2))
        b = RawPeer(server.socket_path, keep_fds=True)
        c = RawPeer(server.socket_path, keep_fds=True)
        for peer in (a, b, c):
            peer.wait(lambda p=peer: p.complete({0, 1, 2} - {p.id}, 2))  # type: ignore[misc]
        assert (a.id, b.id, c.id) == (0, 1, 2)
        assert server.peer_ids() == [0, 1, 2]

        # Ringing a peer's vector through the fd the server handed out reaches that peer.
        ring(a, 1, 1)
        assert rung(b, 1)
        ring(c, 0, 0)
        assert rung(a, 0)

        # Everyone got the same memory, of the requested size.
        assert a.shm_fd is not None and b.shm_fd is not None
        assert os.fstat(a.shm_fd).st_size == 1 << 20
        with mmap.mmap(a.shm_fd, 1 << 20) as ma, mmap.mmap(b.shm_fd, 1 << 20) as mb:
            ma[4096:4101] = b"hello"
            assert mb[4096:4101] == b"hello"

        b.close()
        a.wait(lambda: set(a.peers) == {2})
        c.wait(lambda: set(c.peers) == {0})
        d = RawPeer(server.socket_path)
        d.wait(lambda: d.complete({0, 2}, 2))
        assert d.id == 3  # monotonic: the id of a departed peer is not reused at once
        for peer in (a, c, d):
            peer.close()
        server.wait_for_fd_count(baseline)
        assert "peer 1 (pid" in server.log() and "left" in server.log()


def test_200_peers_with_4_vectors_all_complete(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=4) as server:
        baseline = server.fd_count()
        peers = connect_all(server.socket_path, 200)
        try:
            ids = set(range(200))
            pump_all(
                peers,
                lambda: all(p.id is not None and p.complete(ids - {p.id}, 4) for p in peers),
            )
            assert sorted(p.id for p in peers if p.id is not None) == sorted(ids)
            counters = server.status()["counters"]
            assert counters["peers"] == 200
            # 3 fixed + 4 own + 4 per other peer, for every peer.
            assert counters["messages_sent"] == sum(3 + 4 + 4 * 199 for _ in peers)
        finally:
            for peer in peers:
                peer.close()
        server.wait_for_fd_count(baseline)


def test_status_reports_peers_queues_and_counters(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="64K", vectors=3) as server:
        with RawPeer(server.socket_path) as a, RawPeer(server.socket_path) as b:
            for p in (a, b):
                p.wait(lambda p=p: p.complete({0, 1} - {p.id}, 3))  # type: ignore[misc]
            status = server.status()
            assert status["server"]["pid"] == server.pid
            assert status["server"]["socket"] == server.socket_path
            assert status["shared_memory"] == {
                "backing": "memfd",
                "path": None,
                "size": 65536,
                "sealed": True,  # region branch: a memfd is sealed at its size
                "size_restores": 0,
            }
            assert status["vectors"] == 3
            assert [(p["id"], p["pid"], p["queued"]) for p in status["peers"]] == [
                (0, os.getpid(), 0),
                (1, os.getpid(), 0),
            ]
            assert status["peers"][0]["sent"] == 3 + 3 + 3  # fixed, own, b's join
            assert status["counters"]["joins"] == 2
            assert status["counters"]["clients_refused"] == 0
        server.wait_until(lambda: server.status()["counters"]["leaves"] == 2, what="leaves")
        # The CLI prints the same document.
        result = run_cli("-S", server.socket_path, "--status")
        assert result.returncode == 0, result.stderr
        assert '"leaves": 2' in result.stdout
        assert query_status(server.status_path)["counters"]["peers"] == 0


def test_ids_wrap_past_65535_skipping_ids_in_use(short_tmp: Path) -> None:
    """A full turn of the 16-bit id space against a real server: once the allocator comes
    round again, the ids still held are skipped."""
    with ServerProcess(short_tmp, extra_args=["--first-id", "65534"]) as server:
        keepers: list[RawPeer] = []
        for expected in (65534, 65535, 0, 1):  # the first wrap, past 65535 to 0
            peer = RawPeer(server.socket_path)
            peer.wait(lambda p=peer: p.id is not None)  # type: ignore[misc]
            assert peer.id == expected
            keepers.append(peer)
        baseline = server.fd_count()
        # Walk the allocator through every other id, 2..65533: each client joins and leaves.
        churn = 65534 - 2
        for i in range(churn):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(server.socket_path)
            if i % 16 == 0:
                # Each visitor means 2 messages for every keeper. Reading only what the
                # socket holds (~278 messages) every few hundred visitors falls behind, and
                # a keeper that falls 16384 messages behind is rightly dropped as slow.
                for peer in keepers:
                    peer.pump()

        # The last visitors may still wait in the listen backlog (membership can look
        # settled before they are accepted).
        def all_gone() -> bool:
            for peer in keepers:
                peer.pump()
            return bool(server.status()["counters"]["leaves"] == churn)

        server.wait_until(all_gone, timeout=120, what="every visitor to be accepted and gone")
        assert_consistent(server, keepers, baseline)
        counters = server.status()["counters"]
        assert (counters["joins"], counters["leaves"]) == (4 + churn, churn)
        # The allocator stands at 65534 again: 65534, 65535, 0 and 1 are taken.
        late = RawPeer(server.socket_path)
        late.wait(lambda: late.complete({65534, 65535, 0, 1}, 1))
        assert late.id == 2
        assert_consistent(server, [*keepers, late], baseline + 2)
        for peer in [*keepers, late]:
            peer.close()


# --------------------------------------------------------------------------------------------
# Misbehaving clients


def test_client_sending_bytes_is_disconnected_and_others_see_it_leave(short_tmp: Path) -> None:
    with ServerProcess(short_tmp) as server:
        baseline = server.fd_count()
        good = RawPeer(server.socket_path)
        bad = RawPeer(server.socket_path)
        good.wait(lambda: good.complete({1}, 1))
        bad.sock.send(b"hello server")
        bad.wait_eof()
        good.wait(lambda: good.complete(set(), 1))
        bad.close()
        good.close()
        server.wait_for_fd_count(baseline)
        assert "sent data, which ivshmem clients never do" in server.log()
        assert server.status()["counters"]["clients_sent_data"] == 1


def test_connect_then_close_at_once_does_not_hurt(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=2) as server:
        baseline = server.fd_count()
        survivor = RawPeer(server.socket_path)
        for _ in range(50):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(server.socket_path)
            sock.close()
        # Each quick client joined and left: the survivor saw balanced joins and leaves.
        server.wait_until(lambda: server.status()["counters"]["leaves"] == 50, what="leaves")
        survivor.wait(lambda: survivor.complete(set(), 2))
        late = RawPeer(server.socket_path)
        late.wait(lambda: late.complete({survivor.id}, 2))  # type: ignore[arg-type]
        survivor.close()
        late.close()
        server.wait_for_fd_count(baseline)


def test_client_that_never_reads_gets_everything_once_it_does(short_tmp: Path) -> None:
    """Far more messages than a socket buffer holds (QEMU's server loses them from ~278):
    queued, none lost, delivered in order when the client finally reads. (The visitors stay
    until the sleeper has read their joins: a join still queued when its peer leaves is
    dropped together with the leave, see the collapse test below.)"""
    with ServerProcess(short_tmp, vectors=4) as server:
        sleeper = RawPeer(server.socket_path)
        server.wait_until(lambda: server.status()["counters"]["peers"] == 1, what="the join")
        baseline = server.fd_count()
        cycles = 150  # 150 joins x 4 vectors, then 150 leaves
        visitors = []
        for _ in range(cycles):
            visitor = RawPeer(server.socket_path)
            visitor.wait(lambda v=visitor: v.state.own_vectors == 4)  # type: ignore[misc]
            visitors.append(visitor)
        server.wait_until(lambda: server.status()["counters"]["joins"] == cycles + 1, what="joins")
        queued = server.status()["peers"][0]["queued"]
        assert queued > 0, "the test did not outrun the socket buffer"
        ids = {v.id for v in visitors}
        sleeper.wait(lambda: sleeper.complete(ids, 4), timeout=30)  # type: ignore[arg-type]
        for visitor in visitors:
            visitor.close()
        sleeper.wait(lambda: sleeper.messages == 3 + 4 + cycles * 5, timeout=30)
        assert sleeper.complete(set(), 4)
        assert_consistent(server, [sleeper], baseline)
        assert server.status()["peers"][0]["queued"] == 0
        assert server.status()["counters"]["joins_collapsed"] == 0
        sleeper.close()


def test_join_and_leave_both_unsent_cost_a_slow_reader_nothing(short_tmp: Path) -> None:
    """A peer that joins and leaves while a slow client's queue still holds the whole join:
    both the join's messages and the leave are dropped from that queue, and the join's
    eventfds are closed at once (the server's fds are back at baseline while the client still
    has not read); the client, reading at last, sees a consistent world."""
    with ServerProcess(short_tmp, vectors=4) as server:
        sleeper = RawPeer(server.socket_path)
        server.wait_until(lambda: server.status()["counters"]["peers"] == 1, what="the join")
        baseline = server.fd_count()
        cycles = 300  # 300 x (4 vector messages + 1 leave): five socket buffers' worth
        for _ in range(cycles):
            with RawPeer(server.socket_path) as visitor:
                visitor.wait(lambda v=visitor: v.state.own_vectors == 4)  # type: ignore[misc]
        server.wait_until(lambda: server.status()["counters"]["leaves"] == cycles, what="leaves")
        status = server.status()
        collapsed = status["counters"]["joins_collapsed"]
        assert collapsed > cycles // 2, collapsed
        # Nothing of the collapsed visitors is queued and none of their eventfds is open:
        # what is queued is the leaves of the visitors whose joins had gone out (and the
        # rest of at most one join that went out in part, holding up to 3 eventfds).
        assert status["peers"][0]["queued"] <= cycles - collapsed + 3
        assert server.fd_count() <= baseline + 3
        sleeper.wait(lambda: sleeper.messages == 3 + 4 + (cycles - collapsed) * 5, timeout=30)
        assert sleeper.complete(set(), 4)
        assert_consistent(server, [sleeper], baseline)
        sleeper.close()


def test_client_past_the_queue_bound_is_disconnected_with_a_reason(short_tmp: Path) -> None:
    """A client that reads nothing while its queue passes the bound is disconnected once the
    kernel has taken none of its messages for a second; the reader beside it, which reads,
    is not. (80 visitors join -- the sleeper's socket fills with their joins -- and then
    leave: their leaves queue for the sleeper, past the bound.)"""
    with ServerProcess(short_tmp, vectors=4, extra_args=["--max-queue", "10"]) as server:
        baseline = server.fd_count()
        sleeper = RawPeer(server.socket_path)
        reader = RawPeer(server.socket_path)
        reader.wait(lambda: reader.complete({0}, 4))
        visitors = []
        for _ in range(80):
            visitor = RawPeer(server.socket_path)
            visitor.wait(lambda v=visitor: v.state.own_vectors == 4)  # type: ignore[misc]
            visitors.append(visitor)
            reader.pump()
        for visitor in visitors:
            visitor.close()
        server.wait_until(
            lambda: reader.pump() >= 0 and server.status()["counters"]["slow_clients_dropped"],
            timeout=30,
            what="the sleeper's disconnection",
        )
        assert server.status()["counters"]["slow_clients_dropped"] == 1
        log = server.log()
        assert "is not reading" in log and "--max-queue 10" in log
        assert "peer 0 (pid" in log.split("is not reading")[0].rsplit("\n", 1)[-1]
        # The reader, which kept up, lost nothing and saw the sleeper leave.
        reader.wait(lambda: reader.complete(set(), 4))
        # The sleeper gets what was in its socket buffer, then EOF -- no protocol error.
        sleeper.wait_eof()
        sleeper.close()
        reader.close()
        server.wait_for_fd_count(baseline)


def test_queues_past_the_total_bound_lose_their_longest(short_tmp: Path) -> None:
    """--max-queued-total bounds the messages queued for all clients together; past it the
    longest queue's client goes, with a log line, and everyone else goes on. (Visitors join
    and stay until the sleeper's socket is full of their joins, then leave: their leaves
    queue for it. A join still queued when its peer leaves would cost nothing.)"""
    args = ["--max-queued-total", "150"]
    with ServerProcess(short_tmp, vectors=1, extra_args=args) as server:
        baseline = server.fd_count()
        sleeper = RawPeer(server.socket_path)  # never reads
        reader = RawPeer(server.socket_path)
        reader.wait(lambda: reader.complete({0}, 1))
        visitors: list[RawPeer] = []
        for _ in range(270):
            visitor = RawPeer(server.socket_path)
            visitors.append(visitor)
            visitor.wait(lambda v=visitor: v.state.own_vectors == 1)  # type: ignore[misc]
            if len(visitors) % 16 == 0:
                for peer in [reader, *visitors]:
                    peer.pump()
        assert server.status()["counters"]["queue_budget_drops"] == 0
        for visitor in visitors:
            visitor.close()
        server.wait_until(
            lambda: reader.pump() >= 0 and server.status()["counters"]["queue_budget_drops"] > 0,
            timeout=30,
            what="the budget to be enforced",
        )
        counters = server.status()["counters"]
        assert counters["queue_budget_drops"] == 1
        assert counters["slow_clients_dropped"] == 0  # its own bound (16384) was never hit
        log = server.log()
        assert "past the bound of 150 (--max-queued-total)" in log
        assert "peer 0 (pid" in log.split("--max-queued-total")[0].rsplit("\n", 1)[-1]
        sleeper.wait_eof()
        sleeper.close()
        assert_consistent(server, [reader], baseline + 2)
        reader.close()
        assert server.status()["limits"]["max_queued_total"] == 150


def test_fd_limit_reached_mid_handshake_parks_clients_until_fds_free(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=4) as server:
        baseline = server.fd_count()
        first = RawPeer(server.socket_path)
        first.wait(lambda: first.complete(set(), 4))
        # Room for one more socket and 2 of its 4 eventfds: the next handshake runs out.
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (baseline + 5 + 3, 20000))
        try:
            waiting = RawPeer(server.socket_path)
            server.wait_until(lambda: "waits: cannot create its eventfds" in server.log())
            assert server.alive and first.complete(set(), 4)
            assert f"fds open, limit {baseline + 8})" in server.log()
            first.close()  # frees 5 fds: the waiting client can have its eventfds now
            waiting.wait(lambda: waiting.complete(set(), 4))
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (20000, 20000))
        later = RawPeer(server.socket_path)
        later.wait(lambda: later.complete({waiting.id}, 4))  # type: ignore[arg-type]
        assert_consistent(server, [waiting, later], baseline + 2 * 5)
        waiting.close()
        later.close()
        assert_consistent(server, [], baseline)
        assert server.log().count("file descriptors are available again") == 1


def test_out_of_fds_warns_once_answers_status_and_serves_everyone_after(
    short_tmp: Path,
) -> None:
    with ServerProcess(short_tmp, vectors=1) as server:
        survivor = RawPeer(server.socket_path)
        survivor.wait(lambda: survivor.complete(set(), 1))
        baseline = server.fd_count()
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (baseline, 20000))
        try:
            # A flood while the server has no fd to spare: everyone waits in the backlog.
            flood = connect_all(server.socket_path, 100)
            server.wait_until(lambda: "cannot accept clients" in server.log(), what="EMFILE")
            # The reserve fd answers status queries and counts the fds.
            status = server.status()
            assert status["limits"]["fd_shortage"] and status["limits"]["open_fds"] == baseline
            server.wait_until(
                lambda: server.status()["counters"]["accept_errors"] >= 4, what="retries"
            )
            log = server.log()
            assert log.count("cannot accept clients") == 1, log
            assert f"Too many open files ({baseline} fds open, limit {baseline})" in log
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (20000, 20000))
        everyone = [survivor, *flood]
        ids = set(range(101))
        pump_all(
            everyone,
            lambda: all(p.id is not None and p.complete(ids - {p.id}, 1) for p in everyone),
        )
        server.wait_until(lambda: "file descriptors are available again" in server.log())
        assert server.log().count("file descriptors are available again") == 1
        assert server.status()["counters"]["fd_shortages"] == 1
        assert_consistent(server, everyone, baseline + 2 * 100)
        for peer in flood:
            peer.close()
        assert_consistent(server, [survivor], baseline)
        survivor.close()


def test_clients_hoarding_fds_in_flight_are_dropped_so_others_complete(
    short_tmp: Path,
) -> None:
    """The kernel refuses to pass more fds (ETOOMANYREFS) once as many are in flight -- sent,
    not yet received -- as the sending user's open-file limit; root is exempt, so the server
    runs as nobody with a small limit. Clients that never read fill that budget; the server
    warns once, drops the ones holding the most, and a reading client then completes."""
    require(os.geteuid() == 0, "needs root to run the server as another user")
    short_tmp.chmod(0o777)
    with ServerProcess(short_tmp, run_as=(65534, 65534), nofile=48) as server:
        survivor = RawPeer(server.socket_path)
        survivor.wait(lambda: survivor.complete(set(), 1))
        baseline = server.fd_count()
        hoarders: list[socket.socket] = []
        while "cannot pass file descriptors" not in server.log():
            assert len(hoarders) < 14, f"no stall with {len(hoarders)} hoarders:\n{server.log()}"
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(server.socket_path)
            hoarders.append(sock)  # never read from
            server.wait_until(lambda: server.status()["counters"]["joins"] == len(hoarders) + 1)
            survivor.pump()
        good = RawPeer(server.socket_path)
        poller = select.poll()
        for sock in hoarders:
            poller.register(sock, select.POLLRDHUP)
        open_hoarders = {sock.fileno(): sock for sock in hoarders}
        deadline = time.monotonic() + 60

        def good_done() -> bool:
            return good.id is not None and good.complete(set(server.peer_ids()) - {good.id}, 1)

        while not good_done():
            assert time.monotonic() < deadline, server.log()
            # A hoarder hung up on by the server goes away, as a stuck process would once
            # it runs again; that is what gives its fds in flight back.
            for fd, _event in poller.poll(50):
                poller.unregister(fd)
                open_hoarders.pop(fd).close()
            good.pump()
            survivor.pump()
            assert not good.eof and not survivor.eof
        counters = server.status()["counters"]
        assert counters["stalled_clients_dropped"] >= 1
        log = server.log()
        assert log.count("cannot pass file descriptors") == counters["send_stalls"] >= 1
        assert "read none of its" in log
        for sock in open_hoarders.values():
            sock.close()
        assert_consistent(server, [survivor, good], baseline + 2)
        assert "sending works again" in server.log()
        good.close()
        survivor.close()


# --------------------------------------------------------------------------------------------
# Shutdown


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly_and_tells_peers(short_tmp: Path, signum: int) -> None:
    pidfile = short_tmp / "server.pid"
    server = ServerProcess(short_tmp, extra_args=["-p", str(pidfile)]).start()
    peers = connect_all(server.socket_path, 3)
    pump_all(peers, lambda: all(p.complete({0, 1, 2} - {p.id}, 1) for p in peers))
    assert pidfile.read_text().strip() == str(server.pid)
    assert server.proc is not None
    server.proc.send_signal(signum)
    for peer in peers:
        peer.wait_eof()  # closing their sockets is how peers learn the server went away
        peer.close()
    assert server.stop(send_signal=False) == 0
    assert not os.path.exists(server.socket_path)
    assert not os.path.exists(server.status_path)
    assert not pidfile.exists()
    assert any("STOPPING=1" in n for n in server.notifications)


def test_sd_notify_ready_carries_mainpid(short_tmp: Path) -> None:
    with ServerProcess(short_tmp) as server:
        ready = [n for n in server.notifications if "READY=1" in n]
        assert ready and f"MAINPID={server.pid}" in ready[0]


def test_sd_notify_abstract_socket_and_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ivshmem-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1")
        assert listener.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


# --------------------------------------------------------------------------------------------
# Backings and sizes


def test_size_is_rounded_up_to_a_power_of_two_with_a_log_line(short_tmp: Path) -> None:
    with (
        ServerProcess(short_tmp, size="3M") as server,
        RawPeer(server.socket_path, keep_fds=True) as peer,
    ):
        peer.wait(lambda: peer.shm_fd is not None)
        assert peer.shm_fd is not None
        assert os.fstat(peer.shm_fd).st_size == 4 << 20
        assert "rounded up to 4M" in server.log()


def test_64_gib_region(short_tmp: Path) -> None:
    with (
        ServerProcess(short_tmp, size="64G") as server,
        RawPeer(server.socket_path, keep_fds=True) as peer,
    ):
        peer.wait(lambda: peer.shm_fd is not None)
        assert peer.shm_fd is not None
        assert os.fstat(peer.shm_fd).st_size == 64 << 30
        with mmap.mmap(peer.shm_fd, 64 << 30) as region:  # sparse: costs no memory
            region[(64 << 30) - 1] = 7
            assert region[(64 << 30) - 1] == 7


def test_posix_backing_is_private_and_keeps_content_across_restarts(
    short_tmp: Path, shm_name: str
) -> None:
    path = f"/dev/shm/{shm_name}"
    with (
        ServerProcess(short_tmp, size="64K", extra_args=["-M", shm_name]) as server,
        RawPeer(server.socket_path, keep_fds=True) as peer,
    ):
        peer.wait(lambda: peer.shm_fd is not None)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600
        assert peer.shm_fd is not None
        with mmap.mmap(peer.shm_fd, 65536) as region:
            region[100:105] = b"kept!"
    assert os.path.exists(path)  # like QEMU's server, the object outlives it
    with (
        ServerProcess(short_tmp, size="64K", extra_args=["-M", shm_name]) as server,
        RawPeer(server.socket_path, keep_fds=True) as peer,
    ):
        peer.wait(lambda: peer.shm_fd is not None)
        assert peer.shm_fd is not None
        with mmap.mmap(peer.shm_fd, 65536) as region:
            assert region[100:105] == b"kept!"


def test_file_backing_keeps_content_and_mode_option(short_tmp: Path) -> None:
    backing = short_tmp / "region"
    args = ["--file", str(backing), "--mode", "640"]
    for expected in (b"\0\0\0\0", b"data"):
        with (
            ServerProcess(short_tmp, size="4K", extra_args=args) as server,
            RawPeer(server.socket_path, keep_fds=True) as peer,
        ):
            peer.wait(lambda p=peer: p.shm_fd is not None)  # type: ignore[misc]
            assert stat.S_IMODE(backing.stat().st_mode) == 0o640
            assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o640
            assert peer.shm_fd is not None
            with mmap.mmap(peer.shm_fd, 4096) as region:
                assert region[:4] == expected
                region[:4] = b"data"


def test_directory_backing_leaves_no_file(short_tmp: Path) -> None:
    directory = short_tmp / "mem"
    directory.mkdir()
    with (
        ServerProcess(short_tmp, extra_args=["-m", str(directory)]) as server,
        RawPeer(server.socket_path, keep_fds=True) as peer,
    ):
        peer.wait(lambda: peer.shm_fd is not None)
        assert list(directory.iterdir()) == []  # created unlinked, like QEMU's -m


# --------------------------------------------------------------------------------------------
# Bad arguments and environments


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-l", "0"], "size '0' must be greater than zero"),
        (["-l", "four"], "cannot parse size 'four'"),
        (["-l", "2P"], "cannot parse size '2P'"),
        (["-n", "0"], "0 vectors per peer is out of range 1..256"),
        (["-n", "257"], "257 vectors per peer is out of range 1..256"),
        (["-n", "x"], "cannot parse 'x'"),
        (["-M", "a/b"], "invalid shared-memory name 'a/b'"),
        (["-M", ".."], "invalid shared-memory name '..'"),
        (["--mode", "999"], "not an octal mode"),
        (["--group", "no-such-group-ivshmem"], "unknown group"),
        (["--allow-uid", "no-such-user-ivshmem"], "unknown user"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_clear_message(
    short_tmp: Path, args: list[str], message: str
) -> None:
    result = run_cli("-F", "-S", str(short_tmp / "s"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (short_tmp / "s").exists()


def test_socket_path_too_long(short_tmp: Path) -> None:
    result = run_cli("-F", "--memfd", "-S", str(short_tmp / ("x" * 120)))
    assert result.returncode == 2
    assert "longer than 107 bytes" in result.stderr


def test_socket_of_a_live_server_is_refused(short_tmp: Path) -> None:
    with ServerProcess(short_tmp) as server, RawPeer(server.socket_path) as peer:
        peer.wait(lambda: peer.complete(set(), 1))
        result = run_cli("-F", "--memfd", "-S", server.socket_path, "--status-socket", "")
        assert result.returncode == 1
        assert "is in use by a running server" in result.stderr
        # Checking did not disturb the live server: no phantom peer came and went.
        assert server.status()["counters"]["joins"] == 1
        peer.pump()
        assert not peer.eof and peer.messages == 4


def test_stale_socket_is_removed_and_reported(short_tmp: Path) -> None:
    path = short_tmp / "ivshmem.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    with ServerProcess(short_tmp) as server, RawPeer(server.socket_path) as peer:
        peer.wait(lambda: peer.complete(set(), 1))
        assert "removed stale socket" in server.log()


def test_non_socket_file_at_socket_path_is_not_removed(short_tmp: Path) -> None:
    path = short_tmp / "precious"
    path.write_text("data")
    result = run_cli("-F", "--memfd", "-S", str(path))
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr
    assert path.read_text() == "data"


def test_socket_directory_not_writable(short_tmp: Path) -> None:
    directory = short_tmp / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
    else:
        # root writes anywhere permissions allow nothing: use a read-only filesystem instead.
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "ivshmem-test", str(directory)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        result = run_cli("-F", "--memfd", "-S", str(directory / "s"))
        assert result.returncode == 1
        assert "is not writable" in result.stderr
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(directory)], check=True)


def test_unwritable_memory_directory(short_tmp: Path) -> None:
    result = run_cli("-F", "-S", str(short_tmp / "s"), "-m", str(short_tmp / "missing"))
    assert result.returncode == 1
    assert "is not a directory" in result.stderr
    assert not (short_tmp / "s").exists()  # the socket made before the failure is gone


# --------------------------------------------------------------------------------------------
# Daemon mode


def test_daemon_mode(short_tmp: Path) -> None:
    sock, pidfile = short_tmp / "d.sock", short_tmp / "d.pid"
    result = run_cli("-S", str(sock), "--memfd", "-p", str(pidfile))
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    try:
        assert pid != os.getpid()
        assert os.getsid(pid) != pid  # double fork: not a session leader, no terminal
        assert os.getsid(pid) != os.getsid(0)  # but out of our session
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        with RawPeer(str(sock)) as peer:
            peer.wait(lambda: peer.complete(set(), 1))
        # A second daemon on the same socket reports the error on this terminal.
        again = run_cli("-S", str(sock), "--memfd", "-p", str(short_tmp / "other.pid"))
        assert again.returncode == 1
        assert "is in use by a running server" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    assert not sock.exists() and not pidfile.exists()


def test_daemon_startup_error_reaches_the_terminal(short_tmp: Path) -> None:
    result = run_cli(
        "-S", str(short_tmp / "d.sock"), "-m", str(short_tmp / "nope"), "-p", str(short_tmp / "p")
    )
    assert result.returncode == 1
    assert "is not a directory" in result.stderr
    assert not (short_tmp / "d.sock").exists()


# --------------------------------------------------------------------------------------------
# Access control


def _connect_as(uid: int, gid: int, path: str, groups: Sequence[int] = ()) -> str:
    """Fork, drop to uid/gid, connect, and report what the server did: 'served' or 'closed'."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                data = sock.recv(8)
            os.write(write_end, b"served" if data else b"closed")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_allow_list_refuses_other_users(short_tmp: Path) -> None:
    require(os.geteuid() == 0, "needs root to connect as other users")
    short_tmp.chmod(0o755)
    extra = ["--mode", "666", "--allow-uid", "65533", "--allow-gid", "65532"]
    with ServerProcess(short_tmp, extra_args=extra) as server:
        assert _connect_as(65534, 65534, server.socket_path) == "closed"
        assert _connect_as(65533, 65534, server.socket_path) == "served"
        assert _connect_as(65534, 65532, server.socket_path) == "served"
        assert _connect_as(65534, 65534, server.socket_path, groups=[65531, 65532]) == "served"
        with RawPeer(server.socket_path) as own:  # the server's own user is always allowed
            own.wait(lambda: own.complete(set(), 1))
        status = server.status()
        assert status["counters"]["clients_refused"] == 1
        assert "refused client" in server.log() and "uid 65534" in server.log()


@pytest.mark.parametrize("extra_groups", [0, 300], ids=["2-groups", "302-groups"])
def test_allow_check_reads_the_groups_of_the_connecting_process(
    short_tmp: Path, extra_groups: int
) -> None:
    """client_allowed with real credentials: a process with supplementary groups connects,
    and SO_PEERCRED/SO_PEERGROUPS on the accepted socket decide (more than 256 groups do not
    fit in what Python's getsockopt() can read: the server reads them elsewhere)."""
    supplementary = [65530, 65531, *range(60000, 60000 + extra_groups)]
    require(os.geteuid() == 0, "needs root to connect as another user with other groups")
    short_tmp.chmod(0o755)
    path = str(short_tmp / "allow.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.setgroups(supplementary)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(path)
                    sock.recv(1)  # stay connected until the parent is done
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        with conn:
            cpid, uid, gid = peer_credentials(conn)
            assert (cpid, uid, gid) == (pid, 65534, 65534)
            assert peer_groups(conn) == set(supplementary)
            asked: list[int] = []

            def groups() -> set[int]:
                asked.append(1)
                return peer_groups(conn)

            def allowed(uids: set[int] | None = None, gids: set[int] | None = None) -> bool:
                config = ServerConfig(
                    allow_uids=frozenset(uids or ()), allow_gids=frozenset(gids or ())
                )
                return client_allowed(config, uid, gid, groups, server_uid=0)

            assert allowed()
            assert allowed(gids={65531})  # a supplementary group
            assert allowed(gids={65534})  # the primary group
            assert not allowed(gids={65529})
            assert allowed(uids={65534})
            assert not allowed(uids={65533})
            calls = len(asked)
            assert allowed(uids={65534}, gids={1})
            assert len(asked) == calls  # decided by the uid: the groups were not read
            assert client_allowed(ServerConfig(allow_uids=frozenset({1})), uid, gid, groups, 65534)
            conn.send(b"x")
        os.waitpid(pid, 0)


def test_socket_group_and_default_group_mode(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, extra_args=["--group", "65532"]) as server:
        st = os.stat(server.socket_path)
        assert st.st_gid == 65532
        assert stat.S_IMODE(st.st_mode) == 0o660


# --------------------------------------------------------------------------------------------
# In-process server: the membership observer hook


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, frozenset[int]]] = []

    def on_join(self, server: Server, peer: int) -> None:
        self.seen.append(("join", peer, server.peers))
        for other in server.peers - {peer}:
            server.ring(other, 1)  # a "membership vector", as the channel layer will ring

    def on_leave(self, server: Server, peer: int) -> None:
        self.seen.append(("leave", peer, server.peers))


def test_membership_observers_and_ring(short_tmp: Path) -> None:
    config = ServerConfig(socket_path=str(short_tmp / "s"), backing="memfd", size=4096, vectors=2)
    server = Server(config)
    recorder = Recorder()
    server.observers.append(recorder)
    server.open()
    from ivshmem.server import run

    thread = threading.Thread(target=run, args=(server,))
    thread.start()
    try:
        a = RawPeer(config.socket_path, keep_fds=True)
        a.wait(lambda: a.complete(set(), 2))
        b = RawPeer(config.socket_path, keep_fds=True)
        b.wait(lambda: b.complete({0}, 2))
        a.wait(lambda: a.complete({1}, 2))
        assert rung(a, 1)  # rung by the observer when b joined
        b.close()
        a.wait(lambda: a.complete(set(), 2))
        a.close()
        deadline = time.monotonic() + 10
        while len(recorder.seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.seen == [
            ("join", 0, frozenset({0})),
            ("join", 1, frozenset({0, 1})),
            ("leave", 1, frozenset({0})),
            ("leave", 0, frozenset()),
        ]
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert not os.path.exists(config.socket_path)


# --------------------------------------------------------------------------------------------
# Hostile clients: after each, the server is alive, every survivor's view of the membership
# matches the server's, and the server's fd count is back at its baseline.


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_kill_9_of_clients_at_every_handshake_stage(short_tmp: Path) -> None:
    vectors = 3
    with ServerProcess(short_tmp, vectors=vectors) as server:
        survivors = connect_all(server.socket_path, 2, keep_fds=True)
        pump_all(survivors, lambda: all(p.complete({0, 1} - {p.id}, vectors) for p in survivors))
        baseline = server.fd_count()
        # 0 = connected, nothing read; 1 version; 2 id; 3 shared memory; 3 + 2 part of the
        # others' vectors; 3 + 6 + 1 part of its own; 3 + 6 + 3 complete.
        for stage in (0, 1, 2, 3, 5, 10, 12):
            _kill(fork_client(server.socket_path, stage))
            assert_consistent(server, survivors, baseline)
        # And before the server even accepted it: freeze the server, connect, die, thaw.
        before = server.status()["counters"]
        os.kill(server.pid, signal.SIGSTOP)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    socket.socket(socket.AF_UNIX).connect(server.socket_path)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        # Accepted from the backlog after the thaw, admitted, and seen to have gone.
        server.wait_until(
            lambda: (
                server.status()["counters"]["joins"] == before["joins"] + 1
                and server.status()["counters"]["leaves"] == before["leaves"] + 1
            ),
            what="the dead client's join and leave",
        )
        assert_consistent(server, survivors, baseline)
        # The survivors can still ring each other.
        ring(survivors[0], survivors[1].id, 2)  # type: ignore[arg-type]
        assert rung(survivors[1], 2)
        for peer in survivors:
            peer.close()


def test_connection_flood(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=2) as server:
        survivor = RawPeer(server.socket_path)
        survivor.wait(lambda: survivor.complete(set(), 2))
        baseline = server.fd_count()
        flood = []
        for _ in range(300):  # nobody reads: the server must queue, not block
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(server.socket_path)
            flood.append(sock)
        server.wait_until(lambda: server.status()["counters"]["peers"] == 301, what="301 peers")
        for sock in flood:
            sock.close()
        assert_consistent(server, [survivor], baseline)
        late = RawPeer(server.socket_path)
        late.wait(lambda: late.complete({survivor.id}, 2))  # type: ignore[arg-type]
        late.close()
        survivor.close()


def test_garbage_from_many_clients(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=2) as server:
        survivor = RawPeer(server.socket_path)
        survivor.wait(lambda: survivor.complete(set(), 2))
        baseline = server.fd_count()
        for size in (1, 7, 8, 4096, 1 << 20):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(server.socket_path)
                sock.settimeout(10)
                with contextlib.suppress(OSError):  # the server may hang up mid-send
                    sock.sendall(os.urandom(size))
                # Hung up on: reading reaches EOF (or a reset: our bytes were never read).
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(65536):
                        pass
        # A client that sends an fd is as wrong as one that sends bytes.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(server.socket_path)
            fd = os.eventfd(0)
            sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
            os.close(fd)
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
        assert_consistent(server, [survivor], baseline)
        assert server.status()["counters"]["clients_sent_data"] == 6
        survivor.close()


def rss_anon_kib(pid: int) -> int:
    """Anonymous resident memory of ``pid`` (the Python heap; file and shm pages excluded)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/PID/status")


#: Connect/disconnect cycles measured after the warm-up, in intervals, and the growth allowed
#: per cycle. A leak first fills the free space the heap already has (up to a few hundred
#: KiB), then grows it in every interval: 300 bytes per cycle make 300 KB per interval, four
#: times the bound. The allocator also grows in occasional steps (a new arena, a dict
#: resized) that land in one interval. Hence the median of the last three intervals.
CHURN_INTERVALS = 6
CHURN_CYCLES_PER_INTERVAL = 1000
CHURN_MAX_BYTES_PER_CYCLE = 75


def test_churn_leaks_no_fds_and_no_memory(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, vectors=4) as server:
        survivor = RawPeer(server.socket_path)
        survivor.wait(lambda: survivor.complete(set(), 4))
        baseline = server.fd_count()

        def cycles(n: int) -> None:
            for _ in range(n):
                with RawPeer(server.socket_path) as peer:
                    peer.wait(lambda p=peer: p.state.own_vectors == 4)  # type: ignore[misc]
            assert_consistent(server, [survivor], baseline)

        cycles(500)  # warm up: allocator pools, status buffers, log handler
        samples = [rss_anon_kib(server.pid)]
        for _ in range(CHURN_INTERVALS):
            cycles(CHURN_CYCLES_PER_INTERVAL)
            samples.append(rss_anon_kib(server.pid))
        growths = sorted(b - a for a, b in itertools.pairwise(samples[-4:]))
        per_cycle = growths[1] * 1024 / CHURN_CYCLES_PER_INTERVAL
        assert per_cycle < CHURN_MAX_BYTES_PER_CYCLE, (
            f"the server's heap grows by {per_cycle:.0f} bytes per connect/disconnect cycle "
            f"(median of the last 3 intervals of {CHURN_CYCLES_PER_INTERVAL} cycles; RssAnon "
            f"in KiB: {samples})"
        )
        joins = 1 + 500 + CHURN_INTERVALS * CHURN_CYCLES_PER_INTERVAL
        assert server.status()["counters"]["joins"] == joins
        survivor.close()


# --------------------------------------------------------------------------------------------
# contrib/: the service files


CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def _unit_command(instance: str, socket_path: str) -> list[str]:
    """ExecStart= of the unit for ``instance``, expanded as systemd would with the unit's
    defaults, but with this checkout's server and a socket in the test's directory."""
    import shlex

    text = (CONTRIB / "ivshmem-server@.service").read_text()
    env: dict[str, str] = {}
    exec_start = ""
    for line in text.splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.partition("=")[2]):
                key, _, value = item.partition("=")
                env[key] = value
        elif line.startswith("ExecStart="):
            exec_start = line.partition("=")[2]
    env["IVSHMEM_GROUP"] = str(os.getgid())  # the unit's kvm may not exist here
    words = []
    for word in shlex.split(exec_start.replace("%i", instance)):
        if word.startswith("${"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words.extend(env[word[1:]].split())
        else:
            words.append(word)
    assert words[0] == "/usr/bin/ivshmem-server" and "-F" in words
    words[words.index("-S") + 1] = socket_path
    return [*SERVER, *words[1:]]


def test_systemd_unit_command_line_serves_and_notifies(short_tmp: Path) -> None:
    instance = f"test-{uuid.uuid4().hex[:8]}"
    command = _unit_command(instance, str(short_tmp / "unit.sock"))

    class UnitServer(ServerProcess):
        def command(self) -> list[str]:
            return command

    try:
        with (
            UnitServer(short_tmp, name="unit.sock") as server,
            RawPeer(server.socket_path, keep_fds=True) as peer,
        ):
            peer.wait(lambda: peer.complete(set(), 1))
            assert peer.shm_fd is not None
            assert os.fstat(peer.shm_fd).st_size == 64 << 20
            assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o660
            assert server.status()["shared_memory"]["path"] == f"/dev/shm/ivshmem-{instance}"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/ivshmem-{instance}")


def test_systemd_unit_verifies(short_tmp: Path) -> None:
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    server = Path(sys.executable).parent / "ivshmem-server"
    unit = short_tmp / "ivshmem-server@test.service"
    text = (CONTRIB / "ivshmem-server@.service").read_text()
    unit.write_text(text.replace("/usr/bin/ivshmem-server", str(server)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_every_xml_file_in_contrib_parses() -> None:
    import xml.etree.ElementTree as ET

    files = sorted(CONTRIB.parent.rglob("*.xml"))
    assert files, "no XML files found in contrib/"
    for path in files:
        try:
            ET.parse(path)
        except ET.ParseError as err:
            raise AssertionError(f"{path} is not valid XML: {err}") from None
    shmem = ET.parse(CONTRIB.parent / "libvirt" / "ivshmem-doorbell.xml").getroot()
    assert shmem.tag == "shmem"
    model, server, msi = shmem.find("model"), shmem.find("server"), shmem.find("msi")
    assert model is not None and model.get("type") == "ivshmem-doorbell"
    assert server is not None and server.get("path") == "/run/ivshmem/vm-ring.sock"
    assert msi is not None and msi.get("vectors") == "4"


def test_systemd_unit_restart_policy_matches_the_exit_statuses() -> None:
    from ivshmem.cli import server as cli

    text = (CONTRIB / "ivshmem-server@.service").read_text()
    values = {
        key: value
        for key, _, value in (line.partition("=") for line in text.splitlines())
        if key and not key.startswith("#")
    }
    assert values["Restart"] == "on-failure"
    prevented = {int(code) for code in values["RestartPreventExitStatus"].split()}
    # Refusing to start, or bad arguments, will not change by restarting; a failure while
    # serving may.
    assert prevented == {cli.EXIT_CANNOT_START, cli.EXIT_USAGE}
    assert cli.EXIT_FAILED not in prevented
    assert set(values["Before"].split()) >= {"libvirtd.service", "virtqemud.service"}


def test_tmpfiles_rule_makes_the_socket_directory(short_tmp: Path) -> None:
    import shutil

    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        pytest.skip("systemd-tmpfiles is not installed")
    root = short_tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("ivshmem:x:990:990::/nonexistent:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("kvm:x:991:ivshmem\nivshmem:x:990:\n")
    rule = CONTRIB / "ivshmem-server.tmpfiles"
    result = subprocess.run(
        [tmpfiles, "--create", f"--root={root}", str(rule)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    st = (root / "run" / "ivshmem").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 990, 991)


def test_umbrella_command_runs_the_server(short_tmp: Path) -> None:
    class Umbrella(ServerProcess):
        def command(self) -> list[str]:
            words = super().command()
            module = words.index("ivshmem.cli.server")
            return [*words[:module], "ivshmem.cli.main", "server", *words[module + 1 :]]

    with Umbrella(short_tmp, vectors=2) as server, RawPeer(server.socket_path) as peer:
        peer.wait(lambda: peer.complete(set(), 2))
    help_text = subprocess.run(
        [sys.executable, "-m", "ivshmem.cli.main", "server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-S PATH" in help_text and "--status-socket" in help_text

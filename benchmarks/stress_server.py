"""Stress ivshmem-server with connect/disconnect churn and hostile clients; check fds and memory.

A server process runs with a few long-lived "survivor" peers. Then CYCLES clients come and go,
each chosen at random (seeded) from:

* polite   -- completes its handshake, then closes;
* hasty    -- connects and closes at once (often before the server even accepted it);
* midway   -- reads part of its handshake, then closes;
* garbage  -- sends random bytes, then waits for the server to hang up on it;
* sleeper  -- never reads; closed a few cycles later, with messages still queued for it;
* kill9    -- a child process that reads part of its handshake and is killed with SIGKILL;
* flood    -- 50 connections at once that read nothing, closed once all were admitted;
* fdlimit  -- the server's fd limit is cut to what it has open plus 3; three clients
              connect (accepting pauses, a handshake waits for its eventfds), the limit is
              restored and all three must complete;
* idwrap   -- 256 hasty connections, which walk the 16-bit id allocator round: the server
              starts at --first-id 65534, so the survivors hold 65534, 65535 and 0, ids wrap
              within the first cycles and, every 65536 joins, must skip the survivors' ids.
              A polite client then checks it got an id no survivor holds.

Every REPORT cycles, and at the end, the survivors are drained and checked: the server's
membership equals the survivors' ids, each survivor's view matches, nothing is queued, and the
server's open fd count is back at its baseline. Printed per report: cycles done, cycles/s,
server fds, anonymous RSS (the heap) in KiB, and counters.

Exit status 1 if fds leaked, if a check failed, or if the heap grew by more than
--max-growth bytes per cycle: the median over the report intervals of the second half of the
run after --warmup cycles. A leak first fills the free space the heap has, then shows in every
interval; an allocator step (a new arena, a dict resized) shows in one.

    .venv/bin/python benchmarks/stress_server.py                  # 10,000 cycles
    .venv/bin/python benchmarks/stress_server.py --cycles 2000 --vectors 4 --seed 7

With ``--storm N`` it runs the connection storm instead: three honest peers, each in its own
process, ping-pong doorbells around a ring (vector 0 pings, vector 1 answers; one round trip
per peer every millisecond) and read their sockets all the time, while one process connects
and closes N times as fast as it can.
Reported: honest peers dropped (must be 0; exit status 1 otherwise), their round-trip p50/p99
before and during the storm, the storm's cycles/s and the server's CPU time.

    .venv/bin/python benchmarks/stress_server.py --storm 20000

With ``--truncate N`` it runs the truncation instead: the same three honest peers ping-pong on
a region that cannot be sealed (``-M NAME --format`` unless --server-arg gives another backing,
e.g. ``--file``), a process joins and leaves all the time (a full handshake each), and a hostile
peer truncates the region to 0 N times, each time waiting until the server has put the size
back. Reported: whether the server is alive (must be), the restores it counted (must be N),
how long the region stayed short (p50/p99: until the next join's check or the 0.2 s timer),
joins completed and failed (none may fail), honest peers dropped (must be 0) and their round
trips before and during, and the server's CPU time. Exit status 1 if any of that fails.

    .venv/bin/python benchmarks/stress_server.py --truncate 500
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverproc import RawPeer, ServerProcess, fork_client, membership_settled, pump_all

KINDS = {
    "polite": 8,
    "hasty": 3,
    "midway": 3,
    "garbage": 2,
    "sleeper": 2,
    "kill9": 2,
    "flood": 1,
    "fdlimit": 1,
    "idwrap": 2,
}
FLOOD = 50
#: Pause between one honest peer's round trips in the storm (they share the CPU with it).
PING_INTERVAL = 0.001
IDWRAP_BURST = 256


class Failure(Exception):
    """A check failed: the server misbehaved."""


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return -1


def settle(server: ServerProcess, survivors: list[RawPeer], baseline: int) -> None:

    def settled() -> bool:
        for peer in survivors:
            peer.pump()
            if peer.eof:
                raise Failure(f"the server hung up on survivor {peer.id}")
        return membership_settled(server, survivors, baseline)

    try:
        server.wait_until(settled, timeout=120, what="membership and fds to settle")
    except AssertionError as err:
        raise Failure(
            f"{str(err)[:2000]}\nserver peers {server.peer_ids()}, fds {server.fd_count()} "
            f"(baseline {baseline})"
        ) from None


class Stress:
    def __init__(
        self, server: ServerProcess, survivors: list[RawPeer], vectors: int, baseline: int
    ) -> None:
        self.server = server
        self.baseline = baseline
        self.path = server.socket_path
        self.survivors = survivors
        self.vectors = vectors
        self.sleepers: list[socket.socket] = []
        self.last_id = -1
        self.id_wraps = 0

    def pump(self) -> None:
        for peer in self.survivors:
            peer.pump()

    def run(self, kind: str, rng: random.Random) -> None:
        getattr(self, f"_{kind}")(rng)

    def _hasty(self, rng: random.Random) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.path)
        sock.close()

    def _sleeper(self, rng: random.Random) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.path)
        self.sleepers.append(sock)

    def close_sleepers(self, rng: random.Random | None = None) -> None:
        while len(self.sleepers) > 3 or (self.sleepers and (rng is None or rng.random() < 0.2)):
            self.sleepers.pop(0).close()

    def _garbage(self, rng: random.Random) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(self.path)
            sock.settimeout(30)
            try:
                sock.send(os.urandom(rng.randint(1, 64)))
            except OSError:
                pass  # hung up on already
            # The server must hang up: EOF (or a reset, as our bytes were never read).
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                raise Failure("the server did not hang up on a client that sent data") from None

    def _polite(self, rng: random.Random) -> None:
        with RawPeer(self.path) as peer:
            peer.wait(lambda: peer.state.own_vectors == self.vectors, timeout=30)
            self._check_id(peer)

    def _midway(self, rng: random.Random) -> None:
        with RawPeer(self.path) as peer:
            stop = rng.randint(1, 3 + self.vectors)
            peer.wait(lambda: peer.messages >= stop or peer.state.own_vectors == self.vectors)

    def _kill9(self, rng: random.Random) -> None:
        messages = rng.randint(0, 3 + self.vectors * (len(self.survivors) + 1))
        pid = fork_client(self.path, messages)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    def _flood(self, rng: random.Random) -> None:
        joins = self.server.status()["counters"]["joins"]
        socks = []
        try:
            for _ in range(FLOOD):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(self.path)
                socks.append(sock)
            self._wait(lambda: self.server.status()["counters"]["joins"] >= joins + FLOOD)
        finally:
            for sock in socks:
                sock.close()

    def _fdlimit(self, rng: random.Random) -> None:
        server = self.server
        # From a quiet server: its fd count must not be falling while the limit is cut.
        self.close_sleepers()
        settle(server, self.survivors, self.baseline)
        original = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        shortages = server.status()["counters"]["fd_shortages"]
        peers: list[RawPeer] = []
        try:
            resource.prlimit(
                server.pid, resource.RLIMIT_NOFILE, (server.fd_count() + 3, original[1])
            )
            peers = [RawPeer(self.path) for _ in range(3)]
            self._wait(lambda: server.status()["counters"]["fd_shortages"] > shortages)
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, original)
            try:
                pump_all(peers, lambda: all(p.state.own_vectors == self.vectors for p in peers), 60)
            except AssertionError as err:
                raise Failure(f"clients that waited out an fd shortage: {err}") from None
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, original)
            for peer in peers:
                peer.close()

    def _idwrap(self, rng: random.Random) -> None:
        for i in range(IDWRAP_BURST):
            self._hasty(rng)
            if i % 16 == 0:
                self.pump()  # two messages per visitor for every survivor
        self._polite(rng)

    def _check_id(self, peer: RawPeer) -> None:
        assert peer.id is not None
        if peer.id in {s.id for s in self.survivors}:
            raise Failure(f"a client got id {peer.id}, which a survivor holds")
        if peer.id < self.last_id:
            self.id_wraps += 1
        self.last_id = peer.id

    def _wait(self, predicate: object, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            self.pump()
            if time.monotonic() > deadline:
                raise Failure(f"timed out waiting for the server\n{self.server.log()[-3000:]}")
            time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _honest(peer: RawPeer, target: int, pinger: int, stop: int, out: str) -> None:
    """One honest peer (in a child process): ping ``target`` on vector 0, answer pings from
    ``pinger`` on vector 1, read the socket whenever it is readable. Writes to ``out``
    whether the server hung up, then (time, round trip) pairs as doubles."""
    import array
    import select

    ping_fd, pong_fd = peer.own_fds[0], peer.own_fds[1]
    poll = select.epoll()
    for fd in (peer.fileno(), ping_fd, pong_fd, stop):
        poll.register(fd, select.EPOLLIN)
    samples = array.array("d")
    dropped = False
    sent = time.perf_counter()
    os.eventfd_write(peer.peer_fds[target][0], 1)
    next_ping: float | None = None
    running = True
    while running:
        timeout = 1.0
        if next_ping is not None:
            timeout = max(0.0, next_ping - time.perf_counter())
            if timeout == 0.0:
                sent, next_ping = time.perf_counter(), None
                os.eventfd_write(peer.peer_fds[target][0], 1)
                timeout = 1.0
        for fd, _ in poll.poll(timeout):
            if fd == peer.fileno():
                peer.pump()
                if peer.eof:
                    dropped = True
                    running = False
            elif fd == ping_fd:
                os.eventfd_read(ping_fd)
                os.eventfd_write(peer.peer_fds[pinger][1], 1)
            elif fd == pong_fd:
                os.eventfd_read(pong_fd)
                now = time.perf_counter()
                samples.extend((now, now - sent))
                next_ping = now + PING_INTERVAL  # doorbells at a VM's pace, not a busy loop
            elif fd == stop:
                running = False
    with open(out, "wb") as f:
        array.array("d", [float(dropped)]).tofile(f)
        samples.tofile(f)


def _read_report(path: str) -> tuple[bool, list[tuple[float, float]]]:
    import array

    values = array.array("d")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    pairs = list(zip(values[1::2], values[2::2], strict=False))
    return bool(values[0]), pairs


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class HonestRing:
    """Three honest peers, each in its own process, ping-ponging doorbells around a ring
    (vector 0 pings, vector 1 answers; one round trip per peer every millisecond) and reading
    their sockets all the time (see :func:`_honest`)."""

    def __init__(self, server: ServerProcess, tmp: str, vectors: int) -> None:
        honest = [RawPeer(server.socket_path, keep_fds=True) for _ in range(3)]
        self.ids: list[int] = []
        for peer in honest:
            peer.wait(lambda p=peer: p.state.own_vectors == vectors)  # type: ignore[misc]
        for peer in honest:
            peer.wait(lambda p=peer: len(p.peers) >= 2)  # type: ignore[misc]
            assert peer.id is not None
            self.ids.append(peer.id)
        stop_r, self._stop_w = os.pipe()
        self._outs = [os.path.join(tmp, f"honest-{i}.bin") for i in range(3)]
        self._children = []
        for i, peer in enumerate(honest):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(self._stop_w)
                    target, pinger = self.ids[(i + 1) % 3], self.ids[(i - 1) % 3]
                    _honest(peer, target, pinger, stop_r, self._outs[i])
                finally:
                    os._exit(0)
            self._children.append(pid)
        for peer in honest:
            peer.close()  # the children hold their own copies
        os.close(stop_r)

    def stop(self) -> list[tuple[bool, list[tuple[float, float]]]]:
        """Stop the peers; each one's report: whether the server hung up on it, and its
        (time, round trip) samples."""
        os.close(self._stop_w)
        for pid in self._children:
            os.waitpid(pid, 0)
        return [_read_report(out) for out in self._outs if os.path.exists(out)]


def _print_round_trips(
    reports: list[tuple[bool, list[tuple[float, float]]]], start: float, end: float, what: str
) -> int:
    """Print the honest peers' round trips before and during [start, end]; return how many
    of the 3 the server dropped."""
    dropped = sum(1 for gone, _ in reports if gone) + (3 - len(reports))
    before = [rtt for _, pairs in reports for t, rtt in pairs if t < start]
    during = [rtt for _, pairs in reports for t, rtt in pairs if start <= t <= end]
    print(f"honest peers dropped: {dropped} of 3")
    for name, values in (("before the " + what, before), ("during the " + what, during)):
        print(
            f"round trip {name}: p50 {_percentile(values, 0.5) * 1e6:.0f} us, p99 "
            f"{_percentile(values, 0.99) * 1e6:.0f} us ({len(values)} round trips)"
        )
    return dropped


def storm(cycles: int, quiet: float, server_args: list[str]) -> int:
    """The connection storm: see the module docstring."""
    vectors = 2
    with (
        tempfile.TemporaryDirectory(prefix="ivs-", dir="/tmp") as tmp,
        ServerProcess(tmp, vectors=vectors, extra_args=server_args, start_timeout=60) as server,
    ):
        ring = HonestRing(server, tmp, vectors)
        time.sleep(quiet)  # round trips without a storm, for comparison
        cpu0 = cpu_seconds(server.pid)
        storm_start = time.perf_counter()
        storm_pid = os.fork()
        if storm_pid == 0:
            code = 0
            try:
                for _ in range(cycles):
                    sock = socket.socket(socket.AF_UNIX)
                    sock.connect(server.socket_path)
                    sock.close()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(storm_pid, 0)
        storm_end = time.perf_counter()

        # Until the server has dealt with the whole backlog (honest peers it dropped are
        # missing from the count).
        def absorbed() -> bool:
            status = server.status()
            return bool(
                status["counters"]["peers"] <= 3 and not status["limits"].get("clients_waiting", 0)
            )

        server.wait_until(absorbed, timeout=120, what="the storm to be absorbed")
        settled = time.perf_counter()
        cpu = cpu_seconds(server.pid) - cpu0
        time.sleep(0.5)
        reports = ring.stop()
        counters = server.status()["counters"]
        log = server.log()
    print(
        f"storm: {cycles} connect/close cycles in {storm_end - storm_start:.2f} s "
        f"({cycles / (storm_end - storm_start):.0f}/s; the storm process exited with "
        f"{os.waitstatus_to_exitcode(status)}), absorbed after {settled - storm_start:.2f} s"
    )
    dropped = _print_round_trips(reports, storm_start, settled, "storm")
    print(
        f"server CPU during the storm: {cpu:.2f} s ({cpu / max(settled - storm_start, 1e-9):.0%}"
        f" of one core); joins {counters['joins']}, collapsed "
        f"{counters.get('joins_collapsed', 0)}, waited {counters.get('clients_waited', 0)}, "
        f"slow clients dropped "
        f"{counters['slow_clients_dropped']}, queue budget drops {counters['queue_budget_drops']}"
    )
    if dropped:
        print("FAIL: honest peers were dropped")
        print("\n".join(line for line in log.splitlines() if "WARNING" in line)[-3000:])
        return 1
    return 0


#: The region's size in the truncation run, and the pause between a restore and the next
#: truncate (the hostile peer waits for each restore, to time it).
TRUNCATE_SIZE = 1 << 20
TRUNCATE_PAUSE = 0.002


def _hostile_truncates(path: str, count: int, out: str) -> None:
    """A hostile peer (in a child process): join, then ``count`` times truncate the region
    to 0 and wait until the server has put its size back. Writes the times (seconds) each
    truncate stayed, as doubles, to ``out``."""
    import array

    hostile = RawPeer(path, keep_fds=True)
    hostile.wait(lambda: hostile.shm_fd is not None and hostile.id is not None)
    fd = hostile.shm_fd
    assert fd is not None
    short = array.array("d")
    for _ in range(count):
        start = time.perf_counter()
        os.ftruncate(fd, 0)
        while os.fstat(fd).st_size != TRUNCATE_SIZE:
            hostile.pump()  # it reads its socket like any peer: it is not dropped for that
            time.sleep(0.0002)
        short.append(time.perf_counter() - start)
        time.sleep(TRUNCATE_PAUSE)
    with open(out, "wb") as f:
        short.tofile(f)
    hostile.close()


def _joiner(path: str, stop: int, out: str) -> None:
    """Joins and leaves (in a child process) until ``stop`` is readable: each time a full
    handshake, then a close. Writes (joins completed, joins failed) to ``out``."""
    import select

    done = failed = 0
    while not select.select([stop], [], [], 0)[0]:
        try:
            peer = RawPeer(path)
            try:
                peer.wait(lambda p=peer: p.state.state == p.state.CONNECTED, timeout=10)  # type: ignore[misc]
                done += 1
            finally:
                peer.close()
        except (AssertionError, OSError):
            failed += 1
        time.sleep(0.001)
    with open(out, "w") as f:
        f.write(f"{done} {failed}")


def truncation(count: int, quiet: float, server_args: list[str]) -> int:
    """The truncation run: see the module docstring."""
    vectors = 2
    name = f"ivs-truncate-{os.getpid()}"
    backing = server_args or ["-M", name, "--format"]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="ivs-", dir="/tmp") as tmp,
            ServerProcess(
                tmp, size="1M", vectors=vectors, extra_args=backing, start_timeout=60
            ) as server,
        ):
            ring = HonestRing(server, tmp, vectors)
            time.sleep(quiet)  # round trips without truncations, for comparison
            joiner_stop_r, joiner_stop_w = os.pipe()
            joiner_out = os.path.join(tmp, "joiner.txt")
            joiner_pid = os.fork()
            if joiner_pid == 0:
                try:
                    os.close(joiner_stop_w)
                    _joiner(server.socket_path, joiner_stop_r, joiner_out)
                finally:
                    os._exit(0)
            os.close(joiner_stop_r)
            cpu0 = cpu_seconds(server.pid)
            start = time.perf_counter()
            hostile_out = os.path.join(tmp, "hostile.bin")
            hostile_pid = os.fork()
            if hostile_pid == 0:
                code = 1
                try:
                    _hostile_truncates(server.socket_path, count, hostile_out)
                    code = 0
                finally:
                    os._exit(code)
            _, hostile_status = os.waitpid(hostile_pid, 0)
            end = time.perf_counter()
            cpu = cpu_seconds(server.pid) - cpu0
            os.close(joiner_stop_w)
            os.waitpid(joiner_pid, 0)
            time.sleep(0.2)
            reports = ring.stop()
            alive = server.alive
            status = server.status() if alive else {}
            log = server.log()
            with open(joiner_out) as f:
                joins, join_failures = (int(v) for v in f.read().split())
            import array

            short = array.array("d")
            if os.path.exists(hostile_out):
                with open(hostile_out, "rb") as f:
                    short.frombytes(f.read())
    finally:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass
    restores = status.get("shared_memory", {}).get("size_restores", 0) if status else 0
    errors = [line for line in log.splitlines() if " ERROR: " in line]
    print(
        f"truncation: a hostile peer truncated the region ({' '.join(backing)}) to 0 "
        f"{len(short)} times in {end - start:.2f} s (its process exited with "
        f"{os.waitstatus_to_exitcode(hostile_status)}), each time waiting for the size to "
        f"come back"
    )
    print(
        f"server alive: {'yes' if alive else 'NO'}; size restored {restores} times (must "
        f"equal the truncations: the hostile peer waits for each restore); "
        f"{len(errors)} ERROR line(s) in the log (at most one a minute)"
    )
    print(
        f"region short for: p50 {_percentile(list(short), 0.5) * 1e3:.2f} ms, p99 "
        f"{_percentile(list(short), 0.99) * 1e3:.2f} ms, max "
        f"{max(short, default=float('nan')) * 1e3:.2f} ms (restored at the next join, or by "
        f"the 0.2 s timer)"
    )
    print(f"joins and leaves meanwhile: {joins} completed, {join_failures} failed")
    dropped = _print_round_trips(reports, start, end, "truncations")
    print(
        f"server CPU during the truncations: {cpu:.2f} s "
        f"({cpu / max(end - start, 1e-9):.0%} of one core)"
    )
    failed = dropped or not alive or join_failures or len(short) != count or restores != count
    if failed:
        print("FAIL: see above")
        print("\n".join(line for line in log.splitlines() if "WARNING" in line)[-3000:])
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--survivors", type=int, default=3)
    parser.add_argument("--report", type=int, default=1000, help="cycles between reports")
    parser.add_argument("--warmup", type=int, default=1000, help="cycles before memory counts")
    parser.add_argument(
        "--max-growth",
        type=float,
        default=100.0,
        help="heap growth allowed per cycle after the warm-up, in bytes (default 100)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--storm",
        metavar="N",
        type=int,
        help="run the connection storm (N connect/close cycles beside 3 ping-ponging peers) "
        "instead of the mix",
    )
    parser.add_argument(
        "--truncate",
        metavar="N",
        type=int,
        help="run the truncation (a hostile peer truncates the region to 0 N times, beside 3 "
        "ping-ponging peers and a process joining and leaving) instead of the mix",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        metavar="ARG",
        help="pass ARG to the server in the storm or the truncation (repeatable; e.g. "
        "--server-arg=--max-queue --server-arg=100; the truncation's default is -M NAME "
        "--format, and ARGs replace it, e.g. --server-arg=--file --server-arg=PATH)",
    )
    parser.add_argument(
        "--quiet", type=float, default=2.0, help="seconds of ping-pong before the storm"
    )
    parser.add_argument(
        "--only", metavar="KIND", action="append", choices=sorted(KINDS), help="only these kinds"
    )
    args = parser.parse_args()
    if args.storm:
        return storm(args.storm, args.quiet, args.server_arg or [])
    if args.truncate:
        return truncation(args.truncate, args.quiet, args.server_arg or [])
    rng = random.Random(args.seed)
    chosen = args.only or list(KINDS)
    kinds = [kind for kind, weight in KINDS.items() if kind in chosen for _ in range(weight)]
    counts = dict.fromkeys(KINDS, 0)
    failure = ""
    samples: list[tuple[int, int]] = []
    with (
        tempfile.TemporaryDirectory(prefix="ivs-", dir="/tmp") as tmp,
        ServerProcess(
            tmp, vectors=args.vectors, extra_args=["--first-id", "65534"], start_timeout=60
        ) as server,
    ):
        survivors = [RawPeer(server.socket_path) for _ in range(args.survivors)]
        for peer in survivors:

            def handshake_done(p: RawPeer = peer) -> bool:
                return bool(p.state.own_vectors == args.vectors)

            peer.wait(handshake_done)
        baseline = server.fd_count()
        settle(server, survivors, baseline)
        stress = Stress(server, survivors, args.vectors, baseline)
        print(
            f"server pid {server.pid}: baseline {baseline} fds, heap {rss_anon_kib(server.pid)} "
            f"KiB, survivors {[p.id for p in survivors]}, {args.vectors} vectors, seed "
            f"{args.seed}"
        )
        print(f"{'cycles':>7} {'cycles/s':>9} {'fds':>5} {'heap KiB':>9}  counters")
        start = time.perf_counter()
        try:
            for cycle in range(1, args.cycles + 1):
                kind = rng.choice(kinds)
                counts[kind] += 1
                stress.run(kind, rng)
                stress.close_sleepers(rng)
                stress.pump()
                if cycle == args.warmup or cycle % args.report == 0 or cycle == args.cycles:
                    stress.close_sleepers()
                    settle(server, survivors, baseline)
                    if cycle >= args.warmup:
                        samples.append((cycle, rss_anon_kib(server.pid)))
                    if cycle % args.report and cycle != args.cycles:
                        continue
                    elapsed = time.perf_counter() - start
                    counters = server.status()["counters"]
                    shown = {
                        k: counters[k]
                        for k in (
                            "joins",
                            "clients_sent_data",
                            "slow_clients_dropped",
                            "fd_shortages",
                        )
                    }
                    print(
                        f"{cycle:>7} {cycle / elapsed:>9.0f} {server.fd_count():>5} "
                        f"{rss_anon_kib(server.pid):>9}  {shown} id wraps {stress.id_wraps}",
                        flush=True,
                    )
        except Failure as err:
            failure = f"cycle {cycle} ({kind}): {err}"
        stress.close_sleepers()
        if failure:
            try:
                settle(server, survivors, baseline)
            except Failure:
                pass
        leaked = server.fd_count() - baseline
        for peer in survivors:
            peer.close()
        print(f"clients by kind: {counts}")
    middle = args.warmup + (args.cycles - args.warmup) // 2
    growths = [
        (b - a) * 1024 / (cb - ca)
        for (ca, a), (cb, b) in itertools.pairwise(samples)
        if cb > ca and ca >= middle
    ]
    growth = sorted(growths)[(len(growths) - 1) // 2] if growths else 0.0
    heap = f"{samples[0][1]} -> {samples[-1][1]} KiB" if samples else "not measured"
    print(
        f"done: {args.cycles} cycles, {leaked} fds leaked, heap after the warm-up {heap}, "
        f"growth {growth:.1f} bytes per cycle in the second half (median of {len(growths)} "
        f"intervals; allowed {args.max_growth:.0f}), "
        f"ids wrapped {stress.id_wraps} time(s)"
    )
    if failure:
        print(f"FAIL: {failure}")
        return 1
    if leaked:
        print(f"FAIL: {leaked} fds leaked")
        return 1
    if growth > args.max_growth:
        print(f"FAIL: the server's heap grows by {growth:.0f} bytes per cycle")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

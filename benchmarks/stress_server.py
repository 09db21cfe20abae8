"""Stress ivshmem-server with connect/disconnect churn and hostile clients; print fds and memory.

A server process runs with a few long-lived "survivor" peers. Then CYCLES clients come and go,
each chosen at random (seeded) from:

* polite   -- completes its handshake, then closes;
* hasty    -- connects and closes at once (often before the server even accepted it);
* midway   -- reads part of its handshake, then closes;
* garbage  -- sends random bytes (the server must hang up on it);
* sleeper  -- never reads; closed a few cycles later, with messages still queued for it.

Every REPORT cycles, and at the end, the survivors are drained and checked: the server's
membership equals the survivors' ids, each survivor's view matches, and the server's open fd
count is back at its baseline. Printed per report: cycles done, cycles/s, server fds (and
baseline), server RSS in KiB, and the server's counters.

    .venv/bin/python benchmarks/stress_server.py                  # 10,000 cycles
    .venv/bin/python benchmarks/stress_server.py --cycles 2000 --vectors 4 --seed 7
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverproc import RawPeer, ServerProcess


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def settle(server: ServerProcess, survivors: list[RawPeer], baseline: int) -> None:
    expected = {p.id for p in survivors}

    def settled() -> bool:
        for peer in survivors:
            peer.pump()
            if peer.eof:
                raise SystemExit(f"FAIL: the server hung up on survivor {peer.id}")
        return (
            set(server.peer_ids()) == expected
            and all(set(p.peers) == expected - {p.id} for p in survivors)
            and server.status()["counters"]["messages_queued"] == 0
            and server.fd_count() == baseline
        )

    server.wait_until(settled, timeout=120, what="membership and fds to settle")


def one_cycle(kind: str, path: str, vectors: int, rng: random.Random) -> socket.socket | None:
    """Run one client; return a socket to close later (a sleeper), else None."""
    if kind == "hasty":
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.close()
        return None
    if kind == "sleeper":
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        return sock
    if kind == "garbage":
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        try:
            sock.send(os.urandom(rng.randint(1, 64)))
        except OSError:
            pass
        sock.close()
        return None
    with RawPeer(path) as peer:
        if kind == "polite":
            peer.wait(lambda: peer.state.own_vectors == vectors, timeout=30)
        else:  # midway
            stop = rng.randint(1, 3 + vectors)
            peer.wait(lambda: peer.messages >= stop or peer.state.own_vectors == vectors)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--survivors", type=int, default=3)
    parser.add_argument("--report", type=int, default=1000, help="cycles between reports")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kinds = ["polite"] * 5 + ["hasty"] * 2 + ["midway"] * 2 + ["garbage", "sleeper"]
    with (
        tempfile.TemporaryDirectory(prefix="ivs-", dir="/tmp") as tmp,
        ServerProcess(tmp, vectors=args.vectors) as server,
    ):
        survivors = [RawPeer(server.socket_path) for _ in range(args.survivors)]
        for peer in survivors:

            def handshake_done(p: RawPeer = peer) -> bool:
                return bool(p.state.own_vectors == args.vectors)

            peer.wait(handshake_done)
        settle(server, survivors, server.fd_count())
        baseline = server.fd_count()
        rss_start = rss_kib(server.pid)
        print(
            f"server pid {server.pid}: baseline {baseline} fds, RSS {rss_start} KiB, "
            f"{args.survivors} survivors, {args.vectors} vectors, seed {args.seed}"
        )
        print(f"{'cycles':>7} {'cycles/s':>9} {'fds':>5} {'RSS KiB':>8}  counters")
        sleepers: list[socket.socket] = []
        start = time.perf_counter()
        for cycle in range(1, args.cycles + 1):
            kind = rng.choice(kinds)
            sleeper = one_cycle(kind, server.socket_path, args.vectors, rng)
            if sleeper is not None:
                sleepers.append(sleeper)
            if len(sleepers) > 3 or (sleepers and rng.random() < 0.2):
                sleepers.pop(0).close()
            for peer in survivors:
                peer.pump()
            if cycle % args.report == 0 or cycle == args.cycles:
                for sock in sleepers:
                    sock.close()
                sleepers.clear()
                settle(server, survivors, baseline)
                elapsed = time.perf_counter() - start
                counters = server.status()["counters"]
                shown = {
                    k: counters[k]
                    for k in ("joins", "leaves", "clients_sent_data", "slow_clients_dropped")
                }
                print(
                    f"{cycle:>7} {cycle / elapsed:>9.0f} {server.fd_count():>5} "
                    f"{rss_kib(server.pid):>8}  {shown}",
                    flush=True,
                )
        rss_end = rss_kib(server.pid)
        leaked = server.fd_count() - baseline
        for peer in survivors:
            peer.close()
    print(
        f"done: {args.cycles} cycles, {leaked} fds leaked, RSS {rss_start} -> {rss_end} KiB "
        f"({rss_end - rss_start:+d} KiB)"
    )
    return 0 if leaked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

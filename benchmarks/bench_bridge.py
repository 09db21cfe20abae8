"""Bridged channels against raw Zenoh, same payloads, same run.

Two Python processes in each variant:

* **raw Zenoh**: the parent publishes on ``bench/raw/ping`` with a declared publisher
  (reliable, congestion control BLOCK), the child subscribes; for the round trip the child
  puts every sample back on ``bench/raw/pong``, which the parent receives. Zenoh peers talk
  TCP over 127.0.0.1, scouting and Zenoh's shared memory off - the same settings as the
  bridges, including the bridges' tuning of Zenoh's queues and buffers
  (``ivshmem.bridge.config.ZENOH_TUNING``). The ratios are against this raw variant; a
  second one with Zenoh's own defaults (``raw-default``) is printed beside it.
* **bridged**: the parent is a host peer of ivshmem server A and sends on channel ``ping``
  to bridge A with :class:`~ivshmem.channel.Sender`; bridge A relays it over Zenoh to bridge
  B, which delivers it into server B's region to the child (a host peer there, using
  :class:`~ivshmem.channel.Receiver`); ``pong`` goes back the same way. Six processes: two
  servers (idle), two bridges, the two ends.

Throughput: the parent sends ``count`` messages as fast as it can; the clock stops when the
child reports it received them all (so it includes the whole pipeline draining). Round
trip: one message at a time, ``rounds`` times; the median of the per-round times. Every
repetition runs both variants back to back, sizes 64 B, 4 KiB, 1 MiB; ratios are of the
medians over repetitions. Targets (issue 11): bridged throughput >= 0.8x raw, round trip
<= 1.5x raw.

    .venv/bin/python benchmarks/bench_bridge.py --repeats 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bridgeproc import BridgeProcess, free_port, zenoh_session, zenoh_shm_files

from ivshmem.launch import start_server, stop_server

SIZES = (64, 4096, 1 << 20)
CAPACITY = 4 << 20
THROUGHPUT_TARGET = 0.8
ROUND_TRIP_TARGET = 1.5
_SERVER_ARGS = ["-l", "64M", "-n", "4", "--memfd", "--format", "--max-peers", "4"]


def _counts(size: int, scale: float) -> tuple[int, int]:
    """(messages for throughput, rounds for the round trip) at ``size``."""
    if size <= 64:
        return int(100_000 * scale), int(1000 * scale)
    if size <= 4096:
        return int(40_000 * scale), int(1000 * scale)
    return max(20, int(300 * scale)), max(20, int(100 * scale))


# -- the child processes ------------------------------------------------------------------


def _child_raw(port: int, tuned: bool) -> None:
    """Subscriber and echo for raw Zenoh. Commands on stdin: ``count N`` (report when N
    samples arrived), ``echo`` (put every sample back)."""
    import zenoh

    session = zenoh_session(listen=[f"tcp/127.0.0.1:{port}"], tuned=tuned)
    pong = session.declare_publisher(
        "bench/raw/pong",
        congestion_control=zenoh.CongestionControl.BLOCK,
        reliability=zenoh.Reliability.RELIABLE,
    )
    state = {"want": -1, "got": 0, "echo": False}
    done = threading.Event()

    def on_sample(sample: Any) -> None:
        if state["echo"]:
            pong.put(sample.payload.to_bytes())
            return
        sample.payload.to_bytes()  # what a consumer does: take the bytes
        state["got"] += 1
        if state["got"] == state["want"]:
            done.set()

    sub = session.declare_subscriber("bench/raw/ping", on_sample)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "count":
            done.clear()
            state.update(want=int(cmd[1]), got=0, echo=False)
            print("armed", flush=True)
            done.wait()
            print("done", flush=True)
        elif cmd[0] == "echo":
            state["echo"] = True
            print("armed", flush=True)
        elif cmd[0] == "quit":
            break
    sub.undeclare()
    pong.undeclare()
    session.close()


def _child_bridged(socket_path: str) -> None:
    """The host peer on site B: ``bridge ID`` names bridge B, then ``count N`` / ``echo R``."""
    from ivshmem import connect
    from ivshmem.channel import Receiver, Sender

    peer = connect(socket_path, vectors=4)
    print(f"ready {peer.id}", flush=True)
    rx: Receiver | None = None
    tx: Sender | None = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "bridge":
            bridge = int(cmd[1])
            rx = Receiver(peer, "ping", bridge, capacity=CAPACITY, vector=0, timeout=30)
            tx = Sender(peer, "pong", bridge, vector=1, timeout=30)
            print("armed", flush=True)
        elif cmd[0] == "count":
            assert rx is not None
            want = int(cmd[1])
            print("armed", flush=True)
            got = 0
            while got < want:
                got += len(rx.recv_many(timeout=60))
            print("done", flush=True)
        elif cmd[0] == "echo":
            assert rx is not None and tx is not None
            print("armed", flush=True)
            for _ in range(int(cmd[1])):
                tx.send(rx.recv(timeout=60), timeout=60)
        elif cmd[0] == "quit":
            break
    for end in (rx, tx):
        if end is not None:
            end.close()
    peer.close()


# -- the parent ---------------------------------------------------------------------------


class Child:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.first = self.expect("ready")

    def expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            raise RuntimeError(f"child said {line!r}, expected {word!r}")
        return line

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.say("quit")
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU microseconds per message of each named process over one measurement."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: _cpu(pid) for name, pid in pids.items()}

    def per_message(self, count: int) -> dict[str, float]:
        return {n: (_cpu(p) - self.start[n]) * 1e6 / count for n, p in self.pids.items()}


def wakeups(rounds: int = 2000) -> dict[str, float]:
    """This machine's price of a wake-up, which every hop between two processes pays when the
    receiving one sleeps: the median round trip of an eventfd ping-pong between two processes
    on one CPU and on two CPUs, and what one eventfd_write costs the thread that wakes a
    sleeper on the other CPU (in a VM, waking an idle virtual CPU exits to the hypervisor)."""
    out: dict[str, float] = {}
    cpus = sorted(os.sched_getaffinity(0))
    mine = set(cpus)
    pairs = {"same_cpu": (cpus[0], cpus[0])}
    if len(cpus) > 1:
        pairs["two_cpus"] = (cpus[0], cpus[1])
    for name, (a, b) in pairs.items():
        ping, pong = os.eventfd(0), os.eventfd(0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.sched_setaffinity(0, {b})
            while os.eventfd_read(ping) == 1:
                os.eventfd_write(pong, 1)
            os._exit(0)
        try:
            os.sched_setaffinity(0, {a})
            trips, costs = [], []
            for i in range(rounds):
                if i % 2:
                    time.sleep(0.0002)  # let the other side fall asleep
                t0 = time.perf_counter()
                os.eventfd_write(ping, 1)
                t1 = time.perf_counter()
                os.eventfd_read(pong)
                trips.append(time.perf_counter() - t0)
                costs.append(t1 - t0)
            out[f"{name}_rtt_us"] = statistics.median(trips) * 1e6
            out[f"{name}_waker_us"] = statistics.median(costs) * 1e6
        finally:
            os.eventfd_write(ping, 2)
            os.waitpid(pid, 0)
            os.close(ping)
            os.close(pong)
            os.sched_setaffinity(0, mine)
    return out


def _payload(size: int) -> bytes:
    return os.urandom(size)


def _echo(child: Child, tx: Any, rx: Any, size: int, rounds: int) -> float:
    """Median time of ``rounds`` messages of ``size`` echoed by ``child`` through ``tx``/``rx``
    (after 10 unmeasured ones)."""
    data = _payload(size)
    child.say(f"echo {rounds + 10}")
    child.expect("armed")
    times = []
    for _ in range(rounds + 10):
        t0 = time.perf_counter()
        tx.send(data, 60)
        rx.recv(60)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:])


def raw_variant(port: int, tuned: bool) -> tuple[Any, Any, Child]:
    import zenoh

    child = Child("raw", str(port), "tuned" if tuned else "default")
    session = zenoh_session(connect=[f"tcp/127.0.0.1:{port}"], tuned=tuned)
    pub = session.declare_publisher(
        "bench/raw/ping",
        congestion_control=zenoh.CongestionControl.BLOCK,
        reliability=zenoh.Reliability.RELIABLE,
    )
    time.sleep(1.0)  # let the subscriber's declaration reach us
    return session, pub, child


def raw_throughput(
    pub: Any, child: Child, size: int, count: int, cpu: dict[str, list[float]]
) -> float:
    data = _payload(size)
    child.say(f"count {count}")
    child.expect("armed")
    meter = CpuMeter({"raw publisher": os.getpid(), "raw subscriber": child.proc.pid})
    t0 = time.perf_counter()
    for _ in range(count):
        pub.put(data)
    child.expect("done")
    rate = count / (time.perf_counter() - t0)
    for name, us in meter.per_message(count).items():
        cpu.setdefault(name, []).append(us)
    return rate


def raw_round_trip(session: Any, pub: Any, child: Child, size: int, rounds: int) -> float:
    sub = session.declare_subscriber("bench/raw/pong")
    child.say("echo")
    child.expect("armed")
    time.sleep(0.5)
    data = _payload(size)
    times = []
    for _ in range(rounds + 10):
        t0 = time.perf_counter()
        pub.put(data)
        sub.recv().payload.to_bytes()
        times.append(time.perf_counter() - t0)
    sub.undeclare()
    # Back to counting mode for the next throughput run: the child leaves echo on "count".
    return statistics.median(times[10:])


class Sites:
    """Two servers, two bridges (ping a -> b, pong b -> a), the parent's peer on A and the
    child on B."""

    def __init__(self, tmp: Path, bridge_args: list[str]) -> None:
        from ivshmem import connect
        from ivshmem.channel import Receiver, Sender

        self.servers = []
        self.bridges: list[BridgeProcess] = []
        self.child: Child | None = None
        try:
            for name in ("a", "b"):
                sock = str(tmp / f"{name}.sock")
                self.servers.append(start_server(
                    sock, _SERVER_ARGS,
                    str(tmp / f"{name}.server.log"),
                ))  # fmt: skip
            self.peer = connect(str(tmp / "a.sock"), vectors=4)
            self.child = Child("bridged", str(tmp / "b.sock"))
            child_id = int(self.child.first.split()[1])
            pa, pb = free_port(), free_port()
            common = ["--capacity", str(CAPACITY), *bridge_args]
            self.bridges.append(BridgeProcess(
                ["--site", "a", "--socket", str(tmp / "a.sock"), "--listen",
                 f"tcp/127.0.0.1:{pa}", "--out", f"ping:{self.peer.id}", "--in",
                 f"b/pong:{self.peer.id}", *common], tmp / "bridge-a.log",
            ).start())  # fmt: skip
            self.bridges.append(BridgeProcess(
                ["--site", "b", "--socket", str(tmp / "b.sock"), "--listen",
                 f"tcp/127.0.0.1:{pb}", "--connect", f"tcp/127.0.0.1:{pa}", "--in",
                 f"a/ping:{child_id}", "--out", f"pong:{child_id}", *common],
                tmp / "bridge-b.log",
            ).start())  # fmt: skip
            self.child.say(f"bridge {self.bridges[1].peer_id}")
            self.child.expect("armed")
            bridge_a = self.bridges[0].peer_id
            self.rx = Receiver(self.peer, "pong", bridge_a, capacity=CAPACITY, vector=1,
                               timeout=30)  # fmt: skip
            self.tx = Sender(self.peer, "ping", bridge_a, vector=0, timeout=30)
        except BaseException:
            self.close()
            raise

    def throughput(self, size: int, count: int, cpu: dict[str, list[float]]) -> float:
        assert self.child is not None
        data = _payload(size)
        self.child.say(f"count {count}")
        self.child.expect("armed")
        pids = {"sender (host peer A)": os.getpid(), "receiver (host peer B)": self.child.proc.pid}
        for name, b in zip(("bridge A", "bridge B"), self.bridges, strict=True):
            assert b.proc is not None
            pids[name] = b.proc.pid
        meter = CpuMeter(pids)
        t0 = time.perf_counter()
        send = self.tx.send
        for _ in range(count):
            send(data, 60)
        self.child.expect("done")
        rate = count / (time.perf_counter() - t0)
        for name, us in meter.per_message(count).items():
            cpu.setdefault(name, []).append(us)
        return rate

    def round_trip(self, size: int, rounds: int) -> float:
        assert self.child is not None
        return _echo(self.child, self.tx, self.rx, size, rounds)

    def close(self) -> None:
        for end in (getattr(self, "tx", None), getattr(self, "rx", None)):
            if end is not None:
                end.close()
        if self.child is not None:
            self.child.close()
        for b in self.bridges:
            b.stop()
        if hasattr(self, "peer"):
            self.peer.close()
        for s in self.servers:
            stop_server(s)


class LocalEcho:
    """The local hop alone, for "where the time goes": the same echo between two host peers
    of one server, through one channel each way, waiting the same way (spin, then sleep)."""

    def __init__(self, tmp: Path) -> None:
        from ivshmem import connect
        from ivshmem.channel import Receiver, Sender

        sock = str(tmp / "local.sock")
        self.server = start_server(
            sock, _SERVER_ARGS,
            str(tmp / "local.server.log"),
        )  # fmt: skip
        self.peer = connect(sock, vectors=4)
        self.child = Child("bridged", sock)
        child_id = int(self.child.first.split()[1])
        self.child.say(f"bridge {self.peer.id}")  # the child treats us as its bridge
        self.rx = Receiver(self.peer, "pong", child_id, capacity=CAPACITY, vector=1, timeout=30)
        self.child.expect("armed")
        self.tx = Sender(self.peer, "ping", child_id, vector=0, timeout=30)

    def round_trip(self, size: int, rounds: int) -> float:
        return _echo(self.child, self.tx, self.rx, size, rounds)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        self.child.close()
        self.peer.close()
        stop_server(self.server)


def run(
    repeats: int, scale: float, sizes: tuple[int, ...], bridge_args: list[str]
) -> dict[str, Any]:
    before = zenoh_shm_files()
    results: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    unused: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ivbb-", dir="/tmp") as d:
        raws = {"raw": raw_variant(free_port(), True), "rawdef": raw_variant(free_port(), False)}
        sites = Sites(Path(d), bridge_args)
        local = LocalEcho(Path(d))
        try:
            for rep in range(repeats):
                for size in sizes:
                    count, rounds = _counts(size, scale)
                    r = results.setdefault(str(size), {})
                    c = cpu.setdefault(str(size), {})
                    for name, (_, pub, child) in raws.items():
                        r.setdefault(f"{name}_msgs_per_s", []).append(raw_throughput(
                            pub, child, size, count, c if name == "raw" else unused))  # fmt: skip
                    r.setdefault("bridged_msgs_per_s", []).append(
                        sites.throughput(size, count, c))  # fmt: skip
                    for name, (session, pub, child) in raws.items():
                        r.setdefault(f"{name}_rtt_s", []).append(
                            raw_round_trip(session, pub, child, size, rounds))  # fmt: skip
                    r.setdefault("bridged_rtt_s", []).append(sites.round_trip(size, rounds))
                    r.setdefault("local_rtt_s", []).append(local.round_trip(size, rounds))
                    print(f"  repetition {rep + 1} size {size}: done", file=sys.stderr)
        finally:
            local.close()
            sites.close()
            for session, pub, child in raws.values():
                child.close()
                pub.undeclare()
                session.close()
    leftover = zenoh_shm_files() - before
    out: dict[str, Any] = {"sizes": {}, "zenoh_shm_left": sorted(leftover), "wakeups": wakeups()}
    for key, r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        tput = med["bridged_msgs_per_s"] / med["raw_msgs_per_s"]
        rtt = med["bridged_rtt_s"] / med["raw_rtt_s"]
        out["sizes"][key] = {
            "raw_msgs_per_s": med["raw_msgs_per_s"],
            "raw_default_msgs_per_s": med["rawdef_msgs_per_s"],
            "bridged_msgs_per_s": med["bridged_msgs_per_s"],
            "raw_MB_per_s": med["raw_msgs_per_s"] * int(key) / 1e6,
            "bridged_MB_per_s": med["bridged_msgs_per_s"] * int(key) / 1e6,
            "throughput_ratio": tput,
            "throughput_ratio_vs_default": med["bridged_msgs_per_s"] / med["rawdef_msgs_per_s"],
            "raw_rtt_us": med["raw_rtt_s"] * 1e6,
            "raw_default_rtt_us": med["rawdef_rtt_s"] * 1e6,
            "bridged_rtt_us": med["bridged_rtt_s"] * 1e6,
            "rtt_ratio": rtt,
            "rtt_ratio_vs_default": med["bridged_rtt_s"] / med["rawdef_rtt_s"],
            "local_channel_rtt_us": med["local_rtt_s"] * 1e6,
            "throughput_ok": tput >= THROUGHPUT_TARGET,
            "rtt_ok": rtt <= ROUND_TRIP_TARGET,
            "cpu_us_per_msg": {k: statistics.median(v) for k, v in cpu[key].items()},
            "all": {k: v for k, v in r.items()},
        }
    return out


def _print(result: dict[str, Any], repeats: int) -> None:
    load = os.getloadavg()[0]
    print(f"bridged channel vs raw Zenoh, medians of {repeats} repetitions "
          f"(load average {load:.2f} at the end)")  # fmt: skip
    print("  raw: the bridges' Zenoh settings; raw-default: Zenoh's defaults; ratios: bridged"
          " / raw (/ raw-default)")  # fmt: skip
    print(f"  {'size':>8} {'raw msg/s':>10} {'default':>9} {'bridged':>9} {'ratio':>12}   "
          f"{'raw rtt us':>10} {'default':>8} {'bridged':>8} {'ratio':>12}")  # fmt: skip
    for size, r in result["sizes"].items():
        print(
            f"  {int(size):>8} {r['raw_msgs_per_s']:>10.0f} {r['raw_default_msgs_per_s']:>9.0f}"
            f" {r['bridged_msgs_per_s']:>9.0f} {r['throughput_ratio']:>5.2f}"
            f"{'' if r['throughput_ok'] else '!'} ({r['throughput_ratio_vs_default']:.2f}) "
            f"{r['raw_rtt_us']:>10.0f} {r['raw_default_rtt_us']:>8.0f} "
            f"{r['bridged_rtt_us']:>8.0f} {r['rtt_ratio']:>5.2f}"
            f"{'' if r['rtt_ok'] else '!'} ({r['rtt_ratio_vs_default']:.2f})"
        )
    print("  the local hop alone: channel echo between two host peers of one server, us:")
    print("  " + ", ".join(f"{int(k)} B {r['local_channel_rtt_us']:.0f}"
                           for k, r in result["sizes"].items()))  # fmt: skip
    w = result["wakeups"]
    print("  a wake-up on this machine (eventfd ping-pong between two processes, median us):")
    print(
        f"  round trip on one CPU {w['same_cpu_rtt_us']:.1f}"
        + (
            f", on two CPUs {w['two_cpus_rtt_us']:.1f}; waking a sleeper on the other CPU "
            f"costs the waker {w['two_cpus_waker_us']:.1f}"
            if "two_cpus_rtt_us" in w
            else ""
        )
    )
    print("  CPU per message during the throughput runs, us (median; all threads):")
    for size, r in result["sizes"].items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us_per_msg"].items())
        print(f"  {int(size):>8}  {parts}")
    print(f"  targets: throughput >= {THROUGHPUT_TARGET}x raw, round trip <= "
          f"{ROUND_TRIP_TARGET}x raw ('!' marks a miss)")  # fmt: skip
    if result["zenoh_shm_left"]:
        print(f"  WARNING: Zenoh left {result['zenoh_shm_left']} in /dev/shm")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        if sys.argv[2] == "raw":
            _child_raw(int(sys.argv[3]), sys.argv[4] == "tuned")
        else:
            _child_bridged(sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--bridge-args",
        default="",
        help="extra options for both bridges, e.g. '--window-messages 4096'",
    )
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    result = run(args.repeats, args.scale, sizes, args.bridge_args.split())
    _print(result, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

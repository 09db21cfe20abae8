"""Where a BAR0 access to our vfio-user device spends its time, layer by layer.

Every BAR0 access of a guest, doorbell writes included, is one synchronous vfio-user round
trip: QEMU 11's client sets up no ioeventfd and turns posted writes off once a region is
mmap-able. This script times the same 4-byte Doorbell write through each layer, in one run,
repetitions interleaved so a burst of load from elsewhere hits every variant alike:

* **sans-IO**: :class:`~ivshmem.device.vfio_user.Connection` parsing a REGION_WRITE plus
  :meth:`~ivshmem.device.model.IvshmemFunction.handle` building the reply (no syscalls);
* **socket**: a raw vfio-user client in this process doing REGION_WRITE round trips with an
  ``ivshmem-device`` process (the device's whole request path plus two context switches);
* **qtest, ours**: QEMU 11 (``-accel qtest``) writing the Doorbell of our device (the qtest
  text protocol + QEMU's vfio-user client + the device);
* **qtest, QEMU's**: the same write to QEMU's own ``ivshmem-doorbell`` in the same QEMU 11
  (handled inside QEMU: the qtest floor plus an eventfd write);
* **qtest, RAM**: a qtest ``writel`` to guest RAM (the qtest floor alone).

Both devices are peers of one ``ivshmem-server``, and both ring a host peer that never reads
(an eventfd write either way). Prints the median per operation of each variant and the ratios.
Run: ``python benchmarks/bench_device_path.py [--ops 2000] [--reps 5]``. Needs QEMU >= 10.1
(``ivshmem lab fetch --qemu11``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from qtest import IvshmemDevice, Qemu, find_pci_devices, poll_until  # noqa: E402
from serverproc import RawPeer, ServerProcess  # noqa: E402

from ivshmem import registers as reg  # noqa: E402
from ivshmem.device import DeviceOptions, IvshmemFunction  # noqa: E402
from ivshmem.device import vfio_user as vu  # noqa: E402
from ivshmem.lab import qemu11  # noqa: E402

HEADER = struct.Struct("<HHIII")


def timed(op: Callable[[], None], ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        op()
    return (time.perf_counter() - start) / ops * 1e6


def sans_io_op(value: int) -> Callable[[], None]:
    fd = os.memfd_create("bench")
    os.ftruncate(fd, 1 << 20)
    function = IvshmemFunction("bench", DeviceOptions(vectors=1), fd, 1 << 20)
    os.close(fd)
    function.ring = lambda peer, vector: None
    conn = vu.Connection()
    payload = struct.pack("<QII", reg.DOORBELL, 0, 4) + struct.pack("<I", value)
    message = HEADER.pack(1, vu.REGION_WRITE, 16 + len(payload), 0, 0) + payload
    head, body = message[:16], message[16:]

    def op() -> None:
        conn.feed(head)
        request = conn.feed(body)
        assert request is not None
        function.handle(request)

    return op


def socket_op(path: str, value: int) -> tuple[Callable[[], None], socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    caps = json.dumps({"capabilities": {}}).encode() + b"\0"
    version = struct.pack("<HH", 0, 0) + caps
    sock.sendall(HEADER.pack(1, vu.VERSION, 16 + len(version), 0, 0) + version)
    header = sock.recv(16)
    sock.recv(HEADER.unpack(header)[2] - 16)
    payload = struct.pack("<QII", reg.DOORBELL, 0, 4) + struct.pack("<I", value)
    message = HEADER.pack(2, vu.REGION_WRITE, 16 + len(payload), 0, 0) + payload

    def op() -> None:
        sock.sendall(message)
        reply = sock.recv(64)
        assert len(reply) == 32, reply

    return op, sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (medians reported)")
    args = parser.parse_args()
    prefix = qemu11.prepare().argv()
    work = Path(tempfile.mkdtemp(prefix="bdp-", dir="/tmp"))
    ours_sock, raw_sock = work / "ours.sock", work / "raw.sock"
    results: dict[str, list[float]] = {}
    with ServerProcess(work, size="1M", vectors=1) as server:
        host = RawPeer(server.socket_path, keep_fds=True)
        host.wait(lambda: host.id is not None)
        assert host.id is not None
        ring_host = host.id << 16
        device = subprocess.Popen(
            [
                sys.executable, "-m", "ivshmem.cli.device",
                "--socket", str(ours_sock), "--server", server.socket_path,
                "--vm", f"socket={raw_sock},server={server.socket_path}",
            ],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        qemu: Qemu | None = None
        raw: socket.socket | None = None
        try:
            assert poll_until(lambda: ours_sock.exists() and raw_sock.exists(), 30)
            qemu_args = [
                "-device", json.dumps({"driver": "vfio-user-pci",
                                       "socket": {"type": "unix", "path": str(ours_sock)}}),
                "-chardev", f"socket,id=ivs,path={server.socket_path}",
                "-device", "ivshmem-doorbell,chardev=ivs,vectors=1",
            ]  # fmt: skip
            qemu = Qemu(prefix, work, qemu_args, accel="qtest")
            devices = [IvshmemDevice(d) for d in find_pci_devices(qemu, 0x1AF4, 0x1110)]
            ours = next(d for d in devices if d.read_register(reg.EXT_MAGIC))
            theirs = next(d for d in devices if not d.read_register(reg.EXT_MAGIC))
            host.wait(lambda: len(host.peers) >= 3)  # both devices and the raw VM
            q = qemu
            socket_ring, raw = socket_op(str(raw_sock), ring_host)
            variants: dict[str, Callable[[], None]] = {
                "sans-IO": sans_io_op(ring_host),
                "socket": socket_ring,
                "qtest, ours": lambda: q.writel(ours.bar0 + reg.DOORBELL, ring_host),
                "qtest, QEMU's": lambda: q.writel(theirs.bar0 + reg.DOORBELL, ring_host),
                "qtest, RAM": lambda: q.writel(Qemu.SCRATCH_RAM, ring_host),
            }
            for name, op in variants.items():
                timed(op, 50)  # warm up
                results[name] = []
            for _ in range(args.reps):
                for name, op in variants.items():
                    results[name].append(timed(op, args.ops))
        finally:
            if raw is not None:
                raw.close()
            if qemu is not None:
                qemu.close()
            device.terminate()
            try:
                device.wait(timeout=20)
            except subprocess.TimeoutExpired:
                device.kill()
                device.wait()
            host.close()
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"Doorbell write, median of {args.reps} x {args.ops} ops (µs per op; machine shared):")
    for name, value in medians.items():
        print(f"  {name:15s} {value:8.1f}")
    floor = medians["qtest, RAM"]
    ours_us, theirs_us = medians["qtest, ours"], medians["qtest, QEMU's"]
    print("ratios:")
    print(f"  qtest ours / QEMU's              {ours_us / theirs_us:.2f}")
    print(f"  ours above the qtest floor       {ours_us - floor:.1f} µs")
    print(f"  QEMU's above the qtest floor     {theirs_us - floor:.1f} µs")
    print(f"  socket round trip (device path)  {medians['socket']:.1f} µs")
    print(f"  of which Python handling         {medians['sans-IO']:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

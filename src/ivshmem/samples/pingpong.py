"""Ping-pong: the round-trip latency of a message between two peers.

One peer runs ``pong`` (it echoes every message back), the other ``ping`` (it sends a
message, waits for the echo, and measures the time). Both open a :class:`~ivshmem.channel.Duplex`
named ``pingpong``: a channel each way, each created by its receiver, so neither side sends
before the other has opened its endpoint (which matters in a guest: QEMU drops a doorbell rung
at a device whose MSI-X vectors are not enabled yet).

::

    ivshmem-server -F -S /tmp/ivshmem_socket -l 64M -n 2 --memfd --format &
    ivshmem sample pingpong pong &
    ivshmem sample pingpong ping --count 10000

    # inside a lab guest, the same code through the PCI device:
    python -m ivshmem.samples.pingpong ping --endpoint pci

A message is an 8-byte sequence number followed by a fixed pattern, ``--size`` bytes in all.
Both sides check every byte of every message (pong: the sequence number it expects next and
the pattern; ping: that the echo equals what it sent), outside the timed part. Ping reports
the round trip (send, echo, receive) over ``--count`` exchanges after ``--warmup`` untimed
ones: minimum, median (p50), 99th percentile, maximum and mean, in microseconds. Pong ends when
ping closes its channel.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..channel import DEFAULT_CAPACITY, ChannelClosedError, Duplex
from ..channel.ring import max_payload
from ._common import (
    CheckFailed,
    SampleError,
    add_common_arguments,
    attach,
    channel_options,
    describe,
    discover,
    emit,
    given_peers,
    open_endpoint,
    percentile,
    progress,
    run_main,
    size_arg,
)

NAME = "pingpong"
HELP = "round-trip latency between two peers (ping measures, pong echoes)"
CHANNEL = "pingpong"
_SEQ = struct.Struct("<Q")


def payload(size: int) -> bytearray:
    """A message of ``size`` bytes with sequence number 0: 8 bytes of sequence number, then a
    pattern that differs from byte to byte (so a shifted or partial copy does not match)."""
    body = bytes((i * 31 + 7) & 0xFF for i in range(251))
    reps = size // len(body) + 1
    return bytearray(bytes(8) + (body * reps)[: size - 8])


def _capacity_for(size: int) -> int:
    """A ring that holds a message of ``size`` bytes (a message may use half the ring)."""
    need = 2 * (size + 16)
    return max(DEFAULT_CAPACITY, 1 << (need - 1).bit_length())


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=("ping", "pong"), help="ping measures, pong echoes")
    parser.add_argument(
        "-c", "--count", type=int, default=1000, help="timed round trips (ping; default 1000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=100, help="untimed round trips first (ping; default 100)"
    )
    parser.add_argument(
        "-s",
        "--size",
        type=size_arg,
        default=64,
        metavar="BYTES",
        help="message size, at least 8 (ping; default 64)",
    )
    parser.add_argument(
        "--capacity",
        type=size_arg,
        metavar="BYTES",
        help="ring size of the channel this side receives on, a power of two (default: "
        f"{DEFAULT_CAPACITY // 1024}K, or enough for --size); pong needs it for messages "
        f"above {max_payload(DEFAULT_CAPACITY)} bytes",
    )
    add_common_arguments(
        parser, peers="the other peer's id (default: the only other peer in the membership table)"
    )


def run(args: argparse.Namespace) -> int:
    if args.count < 1 or args.warmup < 0:
        raise SampleError("--count must be at least 1 and --warmup at least 0")
    if args.size < 8:
        raise SampleError(f"--size {args.size} is too small: a message carries an 8-byte number")
    capacity = args.capacity or _capacity_for(args.size if args.role == "ping" else 0)
    with open_endpoint(args) as ep:
        region = attach(ep, args)
        [peer] = discover(ep, region, 1, given_peers(args), args.timeout)
        progress(f"pingpong {args.role}: {describe(ep)}; peer {peer}")
        with Duplex(ep, CHANNEL, peer, capacity=capacity, **channel_options(args)) as link:
            result = _ping(link, args) if args.role == "ping" else _pong(link, args)
        result.update(sample=NAME, role=args.role, id=ep.id, peer=peer, endpoint=describe(ep))
    if args.role == "ping":
        rtt = result["rtt_us"]
        lines = [
            f"pingpong: {args.count} round trips of {args.size} B between peer {ep.id} and "
            f"peer {peer} (+{args.warmup} warm-up), every reply checked",
            f"round trip: p50 {rtt['p50']:.1f} us  p99 {rtt['p99']:.1f} us  "
            f"(min {rtt['min']:.1f}, mean {rtt['mean']:.1f}, max {rtt['max']:.1f})",
        ]
    else:
        lines = [f"pingpong: echoed {result['echoed']} messages from peer {peer}, all checked"]
    emit(args, result, lines)
    return 0


def _ping(link: Duplex, args: argparse.Namespace) -> dict[str, Any]:
    tx, rx = link.tx, link.rx
    size, timeout = args.size, args.timeout
    if size > max_payload(tx.capacity):
        raise SampleError(
            f"{size}-byte messages do not fit the pong side's ring of {tx.capacity} bytes (at "
            f"most {max_payload(tx.capacity)}): start pong with --capacity "
            f"{_capacity_for(size)}"
        )
    message = payload(size)
    pack, clock = _SEQ.pack_into, time.perf_counter_ns
    rtts: list[int] = []
    for seq in range(args.warmup + args.count):
        pack(message, 0, seq)
        start = clock()
        tx.send(message, timeout)
        reply = rx.recv_view(timeout)
        end = clock()
        # Equal lengths and one a prefix of the other: the echo is byte for byte what we sent.
        if len(reply) != size or not message.startswith(reply):
            got = bytes(reply[:8])
            rx.release()
            raise CheckFailed(
                f"round trip {seq}: the echo ({len(reply)} bytes, starting {got.hex()}) differs "
                f"from the {size}-byte message sent"
            )
        rx.release()
        if seq >= args.warmup:
            rtts.append(end - start)
    rtts.sort()
    us = [t / 1000 for t in rtts]
    return {
        "size": size,
        "count": args.count,
        "warmup": args.warmup,
        "checked": args.warmup + args.count,
        "rtt_us": {
            "min": us[0],
            "p50": percentile(us, 50),
            "p99": percentile(us, 99),
            "max": us[-1],
            "mean": sum(us) / len(us),
        },
    }


def _pong(link: Duplex, args: argparse.Namespace) -> dict[str, Any]:
    tx, rx = link.tx, link.rx
    timeout = args.timeout
    expected: bytearray | None = None
    pack = _SEQ.pack_into
    seq = 0
    while True:
        try:
            view = rx.recv_view(timeout)
        except ChannelClosedError:
            break  # ping is done and closed its channel, after we received everything
        n = len(view)
        if n < 8:
            rx.release()
            raise CheckFailed(f"message {seq} has {n} bytes, fewer than its sequence number")
        if expected is None or len(expected) != n:
            expected = payload(n)
        pack(expected, 0, seq)
        if not expected.startswith(view):  # same length: byte for byte equal
            got = _SEQ.unpack_from(view)[0]
            rx.release()
            raise CheckFailed(
                f"message {seq}: sequence number {got} or the pattern after it is wrong "
                "(lost, repeated or damaged message)"
            )
        out = tx.reserve(n, timeout)  # zero copy: one copy, from one ring into the other
        out[:] = view
        tx.commit()
        rx.release()
        seq += 1
    return {"echoed": seq, "checked": seq}


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, configure, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Bandwidth: how fast bulk data streams from one peer to another, every byte checked.

One peer runs ``recv``, the other ``send``. The sender streams ``--count`` messages of
``--size`` bytes over the channel ``bandwidth``; the receiver checks every byte of every
message and sends its verdict back over ``bandwidth-report``, so both sides print the same
checked result::

    ivshmem-server -F -S /tmp/ivshmem_socket -l 64M -n 2 --memfd --format &
    ivshmem sample bandwidth recv &
    ivshmem sample bandwidth send --size 256K --count 4000

Messages go zero-copy at both ends: the sender ``reserve()``s room in the ring and writes the
message there (one copy, from its source buffer into shared memory); the receiver compares
the message in place (``recv_view()``) and ``release()``s it. A message is an 8-byte sequence
number and ``size - 8`` bytes cut from a pseudo-random block at an offset that moves with the
sequence number; the block is generated on both sides from a seed the sender announces first.
So a lost, repeated, reordered, torn or stale message fails the check.

The receiver's figure is the one reported: bytes of payload checked per second, in MB/s
(10**6 bytes). It includes writing and checking every byte
in Python (``memcpy``/``memcmp`` speed), which is what an application that touches its data
pays. The clock starts when the receiver has the sender's announcement, sent just before
the stream. The ring is as large as the receiver's arena allows (up to 4 MiB; ``--capacity``), and a
message may use half of it.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..channel import Receiver, Region, Sender
from ..channel.layout import PAGE
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
    progress,
    run_main,
    size_arg,
)

NAME = "bandwidth"
HELP = "bulk throughput from a sender to a receiver, every byte checked"
DATA = "bandwidth"
REPORT = "bandwidth-report"
_REPORT_CAPACITY = 4096
_MAX_AUTO_CAPACITY = 4 << 20
_HELLO = struct.Struct("<8sQQQ")  # magic, message size, message count, pattern seed
_MAGIC = b"IVBW\x00\x00\x00\x01"
_SEQ = struct.Struct("<Q")
_SPREAD = 4096  # the pattern offset cycles through this many bytes
_MAX_MESSAGE = 1 << 31


def pattern(seed: int, size: int) -> bytes:
    """The block messages are cut from (the same bytes on both sides for one seed)."""
    return random.Random(seed).randbytes(size - 8 + _SPREAD)


def offset(seq: int) -> int:
    return (seq * 8) % _SPREAD


def auto_capacity(region: Region) -> int:
    """The largest ring (a power of two, at most 4 MiB) that fits an empty arena of this
    region next to its one-page channel directory (a ring area is 256 bytes of control words
    plus the ring, rounded up to whole pages)."""
    room = region.arena_size - 2 * PAGE
    if room < 4096:
        return 4096
    return min(_MAX_AUTO_CAPACITY, 1 << (room.bit_length() - 1))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=("send", "recv"), help="send streams, recv checks")
    parser.add_argument(
        "-s",
        "--size",
        type=size_arg,
        default=64 * 1024,
        metavar="BYTES",
        help="message size, at least 8 (send; default 64K)",
    )
    parser.add_argument(
        "-c", "--count", type=int, default=2000, help="messages to send (send; default 2000)"
    )
    parser.add_argument(
        "--capacity",
        type=size_arg,
        metavar="BYTES",
        help="ring size of the data channel, a power of two (recv; default: as big as the "
        "arena allows, at most 4M); a message may use half of it",
    )
    add_common_arguments(
        parser, peers="the other peer's id (default: the only other peer in the membership table)"
    )


def run(args: argparse.Namespace) -> int:
    with open_endpoint(args) as ep:
        region = attach(ep, args)
        [peer] = discover(ep, region, 1, given_peers(args), args.timeout)
        progress(f"bandwidth {args.role}: {describe(ep)}; peer {peer}")
        if args.role == "send":
            result = _send(ep, region, peer, args)
        else:
            result = _recv(ep, region, peer, args)
        result.update(sample=NAME, role=args.role, id=ep.id, peer=peer, endpoint=describe(ep))
    status = 0
    if result["ok"]:
        lines = [
            f"bandwidth: {result['messages']} messages of {result['size']} B "
            f"({result['bytes'] / 1e6:.1f} MB) from peer {result['sender']} to peer "
            f"{result['receiver']}, every byte checked",
            f"throughput: {result['mb_per_s']:.1f} MB/s ({result['messages_per_s']:.0f} "
            f"messages/s) over {result['seconds']:.3f} s",
        ]
    else:
        lines = [f"bandwidth: the receiver reports a failed check: {result['error']}"]
        status = 1
    emit(args, result, lines)
    return status


def _send(ep: Any, region: Region, peer: int, args: argparse.Namespace) -> dict[str, Any]:
    size, count, timeout = args.size, args.count, args.timeout
    if not 8 <= size <= _MAX_MESSAGE or count < 1:
        raise SampleError("--size must be 8 bytes or more (below 2G) and --count at least 1")
    options = channel_options(args)
    # Our receiver first: the peer's Sender waits for it, as ours waits for the peer's.
    with (
        Receiver(ep, REPORT, peer, capacity=_REPORT_CAPACITY, **options) as reports,
        Sender(ep, DATA, peer, **options) as tx,
    ):
        if size > max_payload(tx.capacity):
            raise SampleError(
                f"{size}-byte messages do not fit the receiver's ring of {tx.capacity} bytes "
                f"(at most {max_payload(tx.capacity)}): give recv a bigger --capacity, or the "
                "server a bigger region (-l) or fewer peer slots (--max-peers)"
            )
        seed = random.getrandbits(63)
        block = memoryview(pattern(seed, size))
        body = size - 8
        tx.send(_HELLO.pack(_MAGIC, size, count, seed), timeout)
        pack = _SEQ.pack_into
        start = time.perf_counter()
        for seq in range(count):
            view = tx.reserve(size, timeout)
            pack(view, 0, seq)
            at = offset(seq)
            view[8:] = block[at : at + body]
            tx.commit()
        sent = time.perf_counter() - start
        raw = reports.recv(timeout)
    try:
        report = json.loads(raw)
        if not isinstance(report, dict):
            raise ValueError("not an object")
    except ValueError as err:  # the report comes from shared memory: check it like any data
        raise CheckFailed(f"the receiver's report is not JSON: {err}") from err
    report["send_seconds"] = sent
    return report


def _recv(ep: Any, region: Region, peer: int, args: argparse.Namespace) -> dict[str, Any]:
    timeout = args.timeout
    capacity = args.capacity or auto_capacity(region)
    options = channel_options(args)
    with (
        Receiver(ep, DATA, peer, capacity=capacity, **options) as rx,
        Sender(ep, REPORT, peer, **options) as reports,
    ):
        hello = rx.recv(timeout)
        if len(hello) != _HELLO.size:
            raise CheckFailed(f"the first message has {len(hello)} bytes, not a bandwidth hello")
        magic, size, count, seed = _HELLO.unpack(hello)
        if magic != _MAGIC or not 8 <= size <= _MAX_MESSAGE or count < 1:
            raise CheckFailed(f"bad hello from peer {peer}: {magic!r}, size {size}, count {count}")
        result: dict[str, Any] = {
            "sender": peer,
            "receiver": ep.id,
            "size": size,
            "capacity": rx.capacity,
        }
        try:
            seconds = _check_stream(rx, size, count, seed, timeout)
        except CheckFailed as err:
            # Tell the sender why before failing ourselves, so both sides say what went wrong.
            result.update(ok=False, error=str(err))
            reports.send(json.dumps(result).encode(), timeout)
            raise
        total = count * size
        result.update(
            ok=True,
            messages=count,
            bytes=total,
            checked_bytes=total,
            seconds=seconds,
            mb_per_s=total / seconds / 1e6,
            messages_per_s=count / seconds,
        )
        reports.send(json.dumps(result).encode(), timeout)
    return result


def _check_stream(rx: Receiver, size: int, count: int, seed: int, timeout: float) -> float:
    """Receive and check ``count`` messages; the seconds it took (from just after the hello,
    which the sender sends right before the stream)."""
    block = pattern(seed, size)
    unpack = _SEQ.unpack_from
    start = time.perf_counter()
    for seq in range(count):
        view = rx.recv_view(timeout)
        n = len(view)
        # A memcmp of the message in place against the block (no copy); the slice is a
        # temporary, gone before release() revokes the view.
        good = n == size and block.startswith(view[8:], offset(seq))
        got = unpack(view)[0] if n >= 8 else None
        rx.release()
        if not good or got != seq:
            raise CheckFailed(
                f"message {seq} (sequence number {got}, {n} bytes) is not what the sender "
                "wrote: lost, repeated, reordered or damaged"
            )
    return max(time.perf_counter() - start, 1e-9)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, configure, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

"""A shared counter: N peers each add 1 to one counter M times; the result must be exactly N*M.

Run the same command in every participant (host processes, guests, or both)::

    ivshmem-server -F -S /tmp/ivshmem_socket -l 64M -n 2 --memfd --format &
    ivshmem sample counter --peers 3 --increments 1000 &   # three times
    # in lab guests:  python -m ivshmem.samples.counter --endpoint pci --peers 3

**How.** The peers form a ring in the order of their ids (found in the membership table, or
given with ``--peer``). The counter is a token: a small message (kind, value, and the sender's
N and M, so that participants started with different numbers are told so) that travels round
the ring over channels named ``counter``, each peer receiving from its predecessor and sending
to its successor. The peer first in the ring starts it at 0. Whoever holds the token adds 1 to
it and passes it on; after M laps the first peer receives N*M, and sends a FINAL message with
that value once more round the ring so that every peer can check it and stop.

**Why this is exact without atomic instructions.** A shared-memory counter that several peers
increment needs an atomic read-modify-write, or increments are lost when two peers read the
same old value; Python has no such instruction on shared memory (and QEMU's guests and the
host would all have to use it). Here no memory location has two writers at all:

* there is exactly one token, created once by the first peer, and a peer changes the value
  only while it holds the token, between receiving it and sending it on, so increments happen
  one after another, never concurrently (mutual exclusion by token passing);
* each channel is a single-producer single-consumer ring whose every word has one writer
  (``ivshmem.channel.ring``): the sender publishes the message, then the index; on x86-64 those
  stores become visible in that order, so the receiver that sees the index sees the value;
* channels neither lose, duplicate nor reorder messages, so the token is never lost or cloned.

Every hop is also checked, so a broken link cannot go unnoticed: the peer at ring position i
must receive exactly ``k*N + i`` on its k-th turn (k = 0..M-1), which holds by induction only
if every earlier increment was applied exactly once. The final value is compared with N*M by
every peer, each of which exits with status 1 if anything did not match.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..channel import Receiver, Sender
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
)

NAME = "counter"
HELP = "N peers increment one counter M times by passing a token; the result must be exact"
CHANNEL = "counter"
_MESSAGE = struct.Struct("<QQII")  # kind, value, and the N and M of the peer that sent it
TOKEN, FINAL = 1, 2
_CAPACITY = 4096  # one 16-byte token in flight per channel: the smallest ring will do


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        "--peers",
        type=int,
        default=2,
        metavar="N",
        help="how many peers take part, this one included (default 2)",
    )
    parser.add_argument(
        "-m",
        "--increments",
        type=int,
        default=1000,
        metavar="M",
        help="increments by each peer (default 1000)",
    )
    add_common_arguments(
        parser,
        peers="another participant's id; repeat for each (default: the membership table, once "
        "it lists exactly N peers)",
        many=True,
    )


def run(args: argparse.Namespace) -> int:
    n, m = args.peers, args.increments
    if n < 2 or m < 1:
        raise SampleError(
            "--peers must be at least 2 (a ring needs a neighbour) and --increments at least 1"
        )
    with open_endpoint(args) as ep:
        region = attach(ep, args)
        others = discover(ep, region, n - 1, given_peers(args), args.timeout)
        ring = sorted([ep.id, *others])
        pos = ring.index(ep.id)
        prev, succ = ring[pos - 1], ring[(pos + 1) % n]
        progress(f"counter: {describe(ep)}; ring {ring}, position {pos}")
        options = channel_options(args)
        # Receiver first: the predecessor's Sender waits for it, as ours waits for the
        # successor's; opening the Sender first everywhere would wait round the whole ring.
        with (
            Receiver(ep, CHANNEL, prev, capacity=_CAPACITY, **options) as rx,
            Sender(ep, CHANNEL, succ, **options) as tx,
        ):
            clock: list[float] = []
            final = _play(rx, tx, pos, n, m, args.timeout, clock)
            seconds = time.perf_counter() - clock[0]
        result: dict[str, Any] = {
            "sample": NAME,
            "id": ep.id,
            "ring": ring,
            "position": pos,
            "peers": n,
            "increments": m,
            "value": final,
            "expected": n * m,
            "exact": final == n * m,
            "seconds": seconds,
            "increments_per_s": n * m / seconds,
            "endpoint": describe(ep),
        }
    emit(
        args,
        result,
        [
            f"counter: {n} peers x {m} increments = {final} (expected {n * m}, exact, every "
            f"hop checked); ring {ring}, this peer {ep.id} at position {pos}",
            f"{n * m} increments in {seconds:.3f} s: {n * m / seconds:.0f} increments/s, "
            f"{seconds / (n * m) * 1e6:.1f} us per hop",
        ],
    )
    return 0


def _take(rx: Receiver, game: tuple[int, int], kind: int, expected: int, what: str,
          timeout: float) -> int:  # fmt: skip
    """Receive one message, check that it is ``kind`` carrying ``expected`` from a peer
    playing the same ``(N, M)``; return its value."""
    data = rx.recv(timeout)
    if len(data) != _MESSAGE.size:
        raise CheckFailed(
            f"{what}: a {len(data)}-byte message instead of a {_MESSAGE.size}-byte token"
        )
    got_kind, value, n, m = _MESSAGE.unpack(data)
    if (n, m) != game:
        raise SampleError(
            f"{what}: the previous peer runs with --peers {n} --increments {m}, this one with "
            f"--peers {game[0]} --increments {game[1]}: give every participant the same"
        )
    if got_kind != kind or value != expected:
        names = {TOKEN: "TOKEN", FINAL: "FINAL"}
        raise CheckFailed(
            f"{what}: received {names.get(got_kind, got_kind)} {value}, expected "
            f"{names[kind]} {expected} (an increment was lost or repeated on the way)"
        )
    return int(value)


def _play(
    rx: Receiver, tx: Sender, pos: int, n: int, m: int, timeout: float, clock: list[float]
) -> int:
    """This peer's part of the M laps and of the final lap; returns the final value as
    received (already checked against N*M). Appends to ``clock`` the time this peer first
    held the token, so every peer times the same laps, not the wait for the others to start."""
    game = (n, m)

    def send(kind: int, value: int) -> None:
        tx.send(_MESSAGE.pack(kind, value, n, m), timeout)

    for k in range(m):
        value = k * n + pos  # what the token must carry when it reaches us on lap k
        if pos != 0 or k != 0:  # the first peer creates the token at 0 instead
            _take(rx, game, TOKEN, value, f"lap {k}", timeout)
        if k == 0:
            clock.append(time.perf_counter())
        send(TOKEN, value + 1)
    total = n * m
    if pos == 0:
        _take(rx, game, TOKEN, total, "the last lap", timeout)  # the last increment
        send(FINAL, total)
        return _take(rx, game, FINAL, total, "the final lap", timeout)  # everyone saw it
    final = _take(rx, game, FINAL, total, "the final lap", timeout)
    send(FINAL, final)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, configure, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

"""One ivshmem application that runs unchanged as a host peer and inside lab guests.

The only difference between the runs is where the endpoint comes from::

    python e2e_program.py --endpoint host --socket SOCK --seat 0 --run 1234   # ivshmem.connect
    python e2e_program.py --endpoint pci --seat 1 --run 1234                  # ivshmem.open_pci

(``--endpoint`` defaults to ``$E2E_ENDPOINT``.) Everything after that is the same code,
written against the :class:`ivshmem.Endpoint` contract only.

``--seats`` participants take part, each in its own seat (0..seats-1, given on the command
line). A guest cannot learn peer ids from the device, so the region itself carries them:

* a roster at offset 0, one :data:`ENTRY` per seat: run tag, state, peer id, the mask of
  seats whose blocks this seat verified, and the sha256 of its own block;
* one data block of ``--block`` bytes per seat from :data:`DATA_BASE`.

The choreography, identical for every seat:

1. open the endpoint, publish the id and state READY. QEMU drops a ring aimed at a guest
   whose MSI-X vector is not enabled yet (before its ``open_pci``), so nobody rings anyone
   until every seat is READY, which is watched in memory, without doorbells;
2. write a pseudo-random pattern (seeded by run and seat) into the own block, publish its
   sha256 and state WRITTEN, then ring every other seat on the vector numbered after the
   *ringing* seat, so a receiver can tell who rang from the vector alone;
3. wait on the doorbells until every other seat's vector has rung and every other seat is
   WRITTEN. A doorbell only means "look at the memory": rings of one vector may merge, so
   they are never counted;
4. check every other block byte for byte against the pattern regenerated locally, and against
   the digest its writer published; publish the mask of good blocks and state DONE;
5. wait until every seat is DONE (memory again: a seat that finished may have left, and a ring
   to a departed guest is lost), then, with ``--await-leaves``, wait until the ids of all other
   seats have left the server (only where ``peers`` can be known: a host peer);
6. print one line ``E2E-RESULT {json}`` and exit 0 if everything checked out, else 1.

Memory ordering: each seat writes its block, then the digest and id, then the state word
last; readers read the state first and the rest after. x86 keeps stores in program order and
loads in program order (TSO), QEMU's TCG keeps that for an x86 guest, and the host processes
and QEMUs map the same pages, so seeing a state implies seeing what was written before it.
A ring is sent after the state is written; its eventfd write or doorbell-register write comes
after those stores too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import ivshmem
from ivshmem.errors import IvshmemError, PeersUnknownError

#: A roster entry starts with the run tag and the state (one 8-byte write, so a reader sees
#: both from the same step of the writer) ...
TAG_STATE = struct.Struct("<II")
#: ... followed by the peer id, the mask of verified seats and the sha256 of the own block.
PAYLOAD = struct.Struct("<II32s")
ENTRY_SIZE = 64
MAX_SEATS = 16
DATA_BASE = 64 * 1024

READY, WRITTEN, DONE = 1, 2, 3
STATE_NAMES = {READY: "READY", WRITTEN: "WRITTEN", DONE: "DONE"}


class E2EError(Exception):
    """The choreography could not finish (a timeout, a too small region, ...)."""


def pattern(run: int, seat: int, size: int) -> bytes:
    """The bytes seat ``seat`` writes in run ``run`` (the same in every process: a str seed
    is hashed with sha512, independent of PYTHONHASHSEED)."""
    return random.Random(f"ivshmem-e2e:{run}:{seat}").randbytes(size)


def block_offset(seat: int, block: int) -> int:
    return DATA_BASE + seat * block


def read_entry(memory: memoryview, seat: int) -> tuple[int, int, int, int, bytes]:
    # State (with the tag) first, the rest after it: see the module docstring on ordering.
    tag, state = TAG_STATE.unpack_from(memory, seat * ENTRY_SIZE)
    peer_id, mask, digest = PAYLOAD.unpack_from(memory, seat * ENTRY_SIZE + TAG_STATE.size)
    return tag, state, peer_id, mask, digest


def publish(
    memory: memoryview,
    seat: int,
    run: int,
    state: int,
    peer_id: int,
    mask: int = 0,
    digest: bytes = b"",
) -> None:
    # The payload first, the state word last. States only grow, and a payload only gains
    # information (the mask at DONE), so a reader that pairs a state with a newer payload
    # still reads the truth.
    offset = seat * ENTRY_SIZE
    PAYLOAD.pack_into(memory, offset + TAG_STATE.size, peer_id, mask, digest)
    TAG_STATE.pack_into(memory, offset, run, state)


def state_of(memory: memoryview, seat: int, run: int) -> int:
    tag, state, *_ = read_entry(memory, seat)
    return int(state) if tag == run else 0  # an entry of another run is no entry


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise E2EError(f"timed out {what}")


def poll_memory(done: Callable[[], bool], deadline: Deadline, what: str) -> None:
    while not done():
        deadline.check(what)
        time.sleep(0.005)


def open_endpoint(args: argparse.Namespace) -> ivshmem.Endpoint:
    if args.endpoint == "host":
        if not args.socket:
            raise E2EError("--endpoint host needs --socket PATH (the ivshmem server's socket)")
        return ivshmem.connect(args.socket, vectors=args.vectors, timeout=args.timeout)
    return ivshmem.open_pci(interrupts=True, bind_vfio=True)


def known_peers(ep: ivshmem.Endpoint) -> frozenset[int] | None:
    """The connected peers, or None where the endpoint cannot know them (a guest)."""
    try:
        return ep.peers
    except PeersUnknownError:
        return None


def run(
    ep: ivshmem.Endpoint, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    seats, seat, tag, block = args.seats, args.seat, args.run, args.block
    memory = ep.memory
    deadline = Deadline(args.timeout)
    others = [s for s in range(seats) if s != seat]
    need = block_offset(seats, block)
    if ep.size < need:
        raise E2EError(
            f"the region has {ep.size} bytes but {seats} seats of {block} bytes need {need}: "
            "start the server with a larger -l or pass a smaller --block"
        )
    if ep.vectors < seats:
        raise E2EError(
            f"each seat rings on the vector numbered after itself, so {seats} seats need "
            f"{seats} vectors, but this endpoint has {ep.vectors}: start the server with "
            f"-n {seats}"
        )
    report: dict[str, Any] = {"seat": seat, "id": ep.id, "endpoint": repr(ep)}
    report.update(size=ep.size, vectors=ep.vectors)

    # 1. READY: from now on our vectors receive.
    publish(memory, seat, tag, READY, ep.id)
    log(f"seat {seat}: peer {ep.id}, READY")
    poll_memory(
        lambda: all(state_of(memory, s, tag) >= READY for s in range(seats)),
        deadline,
        "waiting for every seat to be READY",
    )
    roster = [read_entry(memory, s)[2] for s in range(seats)]
    report["roster"] = roster
    peers = known_peers(ep)
    report["peers_at_ready"] = None if peers is None else sorted(peers)
    log(f"seat {seat}: all READY, roster {roster}")

    # 2. WRITTEN: own block, its digest, then ring everyone else on our seat's vector.
    start = block_offset(seat, block)
    mine = memory[start : start + block]
    mine[:] = pattern(tag, seat, block)
    digest = hashlib.sha256(mine).digest()
    report["own_sha256"] = digest.hex()
    publish(memory, seat, tag, WRITTEN, ep.id, 0, digest)
    for other in others:
        ep.notify(roster[other], seat)
    log(f"seat {seat}: WRITTEN, rang seats {others}")

    # 3. Doorbells from every other seat, and every other block written.
    rung: set[int] = set()
    expected = set(others)
    while not (expected <= rung and all(state_of(memory, s, tag) >= WRITTEN for s in others)):
        deadline.check(
            f"waiting for doorbells (rung by seats {sorted(rung)}, want {sorted(expected)}) "
            f"and blocks (states {[state_of(memory, s, tag) for s in range(seats)]})"
        )
        vector = ep.wait(timeout=min(0.5, max(deadline.left(), 0.0)))
        if vector is not None:
            rung.add(vector)
    report["rung_by"] = sorted(rung)
    log(f"seat {seat}: rung by seats {sorted(rung)}")

    # 4. Verify every other block, byte for byte, against the pattern and the published digest.
    verified: dict[str, dict[str, Any]] = {}
    mask = 0
    for other in others:
        offset = block_offset(other, block)
        seen = bytes(memory[offset : offset + block])
        published = read_entry(memory, other)[4]
        want = pattern(tag, other, block)
        mismatch = next(
            (i // 4096 for i in range(0, block, 4096) if seen[i : i + 4096] != want[i : i + 4096]),
            None,
        )
        ok = seen == want and hashlib.sha256(seen).digest() == published
        verified[str(other)] = {
            "ok": ok,
            "sha256": hashlib.sha256(seen).hexdigest(),
            "published": published.hex(),
            "first_bad_page": mismatch,
        }
        if ok:
            mask |= 1 << other
    report["verified"] = verified
    publish(memory, seat, tag, DONE, ep.id, mask, digest)
    log(f"seat {seat}: DONE, verified mask {mask:#x}")

    # 5. Everyone DONE; then, where membership is known, everyone else gone.
    poll_memory(
        lambda: all(state_of(memory, s, tag) >= DONE for s in range(seats)),
        deadline,
        "waiting for every seat to be DONE",
    )
    report["masks"] = [read_entry(memory, s)[3] for s in range(seats)]
    if args.await_leaves:
        gone: list[int] = []
        waiting = {roster[s] for s in others}
        while waiting:
            current = known_peers(ep)
            if current is None:
                raise E2EError(
                    "--await-leaves needs an endpoint that knows its peers (a host peer)"
                )
            for peer_id in sorted(waiting - current):
                gone.append(peer_id)
                log(f"seat {seat}: peer {peer_id} left")
            waiting &= current
            if waiting:
                deadline.check(f"waiting for peers {sorted(waiting)} to leave")
                time.sleep(0.02)
        report["left"] = gone
        report["peers_at_end"] = sorted(known_peers(ep) or ())
    report["ok"] = mask == sum(1 << s for s in others)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--endpoint",
        choices=["host", "pci"],
        default=os.environ.get("E2E_ENDPOINT"),
        help="host: ivshmem.connect(--socket); pci: ivshmem.open_pci (in a guest)",
    )
    parser.add_argument("--socket", help="the server's socket (--endpoint host)")
    parser.add_argument("--vectors", type=int, default=3, help="the server's -n (host)")
    parser.add_argument("--seat", type=int, required=True)
    parser.add_argument("--seats", type=int, default=3)
    parser.add_argument("--run", type=int, required=True, help="a tag shared by one run's seats")
    parser.add_argument("--block", type=int, default=256 * 1024, help="bytes per seat's block")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for everything")
    parser.add_argument("--await-leaves", action="store_true")
    args = parser.parse_args(argv)
    if args.endpoint is None:
        parser.error("give --endpoint host|pci (or set E2E_ENDPOINT)")
    if not 1 <= args.seats <= MAX_SEATS or not 0 <= args.seat < args.seats:
        parser.error(f"need 1 <= seats <= {MAX_SEATS} and 0 <= seat < seats")
    if not 0 < args.run < 1 << 32:
        parser.error("--run must be 1..2**32-1 (0 marks an unwritten entry)")
    if args.block < 4096 or args.block % 4096:
        parser.error("--block must be a positive multiple of 4096")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        with open_endpoint(args) as ep:
            report = run(ep, args, log)
    except (E2EError, IvshmemError) as err:
        print(f"E2E-ERROR {type(err).__name__}: {err}", flush=True)
        return 2
    print("E2E-RESULT " + json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

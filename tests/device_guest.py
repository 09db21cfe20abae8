"""Programs that tests/test_device_lab.py runs inside lab guests (and pieces the host side of
those tests shares with them: :func:`circuit`).

Run in a guest as ``python device_guest.py ROLE JSON-OPTIONS``; each prints ``TAG {json}``
lines the test reads (``READY``, ``DONE``...) and exits non-zero on any failure.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

WAIT = 60.0  # seconds any single step may take (TCG guests on a loaded machine)
RING = 0  # the vector the ring circuit uses
GO = 1  # the host's "everyone is ready" ring; channels use it afterwards
CHANNEL_MESSAGES = 200


def circuit(ids: list[int]) -> list[tuple[int, int]]:
    """A closed walk over every ordered pair of distinct ``ids`` exactly once, starting and
    ending at the smallest id (an Eulerian circuit of the complete directed graph, which has
    one because every vertex has as many edges in as out). Deterministic: every participant
    computes the same walk, so one ring at a time can travel it with no other coordination,
    and a ring that never arrives is a timeout at a known edge."""
    order = sorted(ids)
    unused = {a: [b for b in order if b != a] for a in order}
    stack, walk = [order[0]], []
    while stack:  # Hierholzer's algorithm
        here = stack[-1]
        if unused[here]:
            stack.append(unused[here].pop(0))
        else:
            walk.append(stack.pop())
    walk.reverse()
    return list(itertools.pairwise(walk))


def travel(ep: Any, me: int, edges: list[tuple[int, int]], deadline: float = WAIT) -> int:
    """Play this participant's part of the ring circuit on vector RING; return rings taken."""
    taken = 0
    if edges[0][0] == me:
        ep.notify(edges[0][1], RING)
    for k, (src, dst) in enumerate(edges):
        if dst != me:
            continue
        got = ep.wait(RING, timeout=deadline)
        if got != RING:
            raise SystemExit(f"{me}: ring {k} ({src} -> {dst}) did not arrive within {deadline} s")
        taken += 1
        if k + 1 < len(edges):
            ep.notify(edges[k + 1][1], RING)
    return taken


def emit(tag: str, value: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(value)}\n{tag}-END", flush=True)  # -END: the line is whole


def _table_peers(ep: Any) -> frozenset[int]:
    from ivshmem.channel import Membership

    return Membership(ep).snapshot().peers - {ep.id}


def ivshmem_info() -> Any:
    """What ``ivshmem info --json`` prints here."""
    import contextlib
    import io

    from ivshmem.cli.main import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli(["info", "--json"])
    if status != 0:
        raise SystemExit(f"ivshmem info exited with status {status}")
    return json.loads(out.getvalue())


def main_guest(options: dict[str, Any]) -> None:
    """One participant of the doorbell circuit and of a channel, on either device."""
    import ivshmem
    from ivshmem.channel import Duplex

    # `ivshmem info` first, while no driver holds the devices (sysfs reads BAR0 then).
    emit("INFO", {"devices": ivshmem_info()})
    ep = ivshmem.open_pci(0, interrupts=True, bind_vfio=True)
    ext = ep.extension
    everyone = int(options["participants"])
    deadline = time.monotonic() + WAIT
    # Who is there: ours from its registers, QEMU's from the region's table.
    while True:
        table = _table_peers(ep)
        regs = ep.peers if ext is not None else None
        if len(table) + 1 >= everyone and (regs is None or len(regs) + 1 >= everyone):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"only {table} (registers: {regs}) joined within {WAIT} s")
        time.sleep(0.1)
    emit(
        "READY",
        {
            "id": ep.id,
            "mode": ep.interrupt_mode,
            "vectors": ep.vectors,
            "ours": ext is not None,
            "features": None if ext is None else ext.features,
            "event_vector": None if ext is None else ext.event_vector,
            "registers_peers": None if regs is None else sorted(regs),
            "table_peers": sorted(table),
            "generation": None if ext is None else ep.generation,
            "server_state": None if ext is None else ep.server_state,
        },
    )
    if ep.wait(GO, timeout=WAIT * 3) != GO:
        raise SystemExit("the host's GO ring never came")
    ids = sorted({ep.id, *table})
    taken = travel(ep, ep.id, circuit(ids))
    # A channel with the partner the host chose (over the region the server formatted).
    partner = int(options["partner"])
    with Duplex(ep, str(options["channel"]), partner, vector=GO, timeout=WAIT) as link:
        for n in range(CHANNEL_MESSAGES):
            link.send(f"{ep.id}->{partner} #{n}".encode())
        got = [link.recv(timeout=WAIT).decode() for _ in range(CHANNEL_MESSAGES)]
    expected = [f"{partner}->{ep.id} #{n}" for n in range(CHANNEL_MESSAGES)]
    result: dict[str, Any] = {"rings": taken, "channel_ok": got == expected, "partner": partner}
    if options.get("watch_joins") and ext is not None:
        result.update(watch_joins(ep))
    emit("DONE", result)
    ep.close()
    run_samples(options.get("samples", []))


def run_samples(runs: list[list[Any]]) -> None:
    """Run sample programs (``[name, argv]``) one after the other on this guest's other
    devices; each prints its JSON line; the next runs even if one failed, so its peers are not
    left waiting; exit with 1 if any failed."""
    import importlib

    status = 0
    for name, argv in runs:
        sample = importlib.import_module(f"ivshmem.samples.{name}")
        status |= int(sample.main(list(argv)))
    if status:
        raise SystemExit(1)


def watch_joins(ep: Any) -> dict[str, Any]:
    """Tell the host we are watching, then see a new peer join and leave through the
    membership interrupt (its vector) and the registers."""
    from ivshmem.pci import MembershipEvent

    before = ep.peers
    ep.take_events()  # forget the joins of the boot
    emit("WATCHING", {"peers": sorted(before)})
    deadline = time.monotonic() + WAIT
    seen = MembershipEvent.NONE
    joined: list[int] = []
    while not joined:
        events = ep.wait_membership(timeout=max(0.0, deadline - time.monotonic()))
        if not events:
            raise SystemExit(f"no membership interrupt within {WAIT} s (peers {ep.peers})")
        seen |= events
        joined = sorted(ep.peers - before)
    emit("SAW-JOIN", {"joined": joined})
    left = False
    while not left:
        events = ep.wait_membership(timeout=max(0.0, deadline - time.monotonic()))
        if not events:
            raise SystemExit(f"no leave interrupt within {WAIT} s (peers {ep.peers})")
        seen |= events
        left = joined[0] not in ep.peers
    return {"joined": joined, "events": int(seen)}


def intx_and_restart(options: dict[str, Any]) -> None:
    """Device 0: ours in INTx mode on a formatted region: the ping-pong sample with the host,
    then rings to itself on two vectors (IntrStatus tells them apart) and from the host.
    Device 1: ours (MSI-X, membership events on vector 1) on a server the host restarts:
    BAR2 and its content stay, the guest is told, doorbells work again."""
    import ivshmem
    import ivshmem.samples.pingpong
    from ivshmem.pci import MembershipEvent, find_devices

    devices = find_devices()
    emit(
        "DEVICES",
        {"devices": [[d.kind, d.interrupt_pin, d.msix_vectors] for d in devices]},
    )
    sample = ["ping", "--endpoint", "pci", "--device", "0", "--json", "--timeout", "120"]
    sample += ["--peer", str(options["pong"]), "--count", "200"]
    if ivshmem.samples.pingpong.main(sample) != 0:
        raise SystemExit("the ping-pong sample failed over INTx")
    with ivshmem.open_pci(0, interrupts=True, bind_vfio=True, vectors=2) as ep:
        rings = []
        for vector in (1, 0):
            ep.notify(ep.id, vector)
            rings.append(ep.wait(vector, timeout=WAIT))
        emit("INTX", {"mode": ep.interrupt_mode, "self": rings, "id": ep.id})
        deadline = time.monotonic() + WAIT
        while not ep.peers - {int(options["pong"])}:  # the host's peer comes after INTX
            if time.monotonic() > deadline:
                raise SystemExit(f"the host peer never joined (peers {ep.peers})")
            time.sleep(0.05)
        host = min(ep.peers - {int(options["pong"])})
        ep.notify(host, 0)
        from_host = ep.wait(0, timeout=WAIT)
        emit("INTX-HOST", {"got": from_host, "host": host})

    ep = ivshmem.open_pci(1, interrupts=True, bind_vfio=True)
    marker = f"written by guest {ep.id} before the restart".encode()
    ep.memory[4096 : 4096 + len(marker)] = marker
    ep.take_events()
    before = {"id": ep.id, "peers": sorted(ep.peers), "state": ep.server_state}
    emit("BEFORE", before)
    deadline = time.monotonic() + WAIT * 2
    seen = MembershipEvent.NONE
    states = set()
    while not seen & MembershipEvent.RECONNECTED:
        events = ep.wait_membership(timeout=max(0.0, deadline - time.monotonic()))
        if not events:
            raise SystemExit(f"not told of a reconnection within {WAIT * 2} s (saw {seen!r})")
        seen |= events
        states.add(ep.server_state)
    # The new server's first peer may come later than the device: wait for the host's.
    while not ep.peers:
        if time.monotonic() > deadline:
            raise SystemExit("no peer on the restarted server")
        ep.wait_membership(timeout=1.0)
    host = min(ep.peers)
    kept = bytes(ep.memory[4096 : 4096 + len(marker)]) == marker
    emit(
        "AFTER",
        {
            "events": int(seen),
            "states": sorted(states),
            "state": ep.server_state,
            "id": ep.id,
            "kept": kept,
            "host": host,
        },
    )
    ep.notify(host, 0)
    got = ep.wait(0, timeout=WAIT)
    emit("DONE", {"ring_after_restart": got})
    ep.close()


def main(argv: list[str]) -> None:
    role, options = argv[0], json.loads(argv[1])
    if role == "main":
        main_guest(options)
    elif role == "intx":
        intx_and_restart(options)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""kill -9 of a peer: of a host peer process, and of a QEMU process.

The survivors must see the peer leave (the server's announcement and its membership table),
and every channel to or from the dead peer must end with :class:`PeerGoneError` naming the
channel and the peer - for calls already blocked when it died as for later ones - and never
hang. What the dead peer had published before it died is still delivered, intact: a kill in
the middle of a send never shows half a message (the head index is stored after the payload,
``_ordering.py`` point 2), which the mid-stream test checks with real kills at random points.

Channels with a QEMU peer: qtest runs no guest code, so the test plays the guest's part of
the channel through qtest BAR2 writes, i.e. through QEMU's own device: it creates the
channel in the VM's arena (the bytes the library would write, in the same publication
order), marks the VM's receiver as sleeping so the host's sends ring its doorbell as MSI-X,
and writes a message from the VM to the host. Then QEMU is killed.

The server runs as a real process with ``--format`` (it keeps the membership table) and
``--membership-vector 1`` (it rings everyone on joins and leaves); host peers are real
``ivshmem.connect`` clients in forked processes, killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qtest import IvshmemDevice, Qemu, poll_until
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import (
    ChannelTimeout,
    Membership,
    PeerGoneError,
    Receiver,
    Region,
    RegionFullError,
    Sender,
)
from ivshmem.channel.fuzz import MessageCodec
from ivshmem.channel.layout import allocate_channel, find_channel
from ivshmem.channel.ring import (
    CTRL_SIZE,
    KIND_DATA,
    R_VECTOR,
    R_WAIT,
    S_HEAD,
    S_WAIT,
    init_area,
)

pytestmark = pytest.mark.timeout(90)

FORK = multiprocessing.get_context("fork")
# Vector 0 and 1 for two channel ends blocking at once in one process (one eventfd each, so
# neither takes the other's doorbell), 2 for the server's membership rings.
VECTORS = 3
MEMBERSHIP_VECTOR = 2
CAP = 4096
# Hang catchers only: every wait returns as soon as the awaited thing happens.
WAIT = 15.0


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    args = ["--format", "--membership-vector", str(MEMBERSHIP_VECTOR)]
    args += ["--file", region_file(short_tmp)]  # a file, so a RegionEndpoint can map it too
    with ServerProcess(short_tmp, size="1M", vectors=VECTORS, extra_args=args) as srv:
        yield srv


def region_file(tmp: Path) -> str:
    return str(tmp / "region")


@contextlib.contextmanager
def connected(server: ServerProcess) -> Iterator[Any]:
    with ivshmem.connect(server.socket_path, vectors=VECTORS) as peer:
        yield peer


# -- a host peer in a process of its own -----------------------------------------------------


class Victim:
    """A forked process running ``body(peer, conn)`` as a host peer of ``server``; the test
    talks to it over ``conn`` and kills it with SIGKILL."""

    def __init__(self, server: ServerProcess, body: Callable[[Any, Connection], None]) -> None:
        self.conn, theirs = FORK.Pipe()
        self.proc = FORK.Process(target=_victim_main, args=(server.socket_path, body, theirs))
        self.proc.start()
        theirs.close()
        self.id: int = self.recv()

    def recv(self) -> Any:
        assert self.conn.poll(WAIT), "the victim process did not answer"
        return self.conn.recv()

    def send(self, value: Any) -> None:
        self.conn.send(value)

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(WAIT)
        assert self.proc.exitcode == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(WAIT)
        self.conn.close()


def _victim_main(path: str, body: Callable[[Any, Connection], None], conn: Connection) -> None:
    with ivshmem.connect(path, vectors=VECTORS) as peer:
        conn.send(peer.id)
        body(peer, conn)


@contextlib.contextmanager
def victim(server: ServerProcess, body: Callable[[Any, Connection], None]) -> Iterator[Victim]:
    v = Victim(server, body)
    try:
        yield v
    finally:
        v.close()


def _idle_victim(peer: Any, conn: Connection) -> None:
    """Opens ``to-victim`` (receiving, never reading it) and ``from-victim`` (sending 5
    messages), then waits on its pipe until it is killed."""
    survivor = conn.recv()
    Receiver(peer, "to-victim", survivor, capacity=CAP, vector=0)
    tx = Sender(peer, "from-victim", survivor, vector=1)
    codec = MessageCodec(tag=1)
    for seq in range(5):
        tx.send(codec.encode(seq, 200))
    conn.send("ready")
    conn.recv()  # pragma: no cover - killed while waiting here


def _streaming_victim(peer: Any, conn: Connection) -> None:
    """Sends numbered messages on ``from-victim`` as fast as it can, until killed."""
    survivor = conn.recv()
    tx = Sender(peer, "from-victim", survivor, vector=0)
    codec = MessageCodec(tag=2)
    rng = random.Random(peer.id)
    conn.send("ready")
    seq = 0
    while True:
        tx.send(codec.encode(seq, rng.randint(MessageCodec.MIN, 1500)), timeout=None)
        seq += 1


def _survivor_ep(peer: Any, server: ServerProcess, liveness: str) -> Any:
    """The endpoint the survivor's channels use: the host peer itself (it learns leaves from
    the server socket), or - as a guest would - a plain mapping of the same region with the
    same id, which can only read the server's membership table."""
    if liveness == "socket":
        return peer
    return ivshmem.open_region(region_file(server.tmpdir), id=peer.id)


def _close_quietly(*ends: Any) -> None:
    """Closing the ends of a channel whose peer died is the clean-up after PeerGoneError (it
    runs in ``__exit__``): it must not raise, or it would replace the error being handled."""
    for end in ends:
        try:
            end.close()
        except Exception as err:
            pytest.fail(f"{end!r}.close() after its peer died raised {err!r}")


def _fill(tx: Sender) -> None:
    """Fill the ring to the last byte (empty messages take 8 bytes, the unit of the ring)."""
    while tx.try_send(bytes(500)):
        pass
    while tx.try_send(b""):
        pass


def _vector(ep: Any, vector: int) -> dict[str, int]:
    return {"vector": vector} if ep.vectors else {}


def _in_thread(call: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``call`` in a thread; the returned function joins it and returns its result or
    its exception (a hang catcher bounds the join)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(call())
        except BaseException as err:
            box.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> Any:
        t.join(WAIT)
        assert not t.is_alive(), "the blocked channel call never returned (hang)"
        return box[0]

    return join


@pytest.mark.parametrize("liveness", ["socket", "table"])
def test_killed_host_peer_leaves_and_its_channels_end(server: ServerProcess, liveness: str) -> None:
    with connected(server) as peer, victim(server, _idle_victim) as v:
        ep = _survivor_ep(peer, server, liveness)
        opts: dict[str, Any] = {"liveness_interval": 0.05}
        if liveness == "socket":
            opts.update(membership_vector=MEMBERSHIP_VECTOR)
        try:
            rx = Receiver(ep, "from-victim", v.id, capacity=CAP, **opts, **_vector(ep, 0))
            v.send(peer.id)
            assert v.recv() == "ready"
            tx = Sender(ep, "to-victim", v.id, **opts, **_vector(ep, 1))
            _fill(tx)  # the victim never reads: the next send blocks
            assert v.id in peer.peers and v.id in Membership(ep).peers()

            blocked_send = _in_thread(lambda: tx.send(b"more", timeout=WAIT))
            time.sleep(0.1)  # let the sender reach its blocking wait before the kill
            v.kill()

            # The survivors see the leave: the server's announcement and its table.
            assert poll_until(lambda: v.id not in peer.peers, WAIT)
            assert poll_until(lambda: v.id not in Membership(ep).peers(), WAIT)
            assert v.id not in server.peer_ids()

            # The blocked send ends, naming the channel and the peer.
            err = blocked_send()
            assert isinstance(err, PeerGoneError), repr(err)
            assert err.peer == v.id and err.channel == f"to-victim ({peer.id}->{v.id})"
            assert f"peer {v.id} left" in str(err)

            # What the victim published before dying still arrives, intact and in order;
            # then the receive ends the same way.
            codec = MessageCodec(tag=1)
            for seq in range(5):
                assert codec.check(rx.recv(timeout=WAIT)) == ("ok", seq)
            with pytest.raises(PeerGoneError) as info:
                rx.recv(timeout=WAIT)
            assert info.value.peer == v.id
            assert info.value.channel == f"from-victim ({v.id}->{peer.id})"

            # And it stays that way: later calls say so at once rather than wait.
            with pytest.raises(PeerGoneError):
                rx.recv(timeout=WAIT)
            with pytest.raises(PeerGoneError):
                tx.send(b"again", timeout=WAIT)
            _close_quietly(tx, rx)
        finally:
            if ep is not peer:
                ep.close()


def test_kill_mid_stream_never_shows_a_torn_message(server: ServerProcess) -> None:
    """Real kills at random points of a fast stream of random-size messages: the receiver
    gets an intact prefix 0..k-1, then PeerGoneError."""
    rng = random.Random()
    with connected(server) as peer:
        for _ in range(4):
            with victim(server, _streaming_victim) as v:
                rx = Receiver(peer, "from-victim", v.id, capacity=CAP, vector=0,
                              membership_vector=MEMBERSHIP_VECTOR)  # fmt: skip
                v.send(peer.id)
                assert v.recv() == "ready"
                codec = MessageCodec(tag=2)
                kill_at = float("inf")  # set once the stream flows
                killed = False
                seq = 0
                while True:
                    if not killed and time.monotonic() >= kill_at:
                        v.kill()
                        killed = True
                    try:
                        data = rx.recv(timeout=WAIT)
                    except PeerGoneError as err:
                        assert killed and err.peer == v.id
                        break
                    assert codec.check(data) == ("ok", seq), f"message {seq} (killed: {killed})"
                    if seq == 0:
                        kill_at = time.monotonic() + rng.uniform(0.0, 0.2)
                    seq += 1
                assert seq > 0
                rx.close()


# -- a sender killed while it sleeps on a full ring --------------------------------------------

#: The receiving calls that must deliver everything such a sender published, then end with
#: PeerGoneError: (how to receive, whether the victim sends arrays).
_FULL_RING_READS = {
    "recv": False,
    "recv_many": False,
    "recv_many_64": False,
    "recv_many_exact": False,
    "recv_view": False,
    "recv_array": True,
    "recv_array_copy": True,
    "recv_async": False,
    "recv_many_async": False,
    "recv_many_async_64": False,
    "recv_view_async": False,
    "recv_array_async": True,
    "recv_array_copy_async": True,
}


def _full_ring_victim(peer: Any, conn: Connection) -> None:
    """Fills ``from-victim`` with numbered messages (8-byte words, as bytes or as one-element
    arrays), says how many, then blocks sending one more - asleep on its doorbell, its wait
    word odd - until it is killed."""
    survivor, arrays = conn.recv()
    tx = Sender(peer, "from-victim", survivor, vector=0, spin=0)
    seq = 0
    while True:
        if arrays:
            try:
                tx.send_array(np.array([seq], dtype="<u8"), timeout=0)
            except ChannelTimeout:
                break
        elif not tx.try_send(seq.to_bytes(8, "little")):
            break
        seq += 1
    conn.send(seq)
    if arrays:
        tx.send_array(np.array([seq], dtype="<u8"), timeout=None)
    else:
        tx.send(seq.to_bytes(8, "little"), timeout=None)
    conn.recv()  # pragma: no cover - killed before the ring has room again


def _read_until_gone(rx: Receiver, how: str, sent: int) -> tuple[list[int], BaseException]:
    """Receive with ``how`` until an error ends it: the numbers received and the error."""
    got: list[int] = []

    def number(data: Any) -> int:
        return int.from_bytes(bytes(data), "little")

    def one() -> None:
        if how.startswith("recv_many"):
            limit = 64 if how.endswith("_64") else sent if how.endswith("_exact") else 1024
            got.extend(number(m) for m in rx.recv_many(limit, timeout=WAIT))
        elif how == "recv":
            got.append(number(rx.recv(timeout=WAIT)))
        elif how == "recv_view":
            got.append(number(rx.recv_view(timeout=WAIT)))
            rx.release()  # gives space back: the wake-up for the dead sender happens here
        else:
            array = rx.recv_array(timeout=WAIT, copy=how == "recv_array_copy")
            got.append(number(array.tobytes()))
            del array
            rx.release()

    async def one_async() -> None:
        if how.startswith("recv_many"):
            limit = 64 if how.endswith("_64") else 1024
            got.extend(number(m) for m in await rx.recv_many_async(limit, timeout=WAIT))
        elif how == "recv_async":
            got.append(number(await rx.recv_async(timeout=WAIT)))
        elif how == "recv_view_async":
            got.append(number(await rx.recv_view_async(timeout=WAIT)))
            rx.release()
        else:
            copy = how == "recv_array_copy_async"
            array = await rx.recv_array_async(timeout=WAIT, copy=copy)
            got.append(number(array.tobytes()))
            del array
            rx.release()

    async def read_async() -> BaseException:
        while True:
            try:
                await one_async()
            except Exception as err:
                return err

    if how.endswith("async") or "_async_" in how:
        return got, asyncio.run(read_async())
    while True:
        try:
            one()
        except Exception as err:
            return got, err


@pytest.mark.parametrize("how", sorted(_FULL_RING_READS))
def test_sender_killed_asleep_on_a_full_ring_loses_nothing(server: ServerProcess, how: str) -> None:
    """The sender fills the ring and falls asleep waiting for room; it is killed, and the
    survivor's endpoint has heard of the leave before it reads. Giving space back then
    "wakes" a sender that is gone: that must not end the read that gave it back (the
    messages it took were consumed, and were lost with the error), nor any later read while
    messages remain. Every message arrives, in order, then PeerGoneError, then again at
    once."""
    arrays = _FULL_RING_READS[how]
    with connected(server) as peer, victim(server, _full_ring_victim) as v:
        rx = Receiver(peer, "from-victim", v.id, capacity=CAP, vector=0)
        v.send((peer.id, arrays))
        sent = v.recv()
        assert sent > 64
        # The victim sleeps on its doorbell, waiting for room (its wait word is odd).
        assert poll_until(lambda: rx._q[S_WAIT] & 1 == 1, WAIT)
        v.kill()
        assert poll_until(lambda: v.id not in peer.peers, WAIT)  # the endpoint knows
        assert rx._q[S_WAIT] & 1 == 1  # ...and the dead sender's word still asks for a ring

        got, err = _read_until_gone(rx, how, sent)

        missing = sorted(set(range(sent)) - set(got))
        assert got == list(range(sent)), (
            f"{len(got)} of {sent} messages arrived before {err!r}; first missing: {missing[:1]}"
        )
        assert isinstance(err, PeerGoneError) and err.peer == v.id, repr(err)
        with pytest.raises(PeerGoneError):  # the finding sticks: said at once
            rx.recv(timeout=WAIT)
        _close_quietly(rx)


def test_sender_waiting_for_a_killed_peer_to_open_the_channel_ends(
    server: ServerProcess,
) -> None:
    """``Sender()`` waits for the receiver to create the channel; if the receiver dies
    meanwhile, the wait must end with PeerGoneError, not go on until the timeout (or
    forever, with ``timeout=None``): peer ids are never reused, it cannot come back."""
    with connected(server) as peer, victim(server, _idle_victim) as v:
        opening = _in_thread(lambda: Sender(peer, "never-opened", v.id, timeout=4))
        time.sleep(0.2)
        v.kill()
        result = opening()
        assert isinstance(result, PeerGoneError), f"got {result!r}, expected PeerGoneError"
        assert result.peer == v.id


def test_sender_to_a_killed_peer_never_writes_into_its_recycled_arena(
    short_tmp: Path,
) -> None:
    """A region with two membership slots: the survivor and the victim. The victim dies, a
    newcomer takes its slot - and with it the arena that held the survivor's channel to the
    victim - and opens a channel there. The survivor's old sender still has room in its
    ring: its next send must fail with PeerGoneError, and the newcomer's memory must not
    change."""
    args = ["--format", "--max-peers", "2"]
    with (
        ServerProcess(short_tmp, size="1M", vectors=VECTORS, extra_args=args) as server,
        connected(server) as peer,
    ):
        with victim(server, _idle_victim) as v:
            Receiver(peer, "from-victim", v.id, capacity=CAP).close()
            v.send(peer.id)
            assert v.recv() == "ready"
            tx = Sender(peer, "to-victim", v.id, vector=0)
            tx.send(b"before the kill")
            v.kill()
            assert poll_until(lambda: v.id not in Membership(peer).peers(), WAIT)
        with connected(server) as newcomer:
            mine = Receiver(newcomer, "fresh", peer.id, capacity=CAP, vector=0)
            region = Region(peer)
            slot = Membership(region).snapshot().entries[newcomer.id].slot
            base = region.arena_offset(slot)
            arena = bytes(peer.memory[base : base + region.arena_size])
            error: Exception | None = None
            try:
                for _ in range(2 * CAP // 24):  # more than the ring holds
                    tx.send(b"after the kill", timeout=2)
            except Exception as err:
                error = err
            changed = bytes(peer.memory[base : base + region.arena_size]) != arena
            try:
                seen: object = mine.try_recv()
            except Exception as err:
                seen = err
            assert not changed and seen is None, (
                f"the sender to dead peer {v.id} wrote into the arena that newcomer "
                f"{newcomer.id} now owns; the newcomer's channel gave {seen!r}; the sender "
                f"ended with {error!r}"
            )
            assert isinstance(error, PeerGoneError), repr(error)
            with contextlib.suppress(Exception):
                mine.close()
        with contextlib.suppress(PeerGoneError):
            tx.close()


def test_channels_from_dead_peers_do_not_use_up_the_survivors_arena(
    server: ServerProcess,
) -> None:
    """A long-lived peer receives from peers that come and go (VMs restart with new ids).
    Each dead peer's channel sits in the survivor's arena; once the survivor has seen
    PeerGoneError and closed its end, that space must be usable again, or after a few dozen
    restarts (63 directory entries at most, fewer by space) it can receive from nobody."""
    with connected(server) as survivor:
        for gone in range(70):
            with connected(server) as passing:
                # As a service would: open the channel once the peer is seen to join.
                assert poll_until(lambda: passing.id in survivor.peers, WAIT)
                try:
                    rx = Receiver(survivor, "data", passing.id, capacity=1024)
                except RegionFullError as err:
                    pytest.fail(f"after {gone} peers came and went: {err}")
                peer_id = passing.id
            with pytest.raises(PeerGoneError) as info:
                rx.recv(timeout=WAIT)
            assert info.value.peer == peer_id
            rx.close()


# -- a QEMU peer -----------------------------------------------------------------------------


@pytest.fixture
def qemu_vm(qemu_binary: str, short_tmp: Path, server: ServerProcess) -> Iterator[IvshmemDevice]:
    qemu = Qemu(
        qemu_binary,
        short_tmp,
        [
            "-chardev", f"socket,id=ivshmem,path={server.socket_path}",
            "-device", f"ivshmem-doorbell,chardev=ivshmem,vectors={VECTORS}",
        ],
        name="vm",
    )  # fmt: skip
    try:
        yield IvshmemDevice.find(qemu)
    finally:
        qemu.close()


def _vm_joined(vm: IvshmemDevice, host: Any) -> int:
    """The VM's id, once the host knows it and the VM has processed its whole handshake
    (its own vectors come last: an MSI on its last vector proves that)."""
    vm_id = vm.ivposition
    assert poll_until(lambda: vm_id in host.peers, WAIT)
    host.notify(vm_id, VECTORS - 1)
    assert vm.take_msi(VECTORS - 1, WAIT)
    return vm_id


def _vm_creates_channel(vm: IvshmemDevice, host: Any, name: str, sender: int) -> int:
    """Create channel ``name`` (``sender`` -> VM) in the VM's arena through BAR2, as the
    library would from inside the guest: the area's control lines first, then the directory
    entry, then the arena's counters (the entry count last: it publishes the channel).
    Returns the area's region offset."""
    vm_id = vm.ivposition
    region_now = Region(host)
    slot = Membership(region_now).snapshot().entries[vm_id].slot
    image = bytearray(host.memory)  # a private copy the library's allocator writes into
    copy = Region(image)
    entry = allocate_channel(copy, slot, vm_id, name, sender, vm_id, CTRL_SIZE + CAP, init_area)
    base = copy.arena_offset(slot)
    vm.write(entry.offset, bytes(image[entry.offset : entry.offset + CTRL_SIZE]))
    entry_at = base + 64 + entry.index * 64
    vm.write(entry_at, bytes(image[entry_at : entry_at + 64]))
    vm.write(base + 24, bytes(image[base + 24 : base + 32]))  # bytes used
    vm.write(base + 16, bytes(image[base + 16 : base + 24]))  # entry count: publishes
    return entry.offset


def _vm_sends(vm: IvshmemDevice, area: int, payload: bytes) -> None:
    """One message from the VM into the first record of a fresh channel area: payload,
    record header, then the head index."""
    vm.write(area + CTRL_SIZE + 8, payload)
    vm.write(area + CTRL_SIZE, struct.pack("<Q", len(payload) | KIND_DATA << 32))
    vm.write(area + S_HEAD * 8, struct.pack("<Q", (len(payload) + 15) & ~7))


@pytest.mark.qemu
def test_killed_qemu_leaves_and_its_channels_end(
    server: ServerProcess, qemu_vm: IvshmemDevice
) -> None:
    vm = qemu_vm
    with connected(server) as host:
        vm_id = _vm_joined(vm, host)
        opts: dict[str, Any] = {"membership_vector": MEMBERSHIP_VECTOR, "liveness_interval": 0.05}

        # host -> VM: the VM creates the channel; the host finds it and sends.
        area = _vm_creates_channel(vm, host, "to-vm", host.id)
        tx = Sender(host, "to-vm", vm_id, vector=0, **opts)
        tx.send(b"hello, vm")
        assert vm.read(area + S_HEAD * 8, 8) == struct.pack("<Q", 24)
        assert vm.read(area + CTRL_SIZE, 8 + 9) == struct.pack("<Q", 9 | KIND_DATA << 32) + (
            b"hello, vm"
        )
        # The VM's receiver goes to sleep on vector 0: the next send rings it (MSI-X).
        vm.write(area + R_VECTOR * 8, struct.pack("<Q", 0))
        vm.write(area + R_WAIT * 8, struct.pack("<Q", 1))
        tx.send(b"wake up")
        assert vm.take_msi(0, WAIT), "the send did not ring the sleeping VM"

        # VM -> host: the host creates the channel, the VM writes one message through BAR2.
        rx = Receiver(host, "from-vm", vm_id, capacity=CAP, vector=1, **opts)
        region = Region(host)
        slot = Membership(region).snapshot().entries[host.id].slot
        entry = find_channel(region, slot, "from-vm", vm_id, host.id)
        assert entry is not None
        _vm_sends(vm, entry.offset, b"hello, host")
        assert rx.recv(timeout=WAIT) == b"hello, host"

        _fill(tx)  # the VM never consumes: the next send blocks
        blocked_send = _in_thread(lambda: tx.send(b"more", timeout=WAIT))
        blocked_recv = _in_thread(lambda: rx.recv(timeout=WAIT))
        time.sleep(0.1)
        vm.qemu.kill()

        assert poll_until(lambda: vm_id not in host.peers, WAIT)
        assert poll_until(lambda: vm_id not in Membership(host).peers(), WAIT)
        for result, channel in (
            (blocked_send(), f"to-vm ({host.id}->{vm_id})"),
            (blocked_recv(), f"from-vm ({vm_id}->{host.id})"),
        ):
            assert isinstance(result, PeerGoneError), repr(result)
            assert result.peer == vm_id and result.channel == channel
        with pytest.raises(PeerGoneError):
            tx.send(b"again", timeout=WAIT)
        with pytest.raises(PeerGoneError):
            rx.recv(timeout=WAIT)
        _close_quietly(tx, rx)


@pytest.mark.qemu
def test_sender_waiting_for_a_killed_qemu_to_open_the_channel_ends(
    server: ServerProcess, qemu_vm: IvshmemDevice
) -> None:
    with connected(server) as host:
        vm_id = _vm_joined(qemu_vm, host)
        opening = _in_thread(lambda: Sender(host, "never-opened", vm_id, timeout=4))
        time.sleep(0.2)
        qemu_vm.qemu.kill()
        result = opening()
        assert not isinstance(result, ChannelTimeout), (
            f"the sender waited for its timeout although peer {vm_id} had left: {result}"
        )
        assert isinstance(result, PeerGoneError), repr(result)
        assert result.peer == vm_id

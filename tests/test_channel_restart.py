"""Channels across a restart of the server, with real servers on one named backing (--file):
the restarted server rebuilds the membership table and hands arena 0 to whoever connects
first, so a channel end opened before the restart must never deliver a byte of the channels
laid out after it, must end with ChannelLostError, and must not keep its own process from
opening the channel again."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ringtwins import PyReceiver as _PyReceiver
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import (
    ChannelCorrupted,
    ChannelLostError,
    Membership,
    NotFormattedError,
    PeerGoneError,
    Receiver,
    Region,
    Sender,
)
from ivshmem.channel.ring import (
    CTRL_SIZE,
    KIND_ARRAY,
    KIND_DATA,
    RingReceiver,
    RingSender,
    init_area,
)

CAPACITY = 4096
WAIT = 10.0


def until(predicate: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


class Restartable:
    """Two servers in turn on one region file (the second one started by ``restart``)."""

    def __init__(self, tmp: Path, second_args: list[str]) -> None:
        self.tmp = tmp
        self.args = ["--file", str(tmp / "region"), "--format"]
        self.second_args = second_args
        self.server = ServerProcess(tmp, size="1M", vectors=1, extra_args=self.args).start()
        self.path = self.server.socket_path

    def restart(self) -> None:
        self.server.stop()
        args = self.args + self.second_args
        self.server = ServerProcess(self.tmp, size="1M", vectors=1, extra_args=args).start()


@pytest.fixture(params=[[], ["--reformat"]], ids=["kept-layout", "reformatted"])
def servers(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Restartable]:
    s = Restartable(short_tmp, request.param)
    try:
        yield s
    finally:
        s.server.stop()


def reconnected(peer: Any) -> None:
    def back() -> bool:
        try:
            peer.service()
        except ivshmem.ConnectionLostError:
            return False
        return bool(peer.connected)

    until(back, "the peer to reconnect")


# The newcomers of the first test, in a process of their own (as in the report: another
# program's channel): c connects first (id 0, slot 0, arena 0) and receives from d on a channel
# laid out exactly where the stale receiver's was; d sends one message and the program waits
# for a line on stdin before c reads it.
NEWCOMERS = """
import sys
import ivshmem
from ivshmem.channel import Receiver, Sender
c = ivshmem.connect(sys.argv[1])
d = ivshmem.connect(sys.argv[1])
rx = Receiver(c, "other", sender=d.id, capacity=int(sys.argv[2]), spin=0)
tx = Sender(d, "other", receiver=c.id, spin=0)
tx.send(b"for c only")
print("sent", c.id, flush=True)
sys.stdin.readline()
print("got", rx.recv(timeout=10).decode(), rx.try_recv(), flush=True)
tx.send(b"still c's")
print("got", rx.recv(timeout=10).decode(), flush=True)
sys.stdin.readline()
"""


def test_a_kept_receiver_never_reads_the_channel_laid_over_it(servers: Restartable) -> None:
    a = ivshmem.connect(servers.path, reconnect=True)  # id 0: membership slot 0, arena 0
    b = ivshmem.connect(servers.path, reconnect=True)
    newcomers: subprocess.Popen[str] | None = None
    try:
        # Nothing was received yet: the stale receiver's private indices are where the new
        # channel's start, the case in which it used to deliver the newcomer's message.
        stale_rx = Receiver(a, "data", sender=b.id, capacity=CAPACITY, spin=0)
        stale_tx = Sender(b, "data", receiver=a.id, spin=0)
        run = Membership(a).run
        servers.restart()
        assert Membership(a).run != run  # the new server took the table over

        # The newcomers connect before a and b notice the restart.
        newcomers = subprocess.Popen(
            [sys.executable, "-c", NEWCOMERS, servers.path, str(CAPACITY)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert newcomers.stdin is not None and newcomers.stdout is not None
        assert newcomers.stdout.readline() == "sent 0\n"

        for call in (
            lambda: stale_rx.recv(timeout=1),
            lambda: stale_rx.try_recv(),
            lambda: stale_rx.recv_many(timeout=1),
            lambda: stale_rx.recv_view(timeout=1),
        ):
            with pytest.raises(ChannelLostError, match="the ivshmem server restarted"):
                call()
        with pytest.raises(ChannelLostError, match="server restarted") as lost:
            stale_tx.send(b"into memory that is c's now")
        assert isinstance(lost.value, PeerGoneError)  # a subclass: leave handlers catch it
        stale_rx.close()
        stale_tx.close()  # writes nothing into c's channel

        newcomers.stdin.write("\n")
        newcomers.stdin.flush()
        # c's message was neither taken nor disturbed, and nothing else reached c.
        assert newcomers.stdout.readline() == "got for c only None\n"
        assert newcomers.stdout.readline() == "got still c's\n"

        # a and b come back with new ids and open the channel again.
        reconnected(a)
        reconnected(b)
        rx = Receiver(a, "data", sender=b.id, capacity=CAPACITY, spin=0, timeout=WAIT)
        tx = Sender(b, "data", receiver=a.id, spin=0, timeout=WAIT)
        tx.send(b"after")
        assert rx.recv(timeout=WAIT) == b"after"
        rx.close()
        tx.close()
        newcomers.stdin.write("\n")
        newcomers.stdin.flush()
        assert newcomers.wait(timeout=WAIT) == 0
    finally:
        if newcomers is not None:
            if newcomers.poll() is None:
                newcomers.kill()
            newcomers.communicate()
        a.close()
        b.close()


def test_reopening_over_a_stale_receiver_in_the_same_process(servers: Restartable) -> None:
    """The receiving process reconnects first and gets arena 0 back: its new Receiver lands on
    the memory its stale one still holds. It must neither be refused as "already open" nor
    let the stale one read the new channel."""
    a = ivshmem.connect(servers.path, reconnect=True)
    b = ivshmem.connect(servers.path, reconnect=True)
    try:
        stale_rx = Receiver(a, "data", sender=b.id, capacity=CAPACITY, spin=0)
        stale_tx = Sender(b, "data", receiver=a.id, spin=0)
        stale_tx.send(b"before")
        assert stale_rx.recv(timeout=WAIT) == b"before"
        servers.restart()
        reconnected(a)  # first back: slot 0 and arena 0 again (and, here, id 0 again)
        reconnected(b)
        rx = Receiver(a, "data", sender=b.id, capacity=CAPACITY, spin=0, timeout=WAIT)
        tx = Sender(b, "data", receiver=a.id, spin=0, timeout=WAIT)
        tx.send(b"after")
        with pytest.raises(ChannelLostError, match="server restarted"):
            stale_rx.recv(timeout=1)
        assert rx.recv(timeout=WAIT) == b"after"
        with pytest.raises(ChannelLostError):  # said again at once, from any call
            stale_rx.try_recv()
        stale_rx.close()
        stale_tx.close()
        rx.close()
        tx.close()
    finally:
        a.close()
        b.close()


def test_a_guest_like_end_that_keeps_its_id_is_lost_too(servers: Restartable) -> None:
    """A guest keeps its id and its memory over a restart but cannot reconnect: played here
    by a plain endpoint on the region file with a fixed id, listed by a host peer of that id
    before the restart. Its receiver ends with ChannelLostError; its id is someone else's
    after the restart."""
    holder = ivshmem.connect(servers.path)  # gets id 0, which the "guest" uses
    b = ivshmem.connect(servers.path)
    guest = ivshmem.open_region(str(servers.tmp / "region"), id=holder.id)
    try:
        stale_rx = Receiver(guest, "g", sender=b.id, capacity=CAPACITY, poll_interval=0.001)
        tx = Sender(b, "g", receiver=guest.id)
        tx.send(b"one")
        assert stale_rx.recv(timeout=WAIT) == b"one"
        servers.restart()
        c = ivshmem.connect(servers.path)  # id 0 again: the guest's id, now another peer's
        d = ivshmem.connect(servers.path)
        try:
            assert c.id == guest.id
            c_rx = Receiver(c, "g", sender=d.id, capacity=CAPACITY)
            d_tx = Sender(d, "g", receiver=c.id)
            d_tx.send(b"for c")
            with pytest.raises(ChannelLostError, match="server restarted"):
                stale_rx.recv(timeout=1)
            assert c_rx.recv(timeout=WAIT) == b"for c"
            for end in (stale_rx, c_rx, d_tx):
                end.close()
        finally:
            c.close()
            d.close()
    finally:
        guest.close()
        holder.close()
        b.close()


@pytest.mark.parametrize("waiting", ["recv", "recv_async"])
def test_a_waiting_receiver_learns_of_the_restart(servers: Restartable, waiting: str) -> None:
    """A receiver blocked with nothing to read learns of the restart at its next liveness
    check, even when a newcomer of its sender's id is listed (nothing says "left")."""
    a = ivshmem.connect(servers.path)
    b = ivshmem.connect(servers.path)
    try:
        rx = Receiver(a, "w", sender=b.id, capacity=CAPACITY, spin=0, liveness_interval=0.05)
        servers.restart()
        others = [ivshmem.connect(servers.path) for _ in range(2)]  # ids 0 and 1 again
        try:
            with pytest.raises(ChannelLostError, match="server restarted"):
                if waiting == "recv":
                    rx.recv(timeout=WAIT)
                else:
                    asyncio.run(rx.recv_async(timeout=WAIT))
        finally:
            for p in others:
                p.close()
        rx.close()
    finally:
        a.close()
        b.close()


def test_a_layout_of_version_1_is_refused_with_the_way_on(short_tmp: Path) -> None:
    """Version 1 layouts (whose ends did not check their slot when reading) are refused by a
    restarting --format server, before it changes anything, naming --reformat; a host that
    attaches to one gets NotFormattedError saying the same."""
    region = short_tmp / "region"
    args = ["--file", str(region), "--format"]
    with ServerProcess(short_tmp, size="1M", extra_args=args):
        pass
    with region.open("r+b") as f:
        page = bytearray(f.read(4096))
        struct.pack_into("<I", page, 8, 1)  # what the previous version wrote
        f.seek(0)
        f.write(page)
    before = region.read_bytes()
    cmd = [sys.executable, "-m", "ivshmem.cli.server", "-F", "-S", str(short_tmp / "s"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "layout of version 1; this server writes version 2" in proc.stderr
    assert "add --reformat" in proc.stderr and "Traceback" not in proc.stderr
    assert region.read_bytes() == before
    with ivshmem.open_region(str(region)) as ep:
        with pytest.raises(NotFormattedError, match="layout version 1, this library"):
            Region(ep)
    with ServerProcess(short_tmp, size="1M", extra_args=[*args, "--reformat"]) as server:
        with ivshmem.connect(server.socket_path) as peer:
            assert Region(peer.memory).max_peers == 16


@pytest.mark.parametrize("core", [RingReceiver, _PyReceiver], ids=["default-core", "python"])
@pytest.mark.parametrize("call", ["try_recv", "take_many", "try_recv_view", "array view"])
def test_the_ring_checks_the_guard_after_every_copy(core: type[RingReceiver], call: str) -> None:
    """Both cores, every read path: a message found while the guard word still held its
    value, but copied out after it changed, is not handed over."""
    area = memoryview(bytearray(CTRL_SIZE + 1024))
    init_area(area)
    tx = RingSender(area, "t")
    rx = core(area, "t")
    guard = memoryview(bytearray(8)).cast("Q")
    guard[0] = 7
    rx.set_guard(guard, 0, 7)
    kind = KIND_ARRAY if call == "array view" else KIND_DATA
    view = tx.try_reserve(5, kind)
    assert view is not None
    view[:] = b"first"
    del view
    tx.commit()
    assert rx.try_recv_view(kind) is not None if kind == KIND_ARRAY else rx.try_recv()
    rx.release()
    view = tx.try_reserve(6, kind)
    assert view is not None
    view[:] = b"second"
    del view
    tx.commit()
    guard[0] = 8  # the memory changed hands (a restart) after the message was published
    reads: dict[str, Callable[[], object]] = {
        "try_recv": rx.try_recv,
        "take_many": lambda: rx.take_many(10),
        "try_recv_view": rx.try_recv_view,
        "array view": lambda: rx.try_recv_view(KIND_ARRAY),
    }
    with pytest.raises(ChannelCorrupted, match="guard"):
        reads[call]()
    with pytest.raises(ChannelCorrupted):  # and it stays broken
        reads[call]()


@pytest.mark.parametrize("end", ["receiver", "sender"])
def test_an_end_blocked_while_its_peer_loses_the_server(short_tmp: Path, end: str) -> None:
    """An end asleep on its doorbell while the endpoint's connection dies (here: another
    thread of the same program notices first, as a reconnecting peer does) must not touch
    the doorbell fds the endpoint closed: it ends with ChannelLostError, never with a raw
    OSError (EBADF), and never polls a number the process may already use for something
    else. The server is killed, so nothing in the memory says that anyone left."""
    server = ServerProcess(short_tmp, size="1M", vectors=1, extra_args=["--format"]).start()
    a = ivshmem.connect(server.socket_path, reconnect=True)
    b = ivshmem.connect(server.socket_path, reconnect=True)
    outcome: list[BaseException | None] = []
    try:
        rx = Receiver(a, "z", sender=b.id, capacity=CAPACITY, spin=0, liveness_interval=0.5)
        tx = Sender(b, "z", receiver=a.id, spin=0, liveness_interval=0.5)
        mine, peer = (rx, a) if end == "receiver" else (tx, b)
        if end == "sender":
            while tx.try_send(b"x" * 100):  # fill the ring: the next send sleeps
                pass

        def block() -> None:
            try:
                if end == "receiver":
                    rx.recv(timeout=WAIT)
                else:
                    tx.send(b"x" * 100, timeout=WAIT)
                outcome.append(None)
            except BaseException as err:
                outcome.append(err)

        t = threading.Thread(target=block)
        t.start()
        time.sleep(0.3)  # asleep on the doorbell
        assert server.proc is not None
        server.proc.kill()
        server.stop(check=False, send_signal=False)

        def lost() -> bool:
            peer.service()  # this thread reads the server's end: the fds close here
            return not peer.connected

        until(lost, "the loss seen")
        t.join(WAIT + 5)
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], ChannelLostError), outcome
        assert "lost its connection to the ivshmem server" in str(outcome[0])
        mine.close()
        (tx if end == "receiver" else rx).close()
    finally:
        a.close()
        b.close()


def test_a_send_that_cannot_ring_because_its_peer_lost_the_server(short_tmp: Path) -> None:
    """The receiver sleeps, so a send rings it; the sender's peer has lost the server (its
    doorbells are gone): the send says so with ChannelLostError (not the endpoint's
    ConnectionLostError), and close() of that end, which rings too, does not raise."""
    server = ServerProcess(short_tmp, size="1M", vectors=1, extra_args=["--format"]).start()
    a = ivshmem.connect(server.socket_path, reconnect=True)
    b = ivshmem.connect(server.socket_path, reconnect=True)
    try:
        rx = Receiver(a, "y", sender=b.id, capacity=CAPACITY, spin=0, liveness_interval=30)
        tx = Sender(b, "y", receiver=a.id, spin=0)
        done = threading.Event()

        def sleep_in_recv() -> None:
            with contextlib.suppress(Exception):
                rx.recv(timeout=3)
            done.set()

        t = threading.Thread(target=sleep_in_recv)
        t.start()
        time.sleep(0.3)  # rx announced that it sleeps: the next send rings
        assert server.proc is not None
        server.proc.kill()
        server.stop(check=False, send_signal=False)

        def lost() -> bool:
            b.service()
            return not b.connected

        until(lost, "the loss seen")
        with pytest.raises(ChannelLostError, match="lost its connection"):
            tx.send(b"ring", timeout=1)
        tx.close()
        t.join(10)
        rx.close()
    finally:
        a.close()
        b.close()

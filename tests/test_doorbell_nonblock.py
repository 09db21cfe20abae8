"""A peer that clears O_NONBLOCK on someone else's doorbell must not break their timeouts.

Every peer holds every other peer's doorbell eventfds, and O_NONBLOCK belongs to the open file
description they all share: one ``fcntl`` by a hostile peer makes the victim's own doorbell
blocking. Then a read that expects EAGAIN sleeps until the next ring: the spin loop of
``wait()``, a channel's drain of its doorbell, and any read after ``poll()`` said "readable"
whose count someone else took first -- which the hostile peer, holding the fd, can do.

The steal is made deterministic with ``on_peer_joined``: it runs inside the victim's wait
between its poll() (which saw the ring and the server's join message together) and its read
of the doorbell, and there the hostile peer takes the count. The hostile reads use
``preadv(..., RWF_NOWAIT)`` directly, so that this file does not depend on the module it tests.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from serverproc import RawPeer, ServerProcess

import ivshmem
from ivshmem.channel import ChannelTimeout, Receiver, Sender
from ivshmem.device import DeviceServer, VmSpec
from ivshmem.peer import Peer

#: A wait that should end after TIMEOUT seconds must end within LATE (the machine is loaded:
#: generous, yet far below "until the next ring", which never comes in these tests).
TIMEOUT = 0.2
LATE = 3.0


def _make_blocking(fd: int) -> None:
    """What a hostile peer does to a doorbell it holds: one fcntl, nothing else."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    assert os.get_blocking(fd)


def _steal(fd: int) -> bool:
    """Take the doorbell's count through the hostile peer's copy, never blocking."""
    try:
        os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


class _Call:
    """``call()`` in a daemon thread: what it returned or raised, and how long it took."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.elapsed = -1.0
        self._done = threading.Event()

        def run() -> None:
            t0 = time.monotonic()
            try:
                self.result = call()
            except BaseException as err:  # handed to the test
                self.error = err
            self.elapsed = time.monotonic() - t0
            self._done.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def finish(self, within: float, unblock: int) -> bool:
        """Whether the call returned within ``within`` seconds. If it did not (it sleeps in a
        read of doorbell ``unblock``), ring that doorbell until it returns, so that no thread
        is left behind."""
        if self._done.wait(within):
            return True
        while not self._done.wait(0.05):
            os.eventfd_write(unblock, 1)
        self._thread.join()
        return False


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    with ServerProcess(short_tmp, size="4M", vectors=2, extra_args=["--format"]) as server:
        yield server


@pytest.fixture
def victim_and_hostile(server: ServerProcess) -> Iterator[tuple[Peer, RawPeer, int]]:
    """An honest peer, and a hostile one holding the honest one's vector 0 doorbell."""
    victim = ivshmem.connect(server.socket_path, vectors=2)
    hostile = RawPeer(server.socket_path, keep_fds=True)
    try:
        hostile.wait(lambda: hostile.complete({victim.id}, 2))
        doorbell = hostile.peer_fds[victim.id][0]
        _knows(victim, {hostile.id})  # no join news left for the tests' own
        yield victim, hostile, doorbell
    finally:
        hostile.close()
        victim.close()


def _knows(peer: Peer, others: set[int | None]) -> None:
    """Wait until ``peer`` has served the joins of ``others`` (so that the only join news a
    test's wait sees is the one the test makes)."""
    deadline = time.monotonic() + 10
    while not others <= set(peer.peers):  # peers serves the socket
        assert time.monotonic() < deadline, f"peer {peer.id} never saw {others}"
        time.sleep(0.01)
    time.sleep(0.05)
    peer.service()  # a late vector of theirs


def _ring_and_join(server: ServerProcess, victim: Peer, doorbell: int) -> RawPeer:
    """Ring the victim, then make a peer join, and wait until the victim's socket has the news:
    its next wait sees both at once (the news is served before the doorbell is read)."""
    os.eventfd_write(doorbell, 1)
    newcomer = RawPeer(server.socket_path)
    try:
        newcomer.wait(lambda: newcomer.state.own_vectors == 2)  # sent after all the rest
        poller = select.poll()
        poller.register(victim.server_fd, select.POLLIN)
        assert poller.poll(10_000), "the server never told the victim about the newcomer"
    except BaseException:
        newcomer.close()
        raise
    return newcomer


def _steal_inside_the_wait(victim: Peer, doorbell: int) -> list[bool]:
    """Make the hostile peer take the count while the victim serves the join's news."""
    stolen: list[bool] = []
    victim.on_peer_joined = lambda peer: stolen.append(_steal(doorbell))
    return stolen


# -- the read itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["active", "python"])
def test_try_read_never_blocks_on_a_blocking_eventfd(impl: str) -> None:
    from ivshmem import _eventfd

    assert _eventfd.NOWAIT_READS, "this kernel does not honour RWF_NOWAIT on eventfds"
    read = _eventfd.try_read if impl == "active" else _eventfd._try_read_python
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a hostile peer leaves one
    try:
        call = _Call(lambda: read(fd))
        assert call.finish(LATE, fd), "try_read slept in a read of an empty blocking eventfd"
        assert call.result is False
        os.eventfd_write(fd, 3)
        assert read(fd) is True  # the whole count is taken...
        assert read(fd) is False  # ...at once
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        read(fd)  # closed: an error, never a hang or a False


def test_the_c_read_is_built_and_used() -> None:
    # In a child without IVSHMEM_PURE_PYTHON, so that the pure-Python pass of scripts/test.sh
    # checks it too rather than skipping it.
    code = (
        "from ivshmem import _eventfd as e; "
        "print(e.try_read is not e._try_read_python, type(e.try_read).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "IVSHMEM_PURE_PYTHON"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    require(
        out[0] == "True",
        "the doorbell's C read (ivshmem._eventfdcore) did not build (pip install needs gcc "
        "and the Python headers)",
    )
    assert out[1] == "builtin_function_or_method"


def test_pure_python_can_be_forced() -> None:
    code = "from ivshmem import _eventfd as e; print(e.try_read is e._try_read_python)"
    env = {**os.environ, "IVSHMEM_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["True"]


# -- Peer.wait and wait_async ----------------------------------------------------------------


def test_a_spinning_wait_keeps_its_timeout_on_a_doorbell_made_blocking(
    victim_and_hostile: tuple[Peer, RawPeer, int],
) -> None:
    victim, _, doorbell = victim_and_hostile
    for vector in (0, None):
        assert victim.wait(vector, timeout=0) is None  # builds the poll sets the spin uses
    _make_blocking(doorbell)
    for vector in (0, None):  # the single-fd spin loop, and the spinner over all vectors
        call = _Call(functools.partial(victim.wait, vector, timeout=TIMEOUT))
        assert call.finish(LATE, doorbell), f"wait({vector}) slept until the next ring"
        assert call.error is None and call.result is None
        assert call.elapsed >= TIMEOUT * 0.9
    os.eventfd_write(doorbell, 1)
    assert victim.wait(0, timeout=10) == 0  # a ring still wakes it


def test_a_blocking_wait_keeps_its_timeout_when_its_ring_is_stolen(
    server: ServerProcess, victim_and_hostile: tuple[Peer, RawPeer, int]
) -> None:
    victim, _, doorbell = victim_and_hostile
    _make_blocking(doorbell)
    stolen = _steal_inside_the_wait(victim, doorbell)
    newcomer = _ring_and_join(server, victim, doorbell)
    try:
        call = _Call(lambda: victim.wait(0, timeout=TIMEOUT, spin=0))
        assert call.finish(LATE, doorbell), "wait(spin=0) slept in the read after poll()"
        assert stolen == [True]  # the count was gone before the victim's read
        assert call.error is None and call.result is None
        assert newcomer.id in victim.peers  # and the news was served meanwhile
    finally:
        newcomer.close()
    victim.on_peer_joined = None
    os.eventfd_write(doorbell, 1)
    assert victim.wait(0, timeout=10, spin=0) == 0


def test_wait_async_keeps_its_timeout_when_its_ring_is_stolen(
    server: ServerProcess, victim_and_hostile: tuple[Peer, RawPeer, int]
) -> None:
    victim, _, doorbell = victim_and_hostile
    _make_blocking(doorbell)
    stolen = _steal_inside_the_wait(victim, doorbell)
    newcomer = _ring_and_join(server, victim, doorbell)

    async def wait_then_ring() -> tuple[int | None, int | None]:
        first = await victim.wait_async(0, timeout=TIMEOUT)
        victim.on_peer_joined = None
        asyncio.get_running_loop().call_later(0.05, os.eventfd_write, doorbell, 1)
        return first, await victim.wait_async(0, timeout=10)

    try:
        # A read that blocks here blocks the event loop itself: only a thread can tell.
        call = _Call(lambda: asyncio.run(wait_then_ring()))
        assert call.finish(LATE + 10, doorbell), "wait_async blocked the event loop in a read"
        assert stolen == [True]
        assert call.error is None
        assert call.result == (None, 0)  # timed out, then woken by a ring
    finally:
        newcomer.close()


def test_ringing_a_doorbell_made_blocking_does_not_block(
    server: ServerProcess, victim_and_hostile: tuple[Peer, RawPeer, int]
) -> None:
    """The write side needs no change (this passes on main too, and says so): a write waits
    only on a full counter, which is the server's guard's business (test_doorbell_jam.py)."""
    victim, _, doorbell = victim_and_hostile
    _make_blocking(doorbell)
    with ivshmem.connect(server.socket_path, vectors=2) as ringer:
        for _ in range(3):
            call = _Call(lambda: ringer.notify(victim.id, 0))
            assert call.finish(LATE, doorbell) and call.error is None
        assert victim.wait(0, timeout=10) == 0
        assert victim.wait(0, timeout=0) is None  # three rings, one count, taken at once


# -- channels ------------------------------------------------------------------------------------


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[tuple[Receiver, Sender, Peer, int]]:
    """A channel from an honest peer to the victim; the hostile peer makes the victim's
    doorbell blocking after the channel opened."""
    victim = ivshmem.connect(server.socket_path, vectors=2)
    other = ivshmem.connect(server.socket_path, vectors=2)
    hostile = RawPeer(server.socket_path, keep_fds=True)
    try:
        hostile.wait(lambda: hostile.complete({victim.id, other.id}, 2))
        _knows(victim, {other.id, hostile.id})
        rx = Receiver(victim, "nonblock", sender=other.id)
        tx = Sender(other, "nonblock", receiver=victim.id)
        doorbell = hostile.peer_fds[victim.id][0]
        _make_blocking(doorbell)
        yield rx, tx, victim, doorbell
        rx.close()
        tx.close()
    finally:
        hostile.close()
        other.close()
        victim.close()


def test_a_channels_recv_keeps_its_timeout_on_a_doorbell_made_blocking(
    channel: tuple[Receiver, Sender, Peer, int],
) -> None:
    rx, tx, _, doorbell = channel
    for spin in (0.0, 50e-6):
        rx.spin = spin
        call = _Call(lambda: rx.recv(timeout=TIMEOUT))
        assert call.finish(LATE, doorbell), f"recv(spin={spin}) slept until the next ring"
        assert isinstance(call.error, ChannelTimeout)
    tx.send(b"still rings")
    assert rx.recv(timeout=10) == b"still rings"


def test_a_channels_recv_async_keeps_its_timeout_when_its_ring_is_stolen(
    server: ServerProcess, channel: tuple[Receiver, Sender, Peer, int]
) -> None:
    rx, tx, victim, doorbell = channel
    stolen = _steal_inside_the_wait(victim, doorbell)
    newcomer = _ring_and_join(server, victim, doorbell)

    async def recv_twice() -> tuple[str, bytes]:
        try:
            await rx.recv_async(timeout=TIMEOUT)
        except ChannelTimeout as err:
            first = type(err).__name__
        else:  # pragma: no cover - reported by the assertion below
            first = "a message"
        victim.on_peer_joined = None
        asyncio.get_running_loop().call_later(0.05, tx.send, b"async")
        return first, await rx.recv_async(timeout=10)

    try:
        call = _Call(lambda: asyncio.run(recv_twice()))
        assert call.finish(LATE + 10, doorbell), "recv_async blocked the event loop in a read"
        assert stolen == [True]
        assert call.error is None
        result: Any = call.result
        assert result == ("ChannelTimeout", b"async")
    finally:
        newcomer.close()


# -- the vfio-user device ------------------------------------------------------------------------


class _StealOnJoin(logging.Handler):
    """Takes the count of ``doorbell`` when the device logs a join: inside the device loop's
    round, after its selector reported the doorbell readable and before the doorbell's turn."""

    def __init__(self, doorbell: int) -> None:
        super().__init__(logging.INFO)
        self.doorbell = doorbell
        self.stolen: list[bool] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "joined" in record.getMessage():
            self.stolen.append(_steal(self.doorbell))


def test_the_device_loop_is_not_stopped_by_a_stolen_ring(
    server: ServerProcess, short_tmp: Path
) -> None:
    spec = VmSpec(
        socket=str(short_tmp / "vm.sock"), server=server.socket_path, vectors=2, intx=True
    )
    logger = logging.getLogger("ivshmem.device")
    level = logger.level
    with DeviceServer([spec]) as device:
        vm = device.vms[0]
        hostile = RawPeer(server.socket_path, keep_fds=True)
        newcomer: RawPeer | None = None
        steal = _StealOnJoin(-1)
        try:
            deadline = time.monotonic() + 10
            while not (len(vm.own_fds) == 2 and hostile.id in (vm.link.peers if vm.link else ())):
                assert time.monotonic() < deadline, "the device never saw the hostile peer"
                device.run_once(0.05)
                hostile.pump()
            hostile.wait(lambda: hostile.complete({vm.function.peer_id}, 2))
            doorbell = hostile.peer_fds[vm.function.peer_id][0]
            _make_blocking(doorbell)
            steal.doorbell = doorbell
            logger.addHandler(steal)
            logger.setLevel(logging.INFO)
            # The join's news first, then the ring: one selector round reports both, in that
            # order, and the news (logged) is served first.
            newcomer = RawPeer(server.socket_path)
            newcomer.wait(lambda: newcomer is not None and newcomer.state.own_vectors == 2)
            assert vm.link is not None and vm.link.sock is not None
            poller = select.poll()
            poller.register(vm.link.sock.fileno(), select.POLLIN)
            assert poller.poll(10_000), "the server never told the device about the newcomer"
            os.eventfd_write(doorbell, 1)
            call = _Call(lambda: device.run_once(0))
            assert call.finish(LATE, doorbell), "the device loop slept in a read of its doorbell"
            assert call.error is None
            assert steal.stolen == [True]
            assert vm.function.intrstatus & 1 == 0  # the stolen ring never reached the guest
            os.eventfd_write(doorbell, 1)  # a ring still goes through
            deadline = time.monotonic() + 10
            while not vm.function.intrstatus & 1:
                assert time.monotonic() < deadline, "the ring never reached the guest"
                device.run_once(0.05)
        finally:
            logger.removeHandler(steal)
            logger.setLevel(level)
            if newcomer is not None:
                newcomer.close()
            hostile.close()

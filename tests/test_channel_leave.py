"""How waits learn that the other peer left or closed its end, with a real server: many
short waits are probed as one long wait is, a finding sticks, a close wakes the other side,
and the server's membership table is believed before the socket's news."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess

import ivshmem
from ivshmem.channel import (
    ChannelClosedError,
    ChannelTimeout,
    Membership,
    PeerGoneError,
    Receiver,
    Sender,
)


@pytest.fixture
def peers(short_tmp: Path) -> Iterator[tuple[Any, Any]]:
    """Two host peers of a server that keeps the membership table."""
    with ServerProcess(short_tmp, size="4M", vectors=2, extra_args=["--format"]) as server:
        a = ivshmem.connect(server.socket_path, vectors=2)
        b = ivshmem.connect(server.socket_path, vectors=2)
        try:
            yield a, b
        finally:
            a.close()
            b.close()


def test_short_waits_learn_that_the_sender_left_and_later_waits_say_so_at_once(
    peers: tuple[Any, Any],
) -> None:
    a, b = peers
    rx = Receiver(a, "leave", sender=b.id, spin=0, liveness_interval=0.05)
    tx = Sender(b, "leave", receiver=a.id)
    tx.send(b"last")
    b.close()  # leaves: the server drops it
    got: list[bytes] = []
    end = time.monotonic() + 20
    with pytest.raises(PeerGoneError, match=f"peer {b.id} left"):
        while time.monotonic() < end:  # a caller polling with waits far below the interval
            try:
                got.append(rx.recv(timeout=0.01))
            except ChannelTimeout:
                continue
    assert got == [b"last"]  # delivered before the news
    rx.liveness_interval = 60.0  # no new probe is due for a minute...
    with pytest.raises(PeerGoneError):
        rx.recv(timeout=5)  # ...yet the finding sticks: said at once, not a timeout
    with pytest.raises(PeerGoneError):
        rx.recv(timeout=0)


def test_a_close_wakes_the_other_side_which_says_so(peers: tuple[Any, Any]) -> None:
    """Long liveness intervals: only the wake-up a close() rings can end these waits in
    time (each would otherwise time out)."""
    a, b = peers
    rx = Receiver(a, "close", sender=b.id, capacity=4096, spin=0, liveness_interval=60)
    tx = Sender(b, "close", receiver=a.id, spin=0, liveness_interval=60)
    timer = threading.Timer(0.2, tx.close)
    timer.start()
    with pytest.raises(ChannelClosedError, match="closed it"):
        rx.recv(timeout=20)  # blocked receiver, sender closes
    timer.join()
    rx.close()
    rx2 = Receiver(a, "close2", sender=b.id, capacity=4096, spin=0, liveness_interval=60)
    tx2 = Sender(b, "close2", receiver=a.id, spin=0, liveness_interval=60)
    while tx2.try_send(bytes(1000)):
        pass  # the ring is full
    timer = threading.Timer(0.2, rx2.close)
    timer.start()
    with pytest.raises(ChannelClosedError, match="closed it"):
        tx2.send(bytes(1000), timeout=20)  # blocked sender, receiver closes
    timer.join()
    tx2.close()


def test_the_membership_table_is_believed_before_the_socket(peers: tuple[Any, Any]) -> None:
    """The server updates the table before its message about a leave reaches the other
    peers' sockets: presence follows the table, whatever the socket has told so far."""
    a, b = peers
    rx = Receiver(a, "table", sender=b.id)
    gone = b.id
    b.close()
    table = Membership(a.memory)
    end = time.monotonic() + 20
    while gone in table.peers():  # read the table only: a's socket is not serviced
        assert time.monotonic() < end, "the server never unlisted the peer"
        time.sleep(0.005)
    assert rx._peer_present() is False
    assert rx.peer_alive() is False

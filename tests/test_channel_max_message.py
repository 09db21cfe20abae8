"""The largest message is one number, said the same way everywhere: half the capacity less
the 8-byte record header (``max_message``), which send, reserve and the error agree on."""

from __future__ import annotations

from pathlib import Path

import pytest

import ivshmem
from ivshmem.channel import Receiver, Sender, format_region, max_message
from ivshmem.errors import UsageError


@pytest.mark.parametrize("capacity", [256, 4096, 1 << 16])
def test_the_largest_message_is_half_the_capacity_less_its_header(
    short_tmp: Path, capacity: int
) -> None:
    assert max_message(capacity) == capacity // 2 - 8
    path = str(short_tmp / "region")
    with ivshmem.open_region(path, id=1, size=4 << 20) as a, ivshmem.open_region(path, id=2) as b:
        format_region(a, max_peers=2, peers=[1, 2])
        rx = Receiver(b, "big", sender=1, capacity=capacity, spin=0, poll_interval=0.001)
        tx = Sender(a, "big", receiver=2, spin=0, poll_interval=0.001)
        assert rx.max_message == tx.max_message == max_message(capacity)
        largest = max_message(capacity)
        for i in range(5):  # at every position of the ring, the wrap included
            tx.send(bytes([i]) * largest)
            assert rx.recv(timeout=5) == bytes([i]) * largest
        with pytest.raises(UsageError, match=rf"the most is {largest} bytes .*max_message"):
            tx.send(bytes(largest + 1))
        with pytest.raises(UsageError, match=rf"the most is {largest} bytes"):
            tx.reserve(largest + 1)
        view = tx.reserve(largest)
        view[:] = b"r" * largest
        del view
        tx.commit()
        assert rx.recv(timeout=5) == b"r" * largest
        rx.close()
        tx.close()


@pytest.mark.parametrize("capacity", [0, 100, 128, 3000, True, 4096.0, "4096", 1 << 33])
def test_max_message_refuses_what_is_not_a_capacity(capacity: object) -> None:
    with pytest.raises(UsageError, match="must be a power of two"):
        max_message(capacity)  # type: ignore[arg-type]

"""Keeping every doorbell ringable, whatever a peer did to one.

Every peer holds every other peer's doorbell eventfds: that is how it rings them. An eventfd's
O_NONBLOCK is a flag of the *open file description*, which all those processes share, and
its counter can be set to its maximum (2**64 - 2) by one ``write``. A peer that does both to
a doorbell -- its own, or anyone's -- makes every later ``write`` to it block until someone
reads the counter: a host peer's ``notify`` hangs, and a QEMU whose guest rings that doorbell
hangs in the write with its vCPU (TCG and KVM without ioeventfd alike), holding QEMU's big
lock: the whole VM stops. The server never blocks on one (:func:`regionguard.ring_eventfd`),
but it cannot stop others from writing.

It can undo it. Every :data:`CHECK_INTERVAL` seconds one ``poll`` over all doorbells finds
those whose counter is at its maximum (not writable), which no honest use can reach: the
counter only grows by one per ring, and the owner resets it to zero on every wake-up. For
each, the server sets O_NONBLOCK again, reads the counter (which wakes every blocked writer,
since the counter is then zero) and rings it once, so that the owner still sees the ring it
may have been sent, and logs a warning naming the doorbell (whose it is; not who did it: any
peer can write any doorbell, so the owner is not disconnected for it). A writer that a peer
made block is stuck for at most one interval, no longer forever. Cost: one ``poll`` over
``peers x vectors`` fds per interval (1.6 ms for 4,000 fds here: under 1 % of a CPU).

That read is the only read of an eventfd the server makes, and it must not block either: the
flag it just set can be cleared again at once by the peer, and the owner may take the count
first (it wakes up to a full counter), so it is a read that ignores O_NONBLOCK
(:func:`ivshmem._eventfd.try_read`). The server's rings are writes checked with ``poll`` first
(:func:`~ivshmem.server.regionguard.ring_eventfd`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select

from .._eventfd import try_read
from .base import ServerBase

log = logging.getLogger("ivshmem.server")

_NAMED = 4  # doorbells named in one warning; the rest are counted


def saturated(fds: list[int]) -> list[int]:
    """Those of eventfds ``fds`` that a write of 1 would not go into (counter at its
    maximum), or that report an error."""
    if not fds:
        return []
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLOUT)
    writable = {fd for fd, ev in poller.poll(0) if ev & select.POLLOUT and not ev & select.POLLERR}
    return [fd for fd in fds if fd not in writable]


def unjam(fd: int) -> bool:
    """Make eventfd ``fd`` writable again without ever blocking: O_NONBLOCK back on, the
    counter read (every writer blocked on it goes on), one ring put back. True if it was
    jammed (its counter was read)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    # The flag just set proves nothing by the time of the read: the peer may clear it again at
    # once, and the owner may read the counter first (it wakes up to a full counter), so a
    # plain read could block the whole server. try_read never blocks, whatever the flag.
    if not try_read(fd):
        return False  # its owner read it meanwhile
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)
    return True


class DoorbellMixin(ServerBase):
    """The periodic check of every doorbell (see the module's text), made by the server's
    guard timer (core.py) along with the region's size check."""

    def check_doorbells(self) -> int:
        """Unjam every doorbell found jammed; returns how many were."""
        table = self._table
        if table is None:
            return 0
        owner: dict[int, tuple[int, int]] = {}
        for peer in table:
            for vector, shared in enumerate(table.vectors_of(peer)):
                owner[shared.fileno()] = (peer, vector)
        jammed: list[tuple[int, int]] = []
        for fd in saturated(list(owner)):
            try:
                if unjam(fd):
                    jammed.append(owner[fd])
            except OSError as err:  # closed under us: the peer is leaving
                log.debug("doorbell fd %d: %s", fd, err)
        if jammed:
            named = ", ".join(f"peer {p} vector {v}" for p, v in jammed[:_NAMED])
            more = f" and {len(jammed) - _NAMED} more" if len(jammed) > _NAMED else ""
            log.warning(
                "jammed doorbell(s): %s%s: counter at its maximum, so writers would block; "
                "reset and rang once (any peer can do this to any doorbell: who did is not "
                "known)", named, more,
            )  # fmt: skip
        return len(jammed)

"""The ring with its Python twins forced: what ``IVSHMEM_PURE_PYTHON=1`` does for the whole
module, on one subclass, so a test can run both cores side by side in one process."""

from __future__ import annotations

from ivshmem.channel.ring import RingReceiver, RingSender

__all__ = ["PyReceiver", "PySender"]


class PySender(RingSender):
    try_send = RingSender._try_send_py
    try_send_many = RingSender._try_send_many_py
    try_reserve = RingSender._try_reserve_py
    commit = RingSender._commit_py
    flush = RingSender._flush_py


class PyReceiver(RingReceiver):
    _take = RingReceiver._take_py
    take_many = RingReceiver._take_many_py
    _take_view = RingReceiver._take_view_py
    release = RingReceiver._release_py
    _publish_tail = RingReceiver._publish_tail_py

"""Messaging over a shared region: layout, membership, and zero-copy channels.

* :func:`format_region` writes the layout; :class:`Region` attaches to it.
* :class:`MembershipWriter` (the server) and :class:`Membership` (everyone) keep and read the
  table of present peers.
* :class:`Sender`, :class:`Receiver` and :class:`Duplex` move messages, over any
  :class:`~ivshmem.Endpoint`.

Memory-ordering and trust arguments: ``_ordering.py``, ``layout.py``, ``ring.py``.
"""

from .channel import DEFAULT_CAPACITY, Duplex, Receiver, Sender, max_message
from .errors import (
    ChannelClosedError,
    ChannelCorrupted,
    ChannelError,
    ChannelLostError,
    ChannelTimeout,
    CorruptedError,
    NotFormattedError,
    PeerGoneError,
    RegionCorrupted,
    RegionFullError,
    UnexpectedMessageError,
    UnsupportedPlatformError,
)
from .layout import (
    Membership,
    MembershipSnapshot,
    MembershipWriter,
    PeerEntry,
    Region,
    format_region,
    is_formatted,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "ChannelClosedError",
    "ChannelCorrupted",
    "ChannelError",
    "ChannelLostError",
    "ChannelTimeout",
    "CorruptedError",
    "Duplex",
    "Membership",
    "MembershipSnapshot",
    "MembershipWriter",
    "NotFormattedError",
    "PeerEntry",
    "PeerGoneError",
    "Receiver",
    "Region",
    "RegionCorrupted",
    "RegionFullError",
    "Sender",
    "UnexpectedMessageError",
    "UnsupportedPlatformError",
    "format_region",
    "is_formatted",
    "max_message",
]

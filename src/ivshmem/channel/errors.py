"""Errors of the messaging layer.

::

    ChannelError (IvshmemError)       base of everything raised by ivshmem.channel
    ├── NotFormattedError             the region has no (compatible) layout header; a UsageError
    ├── CorruptedError                shared memory failed validation (another peer wrote garbage)
    │   ├── RegionCorrupted           the header, directory, membership table or an arena
    │   └── ChannelCorrupted          one channel's control words or records
    ├── PeerGoneError                 the peer at the other end of a channel left
    │   └── ChannelLostError          the channel's memory was taken back (a server restart)
    ├── ChannelClosedError            the sender closed the channel and everything was received
    ├── ChannelTimeout                a wait ran out of time; also a TimeoutError
    ├── RegionFullError               no room left (arena, directory or membership table)
    ├── UnexpectedMessageError        the next message is of another kind (bytes versus array)
    └── UnsupportedPlatformError      not x86-64: the memory-ordering argument does not hold

Corruption errors name where (``region``/``channel``) and which field was wrong, so a log line
says which peer's memory to distrust.
"""

from __future__ import annotations

from ..errors import IvshmemError, UsageError

__all__ = [
    "ChannelClosedError",
    "ChannelCorrupted",
    "ChannelError",
    "ChannelLostError",
    "ChannelTimeout",
    "CorruptedError",
    "NotFormattedError",
    "PeerGoneError",
    "RegionCorrupted",
    "RegionFullError",
    "UnexpectedMessageError",
    "UnsupportedPlatformError",
]


class ChannelError(IvshmemError):
    """Base class of the messaging layer's errors."""


class NotFormattedError(ChannelError, UsageError):
    """The region carries no layout header this version understands."""


class CorruptedError(ChannelError):
    """A value read from shared memory is impossible: some peer wrote garbage there."""

    def __init__(self, where: str, field: str, detail: str) -> None:
        self.where = where
        self.field = field
        self.detail = detail
        super().__init__(f"{where}: field {field!r} is corrupt: {detail}")


class RegionCorrupted(CorruptedError):
    """The region header, directory, membership table or an arena directory is corrupt."""


class ChannelCorrupted(CorruptedError):
    """A channel's control words or message records are corrupt. The channel stays broken:
    every later call raises this again."""

    def __init__(self, channel: str, field: str, detail: str) -> None:
        self.channel = channel
        super().__init__(f"channel {channel!r}", field, detail)


class PeerGoneError(ChannelError):
    """The other end of a channel left the system (it disconnected or its VM stopped)."""

    def __init__(self, channel: str, peer: int) -> None:
        self.channel = channel
        self.peer = peer
        super().__init__(f"channel {channel!r}: peer {peer} left")


class ChannelLostError(PeerGoneError):
    """This end of the channel cannot go on: the membership slot it was opened under was
    cleared, so its memory may already belong to another channel. It happens when the server
    restarts (a new server rebuilds the membership table and hands the arenas out again) or
    when this peer itself was disconnected. Nothing more is read from or written to the
    channel; open a new end with the ids the peers have now.

    A subclass of :class:`PeerGoneError`, so code that reopens a channel when its peer leaves
    handles this too. ``reason`` says which of the two happened."""

    def __init__(self, channel: str, peer: int, reason: str) -> None:
        super().__init__(channel, peer)
        self.reason = reason
        self.args = (f"channel {channel!r} is lost: {reason}",)

    def __str__(self) -> str:
        return str(self.args[0])


class ChannelClosedError(ChannelError):
    """The sender closed the channel, and every message it sent has been received."""


class ChannelTimeout(ChannelError, TimeoutError):
    """A blocking call ran out of time."""


class RegionFullError(ChannelError):
    """No room: an arena's space or directory, or the membership table, is full."""


class UnexpectedMessageError(ChannelError):
    """The next message is of another kind than asked for (bytes versus array); it is left in
    the channel."""


class UnsupportedPlatformError(ChannelError):
    """The messaging layer relies on x86-64 memory ordering and refuses other machines."""

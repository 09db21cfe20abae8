"""The exceptions raised by this package.

Errors are named by condition, and which side is at fault is part of the name::

    IvshmemError                      base of everything raised here
    ├── UsageError                    you asked for something impossible (bad size, unknown peer…)
    │   ├── UnknownPeerError          notify() to a peer id that is not connected
    │   ├── UnknownVectorError        a vector number outside 0..vectors-1
    │   └── DoorbellUnavailableError  notify()/wait() on a region with no doorbell
    ├── PeersUnknownError             membership cannot be known from here (a guest without a
    │                                 formatted region); a UsageError too
    ├── ClosedError                   the endpoint was closed by this process
    ├── ProtocolError                 the server broke the ivshmem wire protocol
    ├── ConnectionLostError           the server went away (OSError as __cause__)
    ├── ServerConfigError             a server option or the environment is wrong
    └── DeviceError                   a guest PCI device could not be used (pci package)

Every OSError from the kernel is translated once, at the boundary where it happens, and is kept
as ``__cause__``.
"""

from __future__ import annotations


class IvshmemError(Exception):
    """Base class of every error this package raises."""


class UsageError(IvshmemError, ValueError):
    """The caller asked for something that cannot be done (the caller's mistake)."""


class UnknownPeerError(UsageError, LookupError):
    """A peer id that is not currently connected."""

    def __init__(self, peer: int, known: object = None) -> None:
        self.peer = peer
        detail = ""
        if isinstance(known, (set, frozenset)):
            detail = f"; connected peers: {sorted(known)}"
        super().__init__(f"peer {peer} is not connected{detail}")


class UnknownVectorError(UsageError, LookupError):
    """A vector number outside the range a peer has."""

    def __init__(self, vector: int, vectors: int, peer: int | None = None) -> None:
        self.vector = vector
        self.vectors = vectors
        who = "this endpoint" if peer is None else f"peer {peer}"
        super().__init__(
            f"vector {vector} does not exist: {who} has {vectors} vector(s), "
            f"numbered 0..{vectors - 1}"
        )


class DoorbellUnavailableError(UsageError):
    """notify()/wait() on an endpoint that has shared memory but no doorbell."""


class PeersUnknownError(UsageError):
    """The set of connected peers cannot be known from this endpoint."""


class ClosedError(IvshmemError):
    """The endpoint (or one of its resources) was closed by this process."""


class ProtocolError(IvshmemError):
    """The server sent something the ivshmem protocol does not allow."""


class ConnectionLostError(IvshmemError):
    """The connection to the server broke; the original OSError is the ``__cause__``."""


class ServerConfigError(IvshmemError):
    """A server option, or the environment the server runs in, is wrong."""


class DeviceError(IvshmemError):
    """An ivshmem PCI device inside a guest cannot be used as asked."""

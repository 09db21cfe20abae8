"""Inter-VM shared memory (ivshmem) for Python."""

from .channel import (
    ChannelClosedError,
    ChannelCorrupted,
    ChannelError,
    ChannelTimeout,
    Duplex,
    Membership,
    NotFormattedError,
    PeerGoneError,
    Receiver,
    RegionCorrupted,
    Sender,
    format_region,
)
from .endpoint import Endpoint, RegionEndpoint, open_region
from .errors import (
    ClosedError,
    ConnectionLostError,
    DeviceError,
    DoorbellUnavailableError,
    IvshmemError,
    PeersUnknownError,
    ProtocolError,
    ServerConfigError,
    UnknownPeerError,
    UnknownVectorError,
    UsageError,
)
from .memory import SharedMemory, parse_size
from .pci import PciEndpoint, open_pci
from .peer import (
    FdLimitError,
    HandshakeTimeoutError,
    Peer,
    Reconnected,
    ServerUnavailableError,
    connect,
    connect_async,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelClosedError",
    "ChannelCorrupted",
    "ChannelError",
    "ChannelTimeout",
    "ClosedError",
    "ConnectionLostError",
    "DeviceError",
    "DoorbellUnavailableError",
    "Duplex",
    "Endpoint",
    "FdLimitError",
    "HandshakeTimeoutError",
    "IvshmemError",
    "Membership",
    "NotFormattedError",
    "PciEndpoint",
    "Peer",
    "PeerGoneError",
    "PeersUnknownError",
    "ProtocolError",
    "Receiver",
    "Reconnected",
    "RegionCorrupted",
    "RegionEndpoint",
    "Sender",
    "ServerConfigError",
    "ServerUnavailableError",
    "SharedMemory",
    "UnknownPeerError",
    "UnknownVectorError",
    "UsageError",
    "__version__",
    "connect",
    "connect_async",
    "format_region",
    "open_pci",
    "open_region",
    "parse_size",
]

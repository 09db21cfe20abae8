"""Inter-VM shared memory (ivshmem) for Python."""

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
    HandshakeTimeoutError,
    Peer,
    Reconnected,
    ServerUnavailableError,
    connect,
    connect_async,
)

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "ConnectionLostError",
    "DeviceError",
    "DoorbellUnavailableError",
    "Endpoint",
    "HandshakeTimeoutError",
    "IvshmemError",
    "PciEndpoint",
    "Peer",
    "PeersUnknownError",
    "ProtocolError",
    "Reconnected",
    "RegionEndpoint",
    "ServerConfigError",
    "ServerUnavailableError",
    "SharedMemory",
    "UnknownPeerError",
    "UnknownVectorError",
    "UsageError",
    "__version__",
    "connect",
    "connect_async",
    "open_pci",
    "open_region",
    "parse_size",
]

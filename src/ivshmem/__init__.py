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

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "ConnectionLostError",
    "DeviceError",
    "DoorbellUnavailableError",
    "Endpoint",
    "IvshmemError",
    "PeersUnknownError",
    "ProtocolError",
    "RegionEndpoint",
    "ServerConfigError",
    "SharedMemory",
    "UnknownPeerError",
    "UnknownVectorError",
    "UsageError",
    "__version__",
    "open_region",
    "parse_size",
]

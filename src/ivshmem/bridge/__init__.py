"""Channels across hosts: ``ivshmem bridge`` relays chosen channels over Zenoh.

``core`` holds the relay's state machines without any I/O (frames, sequence numbers, the
credit window, resends); ``config`` the routes, key names and Zenoh's pass-through settings
(flags or TOML); ``relay`` the process around them (one local endpoint, one Zenoh session, a
thread per route). See docs/bridge.md.
"""

from __future__ import annotations

from .config import BridgeConfig, ConfigError, InRoute, OutRoute, ZenohOptions, load_toml

__all__ = ["BridgeConfig", "ConfigError", "InRoute", "OutRoute", "ZenohOptions", "load_toml"]

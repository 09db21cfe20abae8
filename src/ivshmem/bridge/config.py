"""What a bridge relays and how it reaches Zenoh: from CLI flags or a small TOML file.

Key expressions. A stream is named by the *site* that sends it and the channel name:
``<prefix>/<site>/<channel>/data`` carries its messages and ``.../ack`` the receiving
bridge's acknowledgements. So on site ``a``, ``--out frames:3`` (read channel ``frames`` that
local peer 3 sends to the bridge) publishes ``ivshmem/a/frames/data``; on site ``b``,
``--in a/frames:5`` delivers that stream into channel ``frames`` to local peer 5. The way back
is another stream: ``--out frames:5`` on ``b`` and ``--in b/frames:3`` on ``a``.

TOML (every key optional except ``site`` and at least one route)::

    site = "a"
    prefix = "ivshmem"            # first chunk of every key
    socket = "/tmp/ivshmem_socket"  # or: region = "/dev/shm/x" and id = 7 (a plain region)
    on_remote_lost = "wait"       # or "error": close the local end so its sender gets an error
    window_messages = 1024
    window_bytes = "8M"
    capacity = "64K"              # ring size of the channels the bridge creates (out routes)
    spin = 50e-6                  # seconds the bridge's channel ends spin before sleeping
    server_timeout = 60.0         # give up (exit 3) if the local server stays away this long;
                                  # absent: reconnect for as long as it takes
    id_file = "/run/ivshmem-bridge-a.id"  # the bridge's current peer id, rewritten on reconnect

    [zenoh]
    mode = "peer"                 # peer, client or router
    listen = ["tcp/0.0.0.0:7447"]
    connect = ["tcp/hostb:7447"]
    scouting = false              # multicast scouting
    config = "zenoh.json5"        # a whole Zenoh configuration file, applied first

    [[out]]
    channel = "frames"
    peer = 3                      # the local sender
    policy = "block"              # or "drop": never wait for the remote, drop instead

    [[in]]
    site = "b"
    channel = "frames"
    peer = 3                      # the local receiver
    local_channel = "frames"      # the name it has here (default: the same)
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..channel.channel import DEFAULT_CAPACITY, DEFAULT_SPIN
from ..channel.layout import CHANNEL_NAME_MAX
from ..errors import UsageError
from ..memory import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DEFAULT_PREFIX",
    "BridgeConfig",
    "ConfigError",
    "InRoute",
    "OutRoute",
    "ZenohOptions",
    "load_toml",
    "parse_in",
    "parse_out",
]

DEFAULT_PREFIX = "ivshmem"
DEFAULT_WINDOW_MESSAGES = 1024
DEFAULT_WINDOW_BYTES = 8 << 20
# A key chunk: no separators or wildcards of Zenoh's key-expression language, no spaces.
_CHUNK = re.compile(r"[A-Za-z0-9_.\-]+")
_MODES = ("peer", "client", "router")

# Zenoh settings a bridge starts from, unless its Zenoh configuration file sets them itself. A
# bridge is a relay that streams: Zenoh's defaults (two 64 KiB batches queued per priority,
# a 64 KiB receive buffer) make the publishing thread and Zenoh's sending thread, and the
# receiving side's reads, take turns batch by batch, a sleep and a wake-up each time; with a
# deeper queue and a larger receive buffer they each work through many batches per wake-up
# (measured in docs/bridge.md: about 1.5x the bridged throughput at 4 KiB and 1 MiB here).
# The same values suit raw Zenoh; the benchmark gives them to both.
ZENOH_TUNING: tuple[tuple[str, str], ...] = (
    ("transport/link/tx/queue/size/data", "16"),
    ("transport/link/rx/buffer_size", "1048576"),
)


class ConfigError(UsageError):
    """A bridge configuration that cannot work; the message says what to change."""


def _chunk(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _CHUNK.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} cannot be part of a Zenoh key: use letters, digits, '_', '-', '.'"
        )
    return value


def _channel(value: Any, what: str = "channel") -> str:
    name = _chunk(value, what)
    if len(name.encode()) > CHANNEL_NAME_MAX:
        raise ConfigError(f"{what} {name!r} is longer than {CHANNEL_NAME_MAX} bytes")
    return name


def _peer(value: Any, what: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{what} {value!r} is not a peer id (0..65535)")
    return value


@dataclass(frozen=True)
class OutRoute:
    """Local channel ``channel`` from local peer ``peer`` to the bridge, published remotely."""

    channel: str
    peer: int
    policy: str = "block"

    def __post_init__(self) -> None:
        _channel(self.channel)
        _peer(self.peer, f"--out {self.channel}: peer")
        if self.policy not in ("block", "drop"):
            raise ConfigError(f"policy {self.policy!r} of {self.channel!r}: 'block' or 'drop'")


@dataclass(frozen=True)
class InRoute:
    """Stream ``channel`` of site ``site``, delivered into ``local_channel`` to local peer
    ``peer``."""

    site: str
    channel: str
    peer: int
    local_channel: str = ""

    def __post_init__(self) -> None:
        _chunk(self.site, "site")
        _channel(self.channel)
        _peer(self.peer, f"--in {self.site}/{self.channel}: peer")
        if not self.local_channel:
            object.__setattr__(self, "local_channel", self.channel)
        _channel(self.local_channel, "local_channel")


def parse_out(text: str) -> OutRoute:
    """``CHANNEL:PEER[:drop]`` from ``--out``."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"--out {text!r}: expected CHANNEL:PEER or CHANNEL:PEER:drop")
    policy = parts[2] if len(parts) == 3 else "block"
    return OutRoute(parts[0], _peer(parts[1], f"--out {text!r}: peer"), policy)


def parse_in(text: str) -> InRoute:
    """``SITE/CHANNEL:PEER[:LOCAL_CHANNEL]`` from ``--in``."""
    head, _, rest = text.partition(":")
    site, slash, channel = head.partition("/")
    if not slash or not rest:
        raise ConfigError(f"--in {text!r}: expected SITE/CHANNEL:PEER[:LOCAL_CHANNEL]")
    peer, _, local = rest.partition(":")
    return InRoute(site, channel, _peer(peer, f"--in {text!r}: peer"), local)


@dataclass
class ZenohOptions:
    """What passes through to Zenoh's own configuration."""

    mode: str = "peer"
    listen: list[str] = field(default_factory=list)
    connect: list[str] = field(default_factory=list)
    scouting: bool = False
    config_file: str | None = None
    shared_memory: bool = False

    def check(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"zenoh mode {self.mode!r}: one of {', '.join(_MODES)}")
        for e in (*self.listen, *self.connect):
            if not isinstance(e, str) or "/" not in e:
                raise ConfigError(f"Zenoh endpoint {e!r}: expected PROTO/ADDRESS (tcp/host:7447)")
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise ConfigError(f"Zenoh configuration file {self.config_file!r} does not exist")

    def entries(self) -> list[tuple[str, str]]:
        """(key, JSON5 value) pairs for ``zenoh.Config.insert_json5``. Scouting off means
        both multicast and gossip: with it off, Zenoh talks only to the listed endpoints.
        Zenoh's shared-memory transport is off unless asked for: a bridge exists to leave
        the host, and it leaves ``*.zenoh`` objects in /dev/shm behind."""
        return [
            ("mode", json.dumps(self.mode)),
            ("listen/endpoints", json.dumps(self.listen)),
            ("connect/endpoints", json.dumps(self.connect)),
            ("scouting/multicast/enabled", json.dumps(self.scouting)),
            ("scouting/gossip/enabled", json.dumps(self.scouting)),
            ("transport/shared_memory/enabled", json.dumps(self.shared_memory)),
        ]


@dataclass
class BridgeConfig:
    site: str
    outs: list[OutRoute] = field(default_factory=list)
    ins: list[InRoute] = field(default_factory=list)
    prefix: str = DEFAULT_PREFIX
    socket: str | None = None
    region: str | None = None
    region_id: int | None = None
    on_remote_lost: str = "wait"
    remote_timeout: float = 3.0
    keepalive: float = 0.2
    window_messages: int = DEFAULT_WINDOW_MESSAGES
    window_bytes: int = DEFAULT_WINDOW_BYTES
    capacity: int = DEFAULT_CAPACITY
    spin: float = DEFAULT_SPIN
    server_timeout: float | None = None  # None: reconnect to the local server forever
    id_file: str | None = None
    zenoh: ZenohOptions = field(default_factory=ZenohOptions)

    def check(self) -> None:
        _chunk(self.site, "site")
        for chunk in self.prefix.split("/"):
            _chunk(chunk, "prefix")
        if not self.outs and not self.ins:
            raise ConfigError("nothing to relay: give at least one --out or --in route")
        if (self.socket is None) == (self.region is None):
            raise ConfigError("give the local side: --socket PATH (a server) or --region PATH")
        if self.region is not None and self.region_id is None:
            raise ConfigError("--region needs --id N: the bridge's peer id in the region")
        if self.on_remote_lost not in ("wait", "error"):
            raise ConfigError(f"on_remote_lost {self.on_remote_lost!r}: 'wait' or 'error'")
        if self.server_timeout is not None:
            if self.region is not None:
                raise ConfigError("server_timeout needs --socket: a plain region has no server")
            if not 0 <= self.server_timeout < float("inf"):
                raise ConfigError(
                    f"server_timeout {self.server_timeout}: seconds, 0 or more (leave it out "
                    "to wait for the server as long as it takes)"
                )
        if self.id_file == "":
            raise ConfigError("id_file is empty: give a path, or leave it out")
        if not 0 <= self.spin <= 1:
            raise ConfigError(f"spin {self.spin}: 0..1 seconds")
        if not 0 < self.keepalive < self.remote_timeout:
            raise ConfigError("keepalive must be positive and shorter than remote_timeout")
        if not 0 < self.window_messages <= 1 << 20:
            raise ConfigError(f"window_messages {self.window_messages}: 1..{1 << 20}")
        if self.capacity < 1 << 12 or self.capacity & (self.capacity - 1):
            raise ConfigError(f"capacity {self.capacity}: a power of two, at least 4K")
        if not 1 << 10 <= self.window_bytes <= 1 << 34:
            raise ConfigError(f"window_bytes {self.window_bytes}: 1 KiB..16 GiB")
        seen: set[tuple[str, ...]] = set()
        for r in self.outs:
            if ("out", r.channel) in seen:
                raise ConfigError(f"channel {r.channel!r} is sent out twice")
            seen.add(("out", r.channel))
        for i in self.ins:
            key = ("in", i.local_channel, str(i.peer))
            if key in seen:
                raise ConfigError(f"two routes deliver channel {i.local_channel!r} to {i.peer}")
            seen.add(key)
        self.zenoh.check()

    def data_key(self, site: str, channel: str) -> str:
        return f"{self.prefix}/{site}/{channel}/data"

    def ack_key(self, site: str, channel: str) -> str:
        return f"{self.prefix}/{site}/{channel}/ack"


_TOP = {
    "site", "prefix", "socket", "region", "id", "on_remote_lost", "remote_timeout",
    "keepalive", "window_messages", "window_bytes", "capacity", "spin", "zenoh", "out", "in",
    "server_timeout", "id_file",
}  # fmt: skip
_ZENOH = {"mode", "listen", "connect", "scouting", "config", "shared_memory"}


def load_toml(path: str | Path) -> BridgeConfig:
    """A configuration from a TOML file (see this module's docstring); ConfigError names
    the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    try:
        return _from_doc(doc)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


def _from_doc(doc: dict[str, Any]) -> BridgeConfig:
    unknown = set(doc) - _TOP
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} (known: {sorted(_TOP)})")
    z = doc.get("zenoh", {})
    if not isinstance(z, dict) or set(z) - _ZENOH:
        raise ConfigError(f"[zenoh] takes only {sorted(_ZENOH)}")
    zopts = ZenohOptions(
        mode=z.get("mode", "peer"),
        listen=list(z.get("listen", [])),
        connect=list(z.get("connect", [])),
        scouting=bool(z.get("scouting", False)),
        config_file=z.get("config"),
        shared_memory=bool(z.get("shared_memory", False)),
    )
    outs = []
    for r in doc.get("out", []):
        if not isinstance(r, dict) or set(r) - {"channel", "peer", "policy"}:
            raise ConfigError(f"[[out]] takes channel, peer, policy: {r!r}")
        outs.append(OutRoute(r.get("channel", ""), _peer(r.get("peer"), "[[out]] peer"),
                             r.get("policy", "block")))  # fmt: skip
    ins = []
    for r in doc.get("in", []):
        if not isinstance(r, dict) or set(r) - {"site", "channel", "peer", "local_channel"}:
            raise ConfigError(f"[[in]] takes site, channel, peer, local_channel: {r!r}")
        peer = _peer(r.get("peer"), "[[in]] peer")
        local = r.get("local_channel", "")
        ins.append(InRoute(r.get("site", ""), r.get("channel", ""), peer, local))
    wb = doc.get("window_bytes", DEFAULT_WINDOW_BYTES)
    cap = doc.get("capacity", DEFAULT_CAPACITY)
    st = doc.get("server_timeout")
    return BridgeConfig(
        site=doc.get("site", ""),
        outs=outs,
        ins=ins,
        prefix=doc.get("prefix", DEFAULT_PREFIX),
        socket=doc.get("socket"),
        region=doc.get("region"),
        region_id=None if doc.get("id") is None else _peer(doc.get("id"), "id"),
        on_remote_lost=doc.get("on_remote_lost", "wait"),
        remote_timeout=float(doc.get("remote_timeout", 3.0)),
        keepalive=float(doc.get("keepalive", 0.2)),
        window_messages=int(doc.get("window_messages", DEFAULT_WINDOW_MESSAGES)),
        window_bytes=parse_size(wb),
        capacity=parse_size(cap),
        spin=float(doc.get("spin", DEFAULT_SPIN)),
        server_timeout=None if st is None else float(st),
        id_file=None if doc.get("id_file") is None else str(doc["id_file"]),
        zenoh=zopts,
    )

"""This project's extension of the ivshmem register block, read by the guest driver.

The vfio-user device (``ivshmem.device``) answers at BAR0 offsets QEMU's device leaves at 0:
a magic number, feature bits, the peers connected (count, a generation, and the ids through a
select/read window), the membership events accumulated since the last read, the vector those
events ring and the state of its server connection. :mod:`ivshmem.registers` defines them;
this module turns them into answers: :func:`probe` (is it our device, what does it offer)
and :func:`read_membership` (a consistent snapshot).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from .. import registers as reg
from ..errors import DeviceError
from ._mmio import Registers

__all__ = [
    "DeviceStatus",
    "Extension",
    "Membership",
    "MembershipEvent",
    "ServerState",
    "feature_names",
    "probe",
    "read_membership",
    "read_status",
    "server_state",
]

#: The smallest BAR0 that holds the extension (up to and including ServerState).
EXTENSION_SIZE = reg.SERVER_STATE + 4

#: ``"plain"``: a region without a server (no doorbells); ``"connected"``: doorbells work;
#: ``"reconnecting"``: the server went away, the device is trying to reach it again (memory
#: still works, doorbells do not).
ServerState = Literal["plain", "connected", "reconnecting"]

_STATES: dict[int, ServerState] = {
    reg.SERVER_PLAIN: "plain",
    reg.SERVER_CONNECTED: "connected",
    reg.SERVER_RECONNECTING: "reconnecting",
}

# A snapshot that keeps changing under the reader this many times in a row is an error: the
# membership cannot change that fast for long (each change is a server round trip).
_MAX_TRIES = 50


class MembershipEvent(enum.IntFlag):
    """What happened since the Events register was last read (it clears on read)."""

    NONE = 0
    JOINED = reg.EVENT_JOINED
    LEFT = reg.EVENT_LEFT
    #: A new server connection: ids may have changed (the endpoint re-reads IVPosition).
    RECONNECTED = reg.EVENT_RECONNECTED
    #: The server went away; doorbells are dead until RECONNECTED.
    SERVER_LOST = reg.EVENT_SERVER_LOST


@dataclass(frozen=True)
class Extension:
    """What the device said about itself when it was opened."""

    features: int
    #: The vector membership events ring; None when they ring none.
    event_vector: int | None

    @property
    def membership(self) -> bool:
        return bool(self.features & reg.FEATURE_MEMBERSHIP)

    @property
    def membership_irq(self) -> bool:
        return bool(self.features & reg.FEATURE_MEMBERSHIP_IRQ) and self.event_vector is not None

    @property
    def intx(self) -> bool:
        return bool(self.features & reg.FEATURE_INTX)

    @property
    def reconnect(self) -> bool:
        return bool(self.features & reg.FEATURE_RECONNECT)

    @property
    def server(self) -> bool:
        return bool(self.features & reg.FEATURE_SERVER)


#: ExtFeatures bits by the names ``ivshmem info`` prints.
FEATURE_NAMES = (
    (reg.FEATURE_MEMBERSHIP, "membership"),
    (reg.FEATURE_MEMBERSHIP_IRQ, "membership-irq"),
    (reg.FEATURE_INTX, "intx"),
    (reg.FEATURE_RECONNECT, "reconnect"),
    (reg.FEATURE_SERVER, "server"),
)


def feature_names(features: int) -> list[str]:
    """The names of the bits set in ``features`` (an unknown bit as ``bit N``)."""
    names = [name for bit, name in FEATURE_NAMES if features & bit]
    known = 0
    for bit, _ in FEATURE_NAMES:
        known |= bit
    names += [f"bit {n}" for n in range(32) if features & ~known & (1 << n)]
    return names


@dataclass(frozen=True)
class DeviceStatus:
    """This project's device as its registers show it at one moment (``ivshmem info``)."""

    extension: Extension
    #: Other peers connected now, and the membership generation; None without MEMBERSHIP.
    peer_count: int | None
    generation: int | None
    server_state: ServerState


@dataclass(frozen=True)
class Membership:
    """A consistent view of the peers, as the device's registers showed it."""

    #: Changes on every join, leave and server (re)connection.
    generation: int
    #: The other peers' ids (not this device's own).
    peers: frozenset[int]
    server_state: ServerState


def probe(registers: Registers, bar0_size: int) -> Extension | None:
    """The device's extension, or None for QEMU's device (ExtMagic reads 0 there) or a BAR0
    too small to hold it."""
    if bar0_size < EXTENSION_SIZE:
        return None
    if registers.read32(reg.EXT_MAGIC) != reg.EXT_MAGIC_VALUE:
        return None
    features = registers.read32(reg.EXT_FEATURES)
    vector = registers.read32(reg.EVENT_VECTOR)
    return Extension(features, None if vector == reg.NO_VECTOR else vector)


def read_status(registers: Registers, bar0_size: int) -> DeviceStatus | None:
    """What the extension says now, or None for QEMU's device."""
    extension = probe(registers, bar0_size)
    if extension is None:
        return None
    count = generation = None
    if extension.membership:
        count = registers.read32(reg.PEER_COUNT)
        generation = registers.read32(reg.GENERATION)
        if count > 0xFFFF:
            raise DeviceError(
                f"PeerCount reads {count:#x}, more peers than ids exist (0..65535): BAR0 is not "
                "answering (0xffffffff means the device process is gone)"
            )
    return DeviceStatus(extension, count, generation, server_state(registers))


def server_state(registers: Registers) -> ServerState:
    value = registers.read32(reg.SERVER_STATE)
    state = _STATES.get(value)
    if state is None:
        raise DeviceError(
            f"the device's ServerState register reads {value:#x}, which is none of the known "
            "states (0 plain, 1 connected, 2 reconnecting): is the device newer than this driver?"
        )
    return state


def read_membership(registers: Registers, what: str = "the device") -> Membership:
    """Read the peers through PeerSelect/PeerAt, between two reads of Generation; start over
    while Generation changed (a join or leave happened meanwhile) or the list was torn.

    PeerSelect is one register shared by everything in the guest that reads the list: two
    readers at once may see each other's index. The sorted-order and end-marker checks
    below catch what such a race tears, and the read starts over.
    """
    for _ in range(_MAX_TRIES):
        generation = registers.read32(reg.GENERATION)
        count = registers.read32(reg.PEER_COUNT)
        if count > 0xFFFF:
            raise DeviceError(
                f"{what}: PeerCount reads {count:#x}, more peers than ids exist (0..65535): "
                "BAR0 is not answering (0xffffffff means the device process is gone)"
            )
        ids: list[int] = []
        torn = False
        for index in range(count):
            registers.write32(reg.PEER_SELECT, index)
            peer = registers.read32(reg.PEER_AT)
            if peer > 0xFFFF or (ids and peer <= ids[-1]):
                torn = True  # past the end (a leave shrank the list) or out of order
                break
            ids.append(peer)
        state = server_state(registers)
        if not torn and registers.read32(reg.GENERATION) == generation:
            return Membership(generation, frozenset(ids), state)
    raise DeviceError(
        f"{what}: the membership registers kept changing while being read ({_MAX_TRIES} tries): "
        "another program in this guest may be reading them at the same time"
    )

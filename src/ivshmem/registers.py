"""The ivshmem device's BAR0 register block: QEMU's four registers and this project's extension.

One definition, shared by the guest driver (``ivshmem.pci``) and the device this project serves
over vfio-user (``ivshmem.device``). All registers are 32-bit, little-endian.

QEMU's device (hw/misc/ivshmem-pci.c) decodes the first four and answers 0 to reads of any
other offset, so a guest tells the two devices apart by :data:`EXT_MAGIC`: it reads
``EXT_MAGIC_VALUE`` on this project's device and 0 on QEMU's.

====== ============== ====== ===========================================================
offset name           access use
====== ============== ====== ===========================================================
0x00   IntrMask       rw     legacy INTx: which IntrStatus bits raise the interrupt
0x04   IntrStatus     r (rc) legacy INTx: set by a ring; reading clears it
0x08   IVPosition     r      this device's peer id (changes only after a server restart)
0x0C   Doorbell       w      ``peer << 16 | vector`` rings ``vector`` of ``peer``
0x10   ExtMagic       r      ``EXT_MAGIC_VALUE`` on this project's device (0 on QEMU's)
0x14   ExtFeatures    r      ``FEATURE_*`` bits
0x18   PeerCount      r      how many other peers are connected (as ``Endpoint.peers``)
0x1C   Generation     r      changes on every join, leave and server (re)connection
0x20   PeerSelect     rw     index into the sorted list of other peers' ids
0x24   PeerAt         r      id at index PeerSelect; ``NO_PEER`` past the end
0x28   EventVector    r      vector rung on membership events; ``NO_VECTOR`` when none
0x2C   Events         r (rc) ``EVENT_*`` bits accumulated since the last read; reading clears
0x30   ServerState    r      ``SERVER_*``: plain region, connected, or reconnecting
====== ============== ====== ===========================================================

A consistent membership snapshot: read Generation, then PeerCount and the ids, then
Generation again, and start over if it changed.
"""

from __future__ import annotations

__all__ = [
    "DOORBELL",
    "EVENTS",
    "EVENT_JOINED",
    "EVENT_LEFT",
    "EVENT_RECONNECTED",
    "EVENT_REGION_CHANGED",
    "EVENT_SERVER_LOST",
    "EVENT_VECTOR",
    "EXT_FEATURES",
    "EXT_MAGIC",
    "EXT_MAGIC_VALUE",
    "FEATURE_INTX",
    "FEATURE_MEMBERSHIP",
    "FEATURE_MEMBERSHIP_IRQ",
    "FEATURE_RECONNECT",
    "FEATURE_SERVER",
    "GENERATION",
    "INTRMASK",
    "INTRSTATUS",
    "IVPOSITION",
    "NO_PEER",
    "NO_VECTOR",
    "PEER_AT",
    "PEER_COUNT",
    "PEER_SELECT",
    "SERVER_CONNECTED",
    "SERVER_PLAIN",
    "SERVER_RECONNECTING",
    "SERVER_STATE",
]

# QEMU's registers.
INTRMASK = 0x00
INTRSTATUS = 0x04
IVPOSITION = 0x08
DOORBELL = 0x0C

# This project's extension (QEMU's device reads 0 at every one of these offsets).
EXT_MAGIC = 0x10
EXT_FEATURES = 0x14
PEER_COUNT = 0x18
GENERATION = 0x1C
PEER_SELECT = 0x20
PEER_AT = 0x24
EVENT_VECTOR = 0x28
EVENTS = 0x2C
SERVER_STATE = 0x30

#: The bytes "IVPY" in memory order.
EXT_MAGIC_VALUE = 0x59505649

FEATURE_MEMBERSHIP = 1 << 0  # PeerCount, Generation, PeerSelect and PeerAt are valid
FEATURE_MEMBERSHIP_IRQ = 1 << 1  # membership events ring EventVector
FEATURE_INTX = 1 << 2  # the device runs in legacy INTx mode (IntrStatus/IntrMask, pin 1)
FEATURE_RECONNECT = 1 << 3  # the device reconnects to a restarted server
FEATURE_SERVER = 1 << 4  # doorbell mode: a server hands out ids and doorbells

EVENT_JOINED = 1 << 0
EVENT_LEFT = 1 << 1
EVENT_RECONNECTED = 1 << 2  # a new server connection: ids may have changed, re-read IVPosition
EVENT_SERVER_LOST = 1 << 3  # the server went away; doorbells are dead until it is back
#: The restarted server shares other memory than BAR2 (a memfd server starts over): the
#: guest keeps its old BAR2, which nobody else sees any more.
EVENT_REGION_CHANGED = 1 << 4

SERVER_PLAIN = 0
SERVER_CONNECTED = 1
SERVER_RECONNECTING = 2

NO_PEER = 0xFFFFFFFF
NO_VECTOR = 0xFFFFFFFF

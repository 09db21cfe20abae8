"""The relay's state machines, sans-IO: frames in and out, no Zenoh, no threads, no clock.

One bridged channel is a *stream* from the bridge that reads it locally (the *sending*
bridge, :class:`Outbound`) to the bridge that delivers it locally (the *receiving* bridge,
:class:`Inbound`). Zenoh carries two keys per stream (see ``config.py`` for their names):

* ``.../data`` (sending -> receiving): ``DATA`` frames (a batch of messages with the sequence
  number of the first) and ``RESUME`` frames ("my epoch is E; I (re)send from sequence S").
* ``.../ack`` (receiving -> sending): ``ACK`` frames ("of epoch E, everything below D is in
  my local ring, everything below R has reached me") and ``HELLO`` ("I know no epoch: tell me
  where to resume").

Every frame's header travels as the Zenoh *attachment*; a DATA frame's payload is its
messages back to back (so a batch of one is put as the message's own bytes, never copied
into a bigger buffer). Header (little-endian)::

    magic "IVB1" | kind u8 | 3 zero bytes | epoch u64 | a u64 | b u64 | count u32 | count x u32

``a`` is the first sequence number (DATA, RESUME) or delivered (ACK); ``b`` is received
(ACK), 1 in a DATA frame whose sender wants an ACK as soon as it is delivered, 0 elsewhere;
``count`` and the lengths exist in DATA frames only.

**Acknowledgements are lazy.** The receiving bridge acknowledges every ``keepalive`` seconds
and at once only when a DATA frame asks (its sender has half its window outstanding): a
stream that flows freely costs no ACK per frame, and no wake-up of either bridge's thread on
the round trip's path.

**Why these rules give order, once, and backpressure.** The epoch is a random number drawn
when a sending bridge starts, so a restarted sender is told apart from late frames of the
old one. Zenoh delivers one publisher's frames reliably and in order while the link holds;
the receiving bridge accepts a DATA frame only when its first sequence number is at most
``received`` and drops the prefix it already has (a resend), so nothing is queued twice and
nothing out of order: a frame that starts beyond ``received`` means frames were lost (the
link broke) and is dropped, and a HELLO asks for a resend. The sending bridge keeps every
message until an ACK says it is in the remote ring, and reads no more from its local ring
while ``window_messages``/``window_bytes`` are outstanding: the local ring then fills and
the local sender waits, which is how a slow remote receiver slows the local sender. A
receiving bridge queues at most its own window (a frame that would overflow it is dropped
unacknowledged and comes again), so no queue anywhere grows without bound.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "HEADER",
    "KIND_ACK",
    "KIND_DATA",
    "KIND_HELLO",
    "KIND_RESUME",
    "MAGIC",
    "Ack",
    "Chunk",
    "Data",
    "FrameError",
    "Hello",
    "Inbound",
    "Message",
    "Outbound",
    "Resume",
    "decode",
    "encode_ack",
    "encode_data",
    "encode_hello",
    "encode_resume",
]

MAGIC = b"IVB1"
KIND_DATA = 1
KIND_RESUME = 2
KIND_ACK = 3
KIND_HELLO = 4
HEADER = struct.Struct("<4sB3xQQQ")  # magic, kind, epoch, a, b
_COUNT = struct.Struct("<I")
_U64 = (1 << 64) - 1
#: Most messages one DATA frame may carry (the receiving bridge refuses more).
MAX_BATCH = 1 << 16


class FrameError(ValueError):
    """A frame on a bridged key that is not one of ours or breaks the rules: refused."""


#: A message as the receiving bridge holds it: a slice of the frame it came in (no copy).
Message = bytes | memoryview


@dataclass(frozen=True)
class Data:
    epoch: int
    seq: int
    messages: Sequence[Message]
    ack: bool = False


@dataclass(frozen=True)
class Resume:
    epoch: int
    seq: int


@dataclass(frozen=True)
class Ack:
    epoch: int
    delivered: int
    received: int


@dataclass(frozen=True)
class Hello:
    pass


Frame = Data | Resume | Ack | Hello


def encode_data(epoch: int, seq: int, lengths: list[int], ack: bool = False) -> bytes:
    """The attachment of a DATA frame whose payload is messages of ``lengths`` back to back;
    ``ack`` asks for an ACK as soon as it is delivered."""
    n = len(lengths)
    return b"".join(
        (
            HEADER.pack(MAGIC, KIND_DATA, epoch, seq, int(ack)),
            _COUNT.pack(n),
            struct.pack(f"<{n}I", *lengths),
        )
    )


def encode_resume(epoch: int, seq: int) -> bytes:
    return HEADER.pack(MAGIC, KIND_RESUME, epoch, seq, 0)


def encode_ack(epoch: int, delivered: int, received: int) -> bytes:
    return HEADER.pack(MAGIC, KIND_ACK, epoch, delivered, received)


def encode_hello() -> bytes:
    return HEADER.pack(MAGIC, KIND_HELLO, 0, 0, 0)


def decode(attachment: bytes | None, payload: bytes, max_message: int) -> Frame:
    """One frame from what Zenoh delivered; FrameError says what is wrong with a foreign or
    malformed one. ``max_message`` is the largest message the local ring can take."""
    if attachment is None:
        raise FrameError(f"no ivshmem-bridge header ({len(payload)} bytes without attachment)")
    if len(attachment) < HEADER.size:
        raise FrameError(f"header of {len(attachment)} bytes, shorter than {HEADER.size}")
    magic, kind, epoch, a, b = HEADER.unpack_from(attachment)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r}): not an ivshmem bridge")
    if kind == KIND_DATA:
        return _decode_data(attachment, payload, epoch, a, b, max_message)
    if len(attachment) != HEADER.size or payload:
        raise FrameError(f"control frame of kind {kind} with extra bytes")
    if kind == KIND_RESUME:
        return Resume(epoch, a)
    if kind == KIND_ACK:
        if a > b:
            raise FrameError(f"ACK says delivered {a} but received only {b}")
        return Ack(epoch, a, b)
    if kind == KIND_HELLO:
        return Hello()
    raise FrameError(f"unknown frame kind {kind}")


def _decode_data(
    attachment: bytes, payload: bytes, epoch: int, seq: int, b: int, max_message: int
) -> Data:
    end = HEADER.size + _COUNT.size
    if len(attachment) < end or b > 1:
        raise FrameError("DATA header truncated or with a bad ACK request field")
    (n,) = _COUNT.unpack_from(attachment, HEADER.size)
    if not 0 < n <= MAX_BATCH:
        raise FrameError(f"DATA frame with {n} messages (1..{MAX_BATCH})")
    if len(attachment) != end + 4 * n:
        raise FrameError(f"DATA header of {len(attachment)} bytes does not hold {n} lengths")
    if seq + n > _U64:
        raise FrameError(f"sequence {seq} + {n} overflows")
    lengths = struct.unpack_from(f"<{n}I", attachment, end)
    if sum(lengths) != len(payload):
        raise FrameError(f"lengths add up to {sum(lengths)}, payload has {len(payload)} bytes")
    if max(lengths) > max_message:
        raise FrameError(f"a message of {max(lengths)} bytes; the local ring takes {max_message}")
    if n == 1:
        return Data(epoch, seq, [payload], bool(b))
    view = memoryview(payload)
    out: list[Message] = []
    at = 0
    for length in lengths:
        out.append(view[at : at + length])
        at += length
    return Data(epoch, seq, out, bool(b))


class Outbound:
    """The sending bridge's side of one stream: sequence numbers, the window of messages not
    yet acknowledged, what to resend. The caller reads the local ring only ``credit()``
    messages at a time and publishes what :meth:`take` and :meth:`resend` return."""

    def __init__(self, epoch: int, window_messages: int, window_bytes: int) -> None:
        if not 0 < epoch <= _U64:
            raise ValueError(f"epoch {epoch} out of range")
        self.epoch = epoch
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.next_seq = 0  # the sequence number the next message gets
        self.acked = 0  # every message below this is in the remote ring
        self._unacked: deque[bytes] = deque()  # messages acked .. next_seq - 1
        self.unacked_bytes = 0
        self.dropped = 0  # messages dropped by the drop policy (counted by the caller)
        self.remote_received = 0  # the last ACK's "received"

    def wants_ack(self) -> bool:
        """Whether the next frame should ask for an ACK: half the window is outstanding."""
        return (
            len(self._unacked) * 2 >= self.window_messages
            or self.unacked_bytes * 2 >= self.window_bytes
        )

    def credit(self) -> int:
        """How many messages may be read from the local ring now (0: the window is full)."""
        if self.unacked_bytes >= self.window_bytes:
            return 0
        return max(0, self.window_messages - len(self._unacked))

    def take(self, messages: list[bytes]) -> int:
        """Number ``messages`` (read from the local ring) and keep them until acknowledged;
        returns the first one's sequence number."""
        seq = self.next_seq
        self._unacked.extend(messages)
        self.unacked_bytes += sum(map(len, messages))
        self.next_seq += len(messages)
        return seq

    def on_ack(self, ack: Ack) -> bool:
        """Apply an ACK; True if the window opened. FrameError if it cannot be ours."""
        if ack.epoch != self.epoch:
            return False  # for an earlier run of this bridge: harmless, ignored
        if ack.received > self.next_seq:
            raise FrameError(f"ACK for {ack.received} messages, but only {self.next_seq} were sent")
        self.remote_received = ack.received
        freed = ack.delivered - self.acked
        if freed <= 0:
            return False
        for _ in range(freed):
            self.unacked_bytes -= len(self._unacked.popleft())
        self.acked = ack.delivered
        return True

    def resend(self, start: int | None = None) -> tuple[int, list[bytes]]:
        """What to publish again (after a HELLO, or when the remote stopped receiving): the
        sequence number to resume from and every kept message from there on. ``start``
        defaults to the oldest message not acknowledged."""
        begin = self.acked if start is None else max(self.acked, min(start, self.next_seq))
        skip = begin - self.acked
        return begin, [m for i, m in enumerate(self._unacked) if i >= skip]

    @property
    def outstanding(self) -> int:
        return len(self._unacked)


#: A run of consecutive messages of one epoch, as queued by the receiving bridge: (epoch,
#: sequence number of the first, the messages). Queued and delivered whole (the ring's batch
#: path), so the per-message work in Python is one list entry.
Chunk = tuple[int, int, list[Message]]


class Inbound:
    """The receiving bridge's side of one stream: which sender epoch it follows, what has
    been received and delivered, and the bounded queue between the two."""

    def __init__(self, window_messages: int, window_bytes: int) -> None:
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.epoch: int | None = None
        self.received = 0  # messages of this epoch that reached the queue
        self.delivered = 0  # of those, how many are in the local ring
        self.queue: deque[Chunk] = deque()
        self.queued_messages = 0
        self.queued_bytes = 0
        self.duplicates = 0

    def on_resume(self, resume: Resume) -> None:
        """The sender says where it (re)starts. A new epoch resets the counters: what the old
        epoch left in the queue is still delivered (in order, before the new messages), but
        acknowledged to nobody."""
        if resume.epoch == 0:
            raise FrameError("RESUME with epoch 0")
        if resume.epoch != self.epoch:
            self.epoch = resume.epoch
            self.received = self.delivered = resume.seq
        elif resume.seq > self.received:
            # The sender forgot nothing it kept, so it cannot resume beyond what we have.
            raise FrameError(f"RESUME at {resume.seq}, beyond the {self.received} received")

    def on_data(self, data: Data) -> tuple[int, bool]:
        """Queue what is new in ``data``. Returns (messages queued, whether to ask the sender
        for a RESUME: its epoch is unknown here, or frames were lost before this one)."""
        if self.epoch is None or data.epoch != self.epoch:
            return 0, True
        if data.seq > self.received:
            return 0, True  # a gap: frames lost on the way; the sender resends
        skip = self.received - data.seq
        fresh = list(data.messages[skip:])
        if not fresh:
            self.duplicates += len(data.messages)
            return 0, False
        size = sum(map(len, fresh))
        if self.queue and (
            self.queued_messages + len(fresh) > self.window_messages
            or self.queued_bytes + size > self.window_bytes
        ):
            return 0, False  # beyond our window: not received, so resent later
        self.duplicates += skip
        self.queue.append((self.epoch, self.received, fresh))
        self.queued_messages += len(fresh)
        self.queued_bytes += size
        self.received += len(fresh)
        return len(fresh), False

    def take(self, limit: int) -> list[Chunk]:
        """Queued chunks, whole, up to about ``limit`` messages (at least one chunk), for
        delivery; what is not delivered goes back with :meth:`put_back`."""
        out: list[Chunk] = []
        n = 0
        while self.queue and (not out or n + len(self.queue[0][2]) <= limit):
            chunk = self.queue.popleft()
            out.append(chunk)
            n += len(chunk[2])
            self.queued_bytes -= sum(map(len, chunk[2]))
        self.queued_messages -= n
        return out

    def put_back(self, chunks: list[Chunk]) -> None:
        """Chunks (or their tails) taken but not delivered: first again."""
        for chunk in reversed(chunks):
            self.queue.appendleft(chunk)
            self.queued_messages += len(chunk[2])
            self.queued_bytes += sum(map(len, chunk[2]))

    def delivered_upto(self, epoch: int, seq: int) -> None:
        """Messages of ``epoch`` below ``seq`` are in the local ring."""
        if epoch == self.epoch and seq > self.delivered:
            self.delivered = seq

"""The bridge process: one local endpoint, one Zenoh session, one thread per route.

An *out* route owns a :class:`~ivshmem.channel.Receiver` for ``(channel, peer -> bridge)``
and an :class:`~ivshmem.bridge.core.Outbound`: it reads the ring only while the window has
room (so a full window leaves the local sender waiting on a full ring), numbers what it read
and publishes it as DATA frames; ACKs and HELLOs come back through a Zenoh subscriber
callback, which only updates the state and wakes the thread. An *in* route owns an
:class:`~ivshmem.bridge.core.Inbound` fed by the subscriber callback (which never blocks:
the queue is bounded by the window and frames beyond it are dropped unacknowledged) and a
thread that delivers the queue into a :class:`~ivshmem.channel.Sender` to the local peer,
acknowledges, and keeps the sending bridge informed every ``keepalive`` seconds (ACK, or
HELLO while it knows no epoch), also while the local receiver is slow.

Every publication is reliable with congestion control BLOCK: when the network is slower than
the local side, ``put`` waits, the window fills, the local sender waits. The only thing a
route ever drops is what its ``drop`` policy says (an out route whose window is full drops
what it reads instead of waiting), and frames refused as foreign or malformed (logged).

The local server going away is survived the way a host peer with ``reconnect=True`` survives
it: the endpoint reconnects (with back-off) and gets a new id, and every route drops its
local channel end as soon as the connection it was opened under is gone (peer ids may repeat
across a restart, so a route compares :meth:`Bridge.local_generation`, not ids) and opens a
new one once the server is back. The Zenoh side does not notice: an out route keeps its
window (resent and acknowledged as before), an in route keeps its queue (bounded by the
window, so the remote sender is slowed meanwhile) and delivers it into the new channel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from ..channel import Receiver, Sender
from ..channel.errors import ChannelTimeout
from ..endpoint import Endpoint, open_region
from ..errors import IvshmemError
from .config import ZENOH_TUNING, BridgeConfig, InRoute, OutRoute
from .core import (
    MAX_BATCH,
    Ack,
    Chunk,
    Data,
    Frame,
    FrameError,
    Hello,
    Inbound,
    Outbound,
    Resume,
    decode,
    encode_ack,
    encode_data,
    encode_hello,
    encode_resume,
)

__all__ = ["Bridge", "ServerLostError", "ZenohMissingError", "open_session"]

log = logging.getLogger("ivshmem.bridge")

_FRAME_BYTES = 60 << 10  # a DATA frame gathers messages up to about this many bytes
_OPEN_RETRY = 0.2
_READ_WAIT = 0.05  # longest a route waits in its ring before looking at its flags again
_NO_LIMIT = 1 << 31
_SERVER_CHECK = 0.2  # seconds between looks at the local server's socket


class ServerLostError(IvshmemError):
    """The local ivshmem server went away and did not come back within ``server_timeout``
    (or the endpoint cannot reconnect); the bridge stopped."""


class ZenohMissingError(IvshmemError):
    """eclipse-zenoh is not installed."""


def _zenoh() -> Any:
    try:
        import zenoh
    except ImportError:
        raise ZenohMissingError(
            "the bridge needs Zenoh: pip install 'ivshmem[bridge]' (eclipse-zenoh>=1,<2)"
        ) from None
    return zenoh


def _declare(session: Any, publish: str, subscribe: str, on_sample: Any) -> tuple[Any, Any]:
    """A route's two keys: a reliable publisher that blocks under congestion (so
    backpressure reaches the local ring), and a subscriber calling ``on_sample``."""
    zenoh = _zenoh()
    pub = session.declare_publisher(
        publish,
        congestion_control=zenoh.CongestionControl.BLOCK,
        reliability=zenoh.Reliability.RELIABLE,
    )
    return pub, session.declare_subscriber(subscribe, on_sample)


def _frame_of(sample: Any, max_message: int) -> Frame:
    """Decode a Zenoh sample (attachment: the header; payload: the data); FrameError if it is
    not one of ours."""
    attachment = sample.attachment
    return decode(
        None if attachment is None else attachment.to_bytes(),
        sample.payload.to_bytes(),
        max_message,
    )


def tuned(zc: Any, defaults: Any) -> list[tuple[str, str]]:
    """The bridge's Zenoh tuning (config.ZENOH_TUNING) for the settings that ``zc`` leaves at
    Zenoh's defaults: what a configuration file sets itself is kept."""
    return [(k, v) for k, v in ZENOH_TUNING if zc.get_json(k) == defaults.get_json(k)]


def open_session(config: BridgeConfig) -> Any:
    """A Zenoh session as the configuration says (its file first, then our settings)."""
    zenoh = _zenoh()
    z = config.zenoh
    try:
        zc = zenoh.Config.from_file(z.config_file) if z.config_file else zenoh.Config()
        for key, value in tuned(zc, zenoh.Config()):
            zc.insert_json5(key, value)
        for key, value in z.entries():
            zc.insert_json5(key, value)
        return zenoh.open(zc)
    except zenoh.ZError as err:
        raise IvshmemError(f"cannot open the Zenoh session: {err}") from err


class _Limited:
    """Log lines that a flood must not turn into a flood of lines: the first few each
    second, then a count."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self.second = 0
        self.count = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = int(time.monotonic())
        if now != self.second:
            if self.suppressed:
                log.warning("... %d more such lines suppressed", self.suppressed)
            self.second, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count <= self.per_second:
            log.warning(msg, *args)
        else:
            self.suppressed += 1


class _Route:
    def __init__(self, bridge: Bridge, name: str, vector: int | None) -> None:
        self.bridge = bridge
        self.name = name
        self.vector = vector
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.refused = 0
        self.error: BaseException | None = None
        self.last_open_failure = ""

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as err:  # reported by Bridge.wait
            log.exception("route %s failed", self.name)
            self.error = err
            self.bridge._stop.set()

    def run(self) -> None:
        raise NotImplementedError

    def note_open_failure(self, end: str, err: IvshmemError) -> None:
        """Opening the local end failed (the peer is not there yet, or the region cannot
        hold the channel): said once per distinct reason, retried meanwhile."""
        text = str(err)
        if text != self.last_open_failure:
            self.last_open_failure = text
            log.warning("%s: cannot open the %s end yet (retrying): %s", self.name, end, text)

    def refuse(self, key: str, err: FrameError) -> None:
        self.refused += 1
        self.bridge._limited.warning("refused a frame on %s: %s", key, err)

    @property
    def stopping(self) -> bool:
        return self.bridge._stop.is_set()


class _OutRoute(_Route):
    """Local ring -> Zenoh."""

    def __init__(self, bridge: Bridge, route: OutRoute, vector: int | None) -> None:
        super().__init__(bridge, f"out:{route.channel}<-{route.peer}", vector)
        cfg = bridge.config
        self.route = route
        self.data_key = cfg.data_key(cfg.site, route.channel)
        self.ack_key = cfg.ack_key(cfg.site, route.channel)
        self.state = Outbound(secrets.randbits(63) + 1, cfg.window_messages, cfg.window_bytes)
        self.heard = time.monotonic()  # anything from the receiving bridge
        self.lost_logged = False
        self.resend_from: int | None = None  # asked for a resend (HELLO, foreign epoch)
        self.stall_seen = (-1, 0.0)  # (remote_received, since when) while messages wait
        self.urgent = False  # stopping: every frame asks for an ACK
        self.rx_generation: int | None = None  # the local connection the Receiver belongs to
        self.last_end = ""  # why the local channel last ended (said once per reason)
        self.pub, self.sub = _declare(bridge.session, self.data_key, self.ack_key, self._on_sample)

    # -- Zenoh's thread ---------------------------------------------------------------------

    def _on_sample(self, sample: Any) -> None:
        try:
            frame = _frame_of(sample, 0)
            if not isinstance(frame, (Ack, Hello)):
                raise FrameError(f"{type(frame).__name__} frame on an ack key")
            with self.cond:
                self.heard = time.monotonic()
                if isinstance(frame, Hello) or frame.epoch != self.state.epoch:
                    # A receiving bridge that does not know our epoch (it restarted, or
                    # missed our RESUME): tell it where we are and resend what it lacks.
                    self.resend_from = self.state.acked
                else:
                    self.state.on_ack(frame)
                self.cond.notify_all()
        except FrameError as err:
            self.refuse(self.ack_key, err)

    # -- the route's thread ------------------------------------------------------------------

    def _publish(self, seq: int, messages: list[bytes]) -> None:
        """DATA frames for ``messages`` numbered from ``seq``, about _FRAME_BYTES each."""
        epoch = self.state.epoch
        ack = self.urgent or self.state.wants_ack()
        i = 0
        n = len(messages)
        while i < n:
            j = i
            size = 0
            while (
                j < n and (j == i or size + len(messages[j]) <= _FRAME_BYTES) and j - i < MAX_BATCH
            ):
                size += len(messages[j])
                j += 1
            batch = messages[i:j]
            payload = batch[0] if len(batch) == 1 else b"".join(batch)
            lengths = [len(m) for m in batch]
            self.pub.put(payload, attachment=encode_data(epoch, seq + i, lengths, ack))
            i = j

    def _resend(self, start: int) -> None:
        with self.cond:
            begin, messages = self.state.resend(start)
        log.info("%s: resending %d message(s) from %d", self.name, len(messages), begin)
        self.pub.put(b"", attachment=encode_resume(self.state.epoch, begin))
        self._publish(begin, messages)

    def _housekeeping(self) -> int:
        """Resends, the remote's liveness; returns the credit (messages readable now)."""
        now = time.monotonic()
        cfg = self.bridge.config
        with self.cond:
            st = self.state
            start, self.resend_from = self.resend_from, None
            if start is None and st.outstanding and st.remote_received < st.next_seq:
                # The remote is alive (keepalives) but stopped receiving: frames were lost.
                seen, since = self.stall_seen
                if seen != st.remote_received:
                    self.stall_seen = (st.remote_received, now)
                elif now - since > 4 * cfg.keepalive:
                    start = st.remote_received
                    self.stall_seen = (st.remote_received, now)
            else:
                self.stall_seen = (-1, now)
            silent = now - self.heard
            credit = st.credit()
        if start is not None:
            self._resend(start)
        lost = silent > cfg.remote_timeout
        if lost and not self.lost_logged:
            log.warning(
                "%s: nothing from the receiving bridge (%s) for %.1f s; %s",
                self.name, self.ack_key, silent,
                "closing the local end, so the sender gets an error"
                if cfg.on_remote_lost == "error" else "the local sender waits",
            )  # fmt: skip
            self.lost_logged = True
        elif not lost and self.lost_logged:
            log.warning("%s: the receiving bridge is back", self.name)
            self.lost_logged = False
        return credit

    def _open(self) -> Receiver | None:
        ep = self.bridge.endpoint
        generation = self.bridge.local_generation()
        if generation is None:
            return None  # not connected (logged by Bridge.wait): an end opened while the
            # endpoint reconnects could not be told from one of the lost connection
        try:
            rx = Receiver(
                ep, self.route.channel, self.route.peer, vector=self.vector,
                timeout=_OPEN_RETRY, capacity=self.bridge.config.capacity,
                spin=self.bridge.config.spin,
            )  # fmt: skip
        except IvshmemError as err:
            self.note_open_failure("receiving", err)
            return None
        self.rx_generation = generation
        self.last_open_failure = ""
        return rx

    def run(self) -> None:
        cfg = self.bridge.config
        self.pub.put(b"", attachment=encode_resume(self.state.epoch, 0))
        rx: Receiver | None = None
        try:
            while not self.stopping:
                credit = self._housekeeping()
                if cfg.on_remote_lost == "error" and self.lost_logged:
                    if rx is not None:
                        rx.close()  # the local sender's next wait raises ChannelClosedError
                        rx = None
                    self.bridge._stop.wait(_READ_WAIT)
                    continue
                if rx is not None and self.rx_generation != self.bridge.local_generation():
                    # The local server went away: its ring is nobody's now (what the local
                    # sender left in it is lost, as at any server restart). What was read
                    # stays in the window; a new Receiver opens once the server is back.
                    log.info("%s: the connection to the local server that the channel was "
                             "opened on is gone; reopening once it is back", self.name)  # fmt: skip
                    with contextlib.suppress(IvshmemError):
                        rx.close()
                    rx = None
                if rx is None:
                    rx = self._open()
                    if rx is None:
                        self.bridge._stop.wait(_OPEN_RETRY)
                        continue
                    log.info("%s: reading channel %r from peer %d", self.name,
                             self.route.channel, self.route.peer)  # fmt: skip
                if credit == 0 and self.route.policy == "block":
                    with self.cond:
                        if self.state.credit() == 0 and self.resend_from is None:
                            self.cond.wait(_READ_WAIT)
                    continue
                try:
                    messages = rx.recv_many(credit or 1024, _READ_WAIT)  # drop: read on
                except ChannelTimeout:
                    continue
                except IvshmemError as err:
                    # The local sender closed or left, or the server went away: open again
                    # (a restarted sender finds the new Receiver; what it sent before stays
                    # in the ring for it). A sender that stays closed ends every new
                    # Receiver at once: retry at _OPEN_RETRY, and say so once per reason.
                    text = str(err)
                    if text != self.last_end:
                        self.last_end = text
                        log.info("%s: local channel ended (%s); reopening", self.name, text)
                    rx.close()
                    rx = None
                    self.bridge._stop.wait(_OPEN_RETRY)
                    continue
                self.last_end = ""
                if credit == 0:
                    self.state.dropped += len(messages)
                    log.debug("%s: window full, dropped %d", self.name, len(messages))
                    continue
                with self.cond:
                    seq = self.state.take(messages)
                self._publish(seq, messages)
            if rx is not None:
                self._empty_ring(rx)
        finally:
            if rx is not None:
                rx.close()  # what the local sender writes from now on waits in the ring
        self._drain()

    def _empty_ring(self, rx: Receiver) -> None:
        """On a clean stop: relay what the local sender already wrote (a restarted bridge is
        a new peer, so the old channel's leftovers would reach nobody), for at most
        ``remote_timeout``."""
        self.urgent = True
        deadline = time.monotonic() + self.bridge.config.remote_timeout
        while time.monotonic() < deadline:
            credit = self._housekeeping()
            if credit == 0:
                with self.cond:
                    if self.state.credit() == 0:
                        self.cond.wait(_READ_WAIT)
                continue
            try:
                messages = rx.recv_many(credit, 0)
            except IvshmemError:  # empty (ChannelTimeout), or the sender is gone
                return
            with self.cond:
                seq = self.state.take(messages)
            self._publish(seq, messages)

    def _drain(self) -> None:
        """On a clean stop: wait (up to ``remote_timeout``) until the remote acknowledged
        every message read from the ring, resending if it asks, so that stopping and
        restarting a bridge loses nothing."""
        deadline = time.monotonic() + self.bridge.config.remote_timeout
        if self.state.outstanding:
            self._resend(self.state.remote_received)  # asking for the ACK that frees them
        while self.state.outstanding and time.monotonic() < deadline:
            self._housekeeping()
            with self.cond:
                if self.state.outstanding:
                    self.cond.wait(_READ_WAIT)
        if self.state.outstanding:
            log.warning("%s: stopped with %d message(s) not acknowledged by the remote",
                        self.name, self.state.outstanding)  # fmt: skip


class _InRoute(_Route):
    """Zenoh -> local ring.

    Delivery has a fast path: when nothing is queued and the route's thread is not in the
    middle of a delivery, the Zenoh callback copies a frame's messages straight into the
    ring while they fit (never waiting), which spares a thread hand-off per message on the
    round trip. Everything that does not fit is queued for the thread, which waits for room.
    The acknowledgement always comes from the thread (a put from inside Zenoh's callback
    could wait on Zenoh itself). ``busy`` (under ``cond``) makes the two take turns on the
    Sender, which is not meant for two threads at once."""

    def __init__(self, bridge: Bridge, route: InRoute, vector: int | None) -> None:
        super().__init__(bridge, f"in:{route.site}/{route.channel}->{route.peer}", vector)
        cfg = bridge.config
        self.route = route
        self.data_key = cfg.data_key(route.site, route.channel)
        self.ack_key = cfg.ack_key(route.site, route.channel)
        self.state = Inbound(cfg.window_messages, cfg.window_bytes)
        self.max_message = _NO_LIMIT
        self.hello_wanted = True
        self.ack_due = False  # the thread should send an ACK now
        self.ack_requested = False  # a frame asked for one since the last ACK
        self.delivered = 0
        self.tx: Sender | None = None
        self.tx_generation: int | None = None  # the local connection the Sender belongs to
        self.busy = False
        self.pub, self.sub = _declare(bridge.session, self.ack_key, self.data_key, self._on_sample)

    def _on_sample(self, sample: Any) -> None:
        try:
            frame = _frame_of(sample, self.max_message)
            with self.cond:
                if isinstance(frame, Resume):
                    self.state.on_resume(frame)
                    self.hello_wanted = False
                    self.cond.notify_all()
                elif isinstance(frame, Data):
                    queued, hello = self.state.on_data(frame)
                    if hello:
                        self.hello_wanted = True
                    if frame.ack:
                        self.ack_requested = True
                    if (
                        queued
                        and not self.busy
                        and self.tx is not None
                        and self.tx_generation == self.bridge.local_generation()
                    ):
                        self._deliver_now(self.tx)
                    if self.state.queue or hello or self.ack_due:
                        self.cond.notify_all()
                else:
                    raise FrameError(f"{type(frame).__name__} frame on a data key")
        except FrameError as err:
            self.refuse(self.data_key, err)
        except IvshmemError as err:  # the local end broke: the thread reopens it
            log.info("%s: direct delivery failed (%s)", self.name, err)

    def _deliver_now(self, tx: Sender) -> None:
        """The fast path (cond held, not busy): what fits in the ring now, without waiting."""
        st = self.state
        queue = st.queue
        done = 0
        last: tuple[int, int] | None = None
        while queue:
            epoch, seq, msgs = queue[0]
            k = tx.try_send_many(msgs)
            if k:
                last = (epoch, seq + k)
                done += k
                st.queued_bytes -= sum(map(len, msgs[:k]))
            if k < len(msgs):
                if k:
                    queue[0] = (epoch, seq + k, msgs[k:])
                break
            queue.popleft()
        if last is not None:
            st.queued_messages -= done
            tx.flush()
            st.delivered_upto(*last)
            self.delivered += done
            if self.ack_requested:
                self.ack_due = True

    def _ack(self) -> None:
        with self.cond:
            st = self.state
            self.ack_due = self.ack_requested = False
            if self.hello_wanted or st.epoch is None:
                frame = encode_hello()
            else:
                frame = encode_ack(st.epoch, st.delivered, st.received)
        self.pub.put(b"", attachment=frame)

    def _open(self) -> Sender | None:
        generation = self.bridge.local_generation()
        if generation is None:
            return None  # not connected: see _OutRoute._open
        try:
            tx = Sender(
                self.bridge.endpoint, self.route.local_channel, self.route.peer,
                vector=self.vector, timeout=_OPEN_RETRY, spin=self.bridge.config.spin,
            )  # fmt: skip
        except IvshmemError as err:
            self.note_open_failure("sending", err)
            return None
        self.max_message = tx.capacity // 2 - 8
        self.tx_generation = generation
        self.last_open_failure = ""
        return tx

    def _close_tx(self) -> None:
        with self.cond:
            tx, self.tx = self.tx, None
        if tx is not None:
            with contextlib.suppress(IvshmemError):
                tx.close()

    def run(self) -> None:
        keepalive = self.bridge.config.keepalive
        next_ack = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_ack or self.ack_due:
                    self._ack()
                    next_ack = now + keepalive
                if self.tx is not None and self.tx_generation != self.bridge.local_generation():
                    # The local server went away: deliver nothing more into its ring; the
                    # queue waits (bounded by the window) for the channel to open again.
                    log.info("%s: the connection to the local server that the channel was "
                             "opened on is gone; %d message(s) wait for the new channel",
                             self.name, self.state.queued_messages)  # fmt: skip
                    self._close_tx()
                if self.tx is None:
                    tx = self._open()
                    if tx is None:
                        self.bridge._stop.wait(_OPEN_RETRY)
                        continue
                    log.info("%s: delivering to peer %d as channel %r", self.name,
                             self.route.peer, self.route.local_channel)  # fmt: skip
                    with self.cond:
                        self.tx = tx
                tx = self.tx
                assert tx is not None
                with self.cond:
                    if not self.state.queue and not self.ack_due:
                        self.cond.wait(min(keepalive, max(0.0, next_ack - time.monotonic())))
                    if self.tx_generation != self.bridge.local_generation():
                        continue  # lost while waiting: the top of the loop closes it
                    chunks = self.state.take(1024)
                    self.busy = bool(chunks)
                if not chunks:
                    continue
                done: list[Chunk] = []
                left: list[Chunk] = chunks
                try:
                    done, left = self._deliver(tx, chunks, keepalive)
                except _Partial as part:
                    done, left = part.done, part.left
                    log.info("%s: local channel ended (%s); reopening", self.name,
                             part.__cause__)  # fmt: skip
                    self._close_tx()
                except IvshmemError as err:  # nothing went (a message the ring refuses)
                    log.warning("%s: cannot deliver (%s); reopening", self.name, err)
                    self._close_tx()
                    self.bridge._stop.wait(_OPEN_RETRY)
                finally:
                    with self.cond:
                        self.busy = False
                        self.state.put_back(left)
                        if done:
                            epoch, seq, msgs = done[-1]
                            self.state.delivered_upto(epoch, seq + len(msgs))
                sent = sum(len(c[2]) for c in done)
                if sent:
                    self.delivered += sent
                    if self.ack_requested:
                        self._ack()
                        next_ack = time.monotonic() + keepalive
        finally:
            self._close_tx()
            with contextlib.suppress(Exception):
                self._ack()  # what was delivered last, so the sender can forget it

    def _deliver(
        self, tx: Sender, chunks: list[Chunk], keepalive: float
    ) -> tuple[list[Chunk], list[Chunk]]:
        """Send ``chunks`` into the ring, waiting for room as long as it takes; returns (what
        went, what did not: only when stopping). A full ring is waited for in slices of
        ``keepalive`` with a keepalive in between, so a slow local receiver is never taken
        for a lost bridge. An error raises _Partial saying what went: it can only come out
        of a wait for room, which publishes (flushes) what was written before it, so what
        went is in the ring whatever happens."""
        done: list[Chunk] = []
        for n, (epoch, seq, msgs) in enumerate(chunks):
            i = 0
            try:
                while i < len(msgs):
                    i = tx.try_send_many(msgs, i)
                    if i < len(msgs):
                        try:
                            tx.send(msgs[i], keepalive)  # waits for room, then publishes
                            i += 1
                        except ChannelTimeout:
                            self._ack()
                            if self.stopping or (
                                self.tx_generation != self.bridge.local_generation()
                            ):
                                raise
            except (IvshmemError, ChannelTimeout) as err:
                with contextlib.suppress(IvshmemError):
                    tx.flush()
                if i:
                    done.append((epoch, seq, msgs[:i]))
                left = [(epoch, seq + i, msgs[i:]), *chunks[n + 1 :]]
                if isinstance(err, ChannelTimeout) and self.stopping:
                    return done, left
                raise _Partial(done, left) from err
            done.append((epoch, seq, msgs))
        tx.flush()
        return done, []


class _Partial(IvshmemError):
    """A delivery that stopped part way: ``done`` went into the ring, ``left`` did not."""

    def __init__(self, done: list[Chunk], left: list[Chunk]) -> None:
        super().__init__("delivery interrupted")
        self.done = done
        self.left = left


class Bridge:
    """A bridge as configured: call :meth:`start`, then :meth:`wait`; :meth:`close` ends it.

    ``endpoint`` overrides the configured local side (tests, or a program that already holds
    one); the bridge then does not close it. ``on_reconnect`` (None by default) is called
    with the bridge's new peer id after it reconnected to a restarted local server, from the
    thread in :meth:`wait`."""

    on_reconnect: Callable[[int], Any] | None

    def __init__(self, config: BridgeConfig, endpoint: Endpoint | None = None) -> None:
        config.check()
        self.config = config
        self._given_endpoint = endpoint
        self.endpoint: Endpoint = endpoint  # type: ignore[assignment]
        self.session: Any = None
        self.routes: list[_Route] = []
        self._stop = threading.Event()
        self._limited = _Limited()
        self.on_reconnect = None
        self._generation = 0  # bumped by every reconnection to the local server
        self._local_up = True  # False from a seen loss until on_reconnect (see local_generation)
        self._reconnects: list[Any] = []  # ivshmem.peer.Reconnected, for wait() to report
        self._lost_at: float | None = None  # when wait() saw the local server gone
        self._id_file_written = False

    def start(self) -> None:
        cfg = self.config
        if self._given_endpoint is None:
            if cfg.socket is not None:
                from ..peer import connect

                # Reconnecting as host peers do; server_timeout 0 means "give up at once",
                # which a peer that does not reconnect reports by itself.
                self.endpoint = connect(cfg.socket, reconnect=cfg.server_timeout != 0)
            else:
                assert cfg.region is not None and cfg.region_id is not None
                self.endpoint = open_region(cfg.region, id=cfg.region_id)
        try:
            if hasattr(self.endpoint, "on_reconnect"):
                self._chain_on_reconnect()
            if cfg.id_file is not None:
                self._write_id_file()
            self.session = open_session(cfg)
            vectors = self.endpoint.vectors
            for i, r in enumerate(cfg.outs):
                self.routes.append(_OutRoute(self, r, i % vectors if vectors else None))
            for i, r2 in enumerate(cfg.ins, start=len(cfg.outs)):
                self.routes.append(_InRoute(self, r2, i % vectors if vectors else None))
            for route in self.routes:
                route.thread.start()
        except BaseException:
            self.close()
            raise
        if vectors and len(self.routes) > vectors:
            log.warning(
                "%d routes share %d vector(s): give the server -n %d so that each route "
                "sleeps on its own doorbell", len(self.routes), vectors, len(self.routes),
            )  # fmt: skip

    @property
    def peer_id(self) -> int:
        return self.endpoint.id

    def local_generation(self) -> int | None:
        """Which connection to the local server the bridge has: None while it has none (the
        server went away), another number after every reconnection. A route's channel end
        belongs to the connection it was opened under; ids cannot tell (a restarted server
        hands them out from 0 again, so the bridge may well get its old id back).

        Once a loss is seen this stays None until the endpoint's ``on_reconnect`` has run, not
        merely until ``connected`` is true again: the endpoint installs the new connection
        first and calls back after, and a route that opened its end in between would tag it
        with the old number, then take the new one for a loss and close a good channel."""
        if not getattr(self.endpoint, "connected", True):
            self._local_up = False
            return None
        return self._generation if self._local_up else None

    def _chain_on_reconnect(self) -> None:
        peer: Any = self.endpoint
        before = peer.on_reconnect

        def reconnected(info: Any) -> None:
            # Called by the endpoint in whichever thread reconnected it (a route's, or
            # wait()'s): only note it here; wait() reports it.
            self._generation += 1
            self._local_up = True
            self._reconnects.append(info)
            if before is not None:
                before(info)

        peer.on_reconnect = reconnected

    def _write_id_file(self) -> None:
        """The bridge's peer id in ``id_file``, replaced atomically (a reader never sees a
        half-written file)."""
        path = self.config.id_file
        assert path is not None
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{self.endpoint.id}\n")
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise IvshmemError(f"cannot write the id file {path}: {err.strerror}") from err
        self._id_file_written = True

    def _watch_server(self) -> None:
        """Report reconnections, and give up when the server stays away too long."""
        cfg = self.config
        while self._reconnects:
            info = self._reconnects.pop(0)
            log.warning(
                "reconnected to the local ivshmem server as peer %d (was %d): local programs "
                "must address the bridge as peer %d now", info.new_id, info.old_id, info.new_id,
            )  # fmt: skip
            if cfg.id_file is not None:
                try:
                    self._write_id_file()
                except IvshmemError as err:
                    log.error("%s", err)
            if self.on_reconnect is not None:
                self.on_reconnect(info.new_id)
        if getattr(self.endpoint, "connected", True):
            self._lost_at = None
            return
        self._local_up = False  # until on_reconnect: see local_generation
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
            log.warning(
                "lost the local ivshmem server at %s; reconnecting (%s); the streams wait",
                cfg.socket,
                "as long as it takes" if cfg.server_timeout is None
                else f"for up to {cfg.server_timeout:g} s",
            )  # fmt: skip
        if cfg.server_timeout is not None and now - self._lost_at >= cfg.server_timeout:
            self._stop.set()
            raise ServerLostError(
                f"lost the local ivshmem server at {cfg.socket}, and it was not back within "
                f"{cfg.server_timeout:g} s (server_timeout)"
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Until :meth:`stop`, a route fails or the bridge gives up on the local server (the
        error is raised: ServerLostError for the server); True when stopped, False at
        ``timeout``.

        The local server is watched here. When it goes away, the endpoint reconnects (as a
        host peer with ``reconnect=True`` does) and the routes reopen their local ends under
        the bridge's new id, which is logged, passed to :attr:`on_reconnect` and written to
        ``id_file``; the Zenoh side keeps its windows and queues meanwhile. If the server is
        not back within ``server_timeout`` seconds (None: no limit), the bridge stops
        (relaying what it holds and waiting for those ACKs, as on SIGTERM) and this raises
        ServerLostError, for a supervisor (exit status 3 from ``ivshmem bridge``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        service = getattr(self.endpoint, "service", None)
        while True:
            left = (
                _SERVER_CHECK
                if deadline is None
                else min(_SERVER_CHECK, deadline - time.monotonic())
            )
            stopped = self._stop.wait(max(0.0, left))
            for route in self.routes:
                if route.error is not None:
                    raise route.error
            if stopped:
                return True
            if service is not None:
                try:
                    service()  # with reconnect: reconnects when due, never raises the loss
                except IvshmemError as err:
                    self._stop.set()
                    raise ServerLostError(f"lost the local ivshmem server: {err}") from err
                self._watch_server()
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.routes:
            if isinstance(r, _OutRoute):
                s = r.state
                out[r.name] = {"sent": s.next_seq, "acked": s.acked, "dropped": s.dropped,
                               "refused": r.refused}  # fmt: skip
            elif isinstance(r, _InRoute):
                out[r.name] = {"delivered": r.delivered, "duplicates": r.state.duplicates,
                               "refused": r.refused}  # fmt: skip
        return out

    def close(self) -> None:
        self._stop.set()
        for route in self.routes:
            if route.thread.is_alive():
                route.thread.join(timeout=10)
        for route in self.routes:
            for entity in (getattr(route, "sub", None), getattr(route, "pub", None)):
                if entity is not None:
                    with contextlib.suppress(Exception):
                        entity.undeclare()
        if self.session is not None:
            with contextlib.suppress(Exception):
                self.session.close()
            self.session = None
        if self._given_endpoint is None and self.endpoint is not None:
            self.endpoint.close()
        if self._id_file_written and self.config.id_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.config.id_file)  # a stale id would send programs astray
            self._id_file_written = False

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(config: BridgeConfig) -> list[str]:
    """One line per route with its key, for the start-up log."""
    lines = []
    for r in config.outs:
        lines.append(f"out  {r.channel} from local peer {r.peer} -> "
                     f"{config.data_key(config.site, r.channel)} ({r.policy})")  # fmt: skip
    for i in config.ins:
        lines.append(f"in   {config.data_key(i.site, i.channel)} -> {i.local_channel} "
                     f"to local peer {i.peer}")  # fmt: skip
    return lines

"""The bridge without Zenoh or shared memory: frames, the two state machines wired back to
back through a lossy in-memory link, the configuration (flags and TOML), the CLI's errors."""

from __future__ import annotations

import argparse
import importlib.util
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from ivshmem.bridge.config import (
    BridgeConfig,
    ConfigError,
    InRoute,
    OutRoute,
    ZenohOptions,
    load_toml,
    parse_in,
    parse_out,
)
from ivshmem.bridge.core import (
    HEADER,
    MAGIC,
    Ack,
    Data,
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
from ivshmem.cli.bridge import build_config, register

# -- frames -----------------------------------------------------------------------------------


def test_frames_round_trip() -> None:
    msgs = [b"", b"a", b"hello" * 100]
    frame = decode(encode_data(7, 40, [len(m) for m in msgs]), b"".join(msgs), 1 << 20)
    assert frame == Data(7, 40, msgs)
    assert decode(encode_resume(7, 9), b"", 0) == Resume(7, 9)
    assert decode(encode_ack(7, 3, 5), b"", 0) == Ack(7, 3, 5)
    assert decode(encode_hello(), b"", 0) == Hello()


@pytest.mark.parametrize(
    ("attachment", "payload", "what"),
    [
        (None, b"foreign", "no ivshmem-bridge header"),
        (b"IVB1", b"", "shorter than"),
        (b"XXXX" + bytes(HEADER.size - 4), b"", "bad magic"),
        (HEADER.pack(MAGIC, 9, 1, 0, 0), b"", "unknown frame kind"),
        (HEADER.pack(MAGIC, 2, 1, 0, 0) + b"x", b"", "extra bytes"),
        (HEADER.pack(MAGIC, 2, 1, 0, 0), b"payload", "extra bytes"),
        (HEADER.pack(MAGIC, 3, 1, 5, 2), b"", "delivered 5 but received only 2"),
        (HEADER.pack(MAGIC, 1, 1, 0, 0), b"", "truncated"),
        (HEADER.pack(MAGIC, 1, 1, 0, 0) + struct.pack("<I", 0), b"", "with 0 messages"),
        (HEADER.pack(MAGIC, 1, 1, 0, 0) + struct.pack("<II", 2, 1), b"x", "does not hold"),
        (HEADER.pack(MAGIC, 1, 1, 0, 0) + struct.pack("<II", 1, 3), b"x", "add up to 3"),
        (HEADER.pack(MAGIC, 1, 1, 0, 0) + struct.pack("<II", 1, 9), bytes(9), "local ring"),
        (HEADER.pack(MAGIC, 1, 1, (1 << 64) - 1, 0) + struct.pack("<II", 1, 1), b"x", "overflow"),
    ],
)
def test_malformed_frames_are_refused(attachment: bytes | None, payload: bytes, what: str) -> None:
    with pytest.raises(FrameError, match=what):
        decode(attachment, payload, 8)


# -- the two state machines over a lossy link ----------------------------------------------


class Link:
    """Sending bridge -> receiving bridge, frame by frame, with losses on demand."""

    def __init__(self, window: int = 8) -> None:
        self.out = Outbound(1234, window, 1 << 20)
        self.inb = Inbound(window, 1 << 20)
        self.ring: list[bytes] = []  # the receiving side's local ring
        self.lose_next = 0

    def data(self, seq: int, msgs: list[bytes]) -> bool:
        """Deliver a DATA frame unless lost; True if the receiver asks for a HELLO."""
        if self.lose_next:
            self.lose_next -= 1
            return False
        frame = decode(encode_data(self.out.epoch, seq, [len(m) for m in msgs]),
                       b"".join(msgs), 1 << 20)  # fmt: skip
        assert isinstance(frame, Data)
        return self.inb.on_data(frame)[1]

    def deliver_and_ack(self) -> None:
        chunks = self.inb.take(1000)
        self.ring += [bytes(m) for _, _, msgs in chunks for m in msgs]
        if chunks:
            epoch, seq, msgs = chunks[-1]
            self.inb.delivered_upto(epoch, seq + len(msgs))
        assert self.inb.epoch is not None
        self.out.on_ack(Ack(self.inb.epoch, self.inb.delivered, self.inb.received))

    def resume(self) -> None:
        begin, msgs = self.out.resend()
        self.inb.on_resume(Resume(self.out.epoch, begin))
        if msgs:
            self.data(begin, msgs)


def test_in_order_once_with_losses_and_resends() -> None:
    rnd = random.Random(5)
    link = Link(window=8)
    link.inb.on_resume(Resume(link.out.epoch, 0))
    sent: list[bytes] = []
    i = 0
    while i < 500:
        credit = link.out.credit()
        assert credit >= 0
        if credit:
            batch = [b"m%d" % (i + k) for k in range(min(credit, rnd.randint(1, 4)))]
            i += len(batch)
            sent += batch
            if rnd.random() < 0.1:
                link.lose_next = 1
            if link.data(link.out.take(batch), batch):
                link.resume()  # the gap was noticed: HELLO, then a resend from the ack
        if rnd.random() < 0.5 or not credit:
            link.deliver_and_ack()
            if link.out.outstanding and link.inb.received < link.out.next_seq:
                link.resume()  # a stall: the sender resends from where the remote stands
    while link.out.outstanding:
        link.resume()
        link.deliver_and_ack()
    assert link.ring == sent


def test_window_bounds_what_is_read() -> None:
    out = Outbound(1, 4, 100)
    assert out.credit() == 4
    out.take([b"x"] * 4)
    assert out.credit() == 0
    out.on_ack(Ack(1, 2, 4))
    assert out.credit() == 2
    out.take([bytes(100)])
    assert out.credit() == 0  # bytes window full
    with pytest.raises(FrameError):
        out.on_ack(Ack(1, 2, 99))  # acks more than was ever sent
    assert not out.on_ack(Ack(2, 5, 5))  # another epoch: ignored


def test_receiver_restart_resumes_and_drops_duplicates() -> None:
    link = Link()
    link.inb.on_resume(Resume(link.out.epoch, 0))
    msgs = [b"a", b"b", b"c"]
    link.data(link.out.take(msgs), msgs)
    link.deliver_and_ack()  # a, b, c acknowledged
    more = [b"d", b"e"]
    link.data(link.out.take(more), more)
    # delivered, then the bridge died before it acknowledged them
    link.ring += [bytes(m) for _, _, msgs in link.inb.take(10) for m in msgs]
    link.inb = Inbound(8, 1 << 20)  # the restarted receiving bridge knows nothing
    assert link.inb.on_data(Data(link.out.epoch, 3, more)) == (0, True)  # asks for HELLO
    link.resume()
    link.deliver_and_ack()
    assert link.ring == [b"a", b"b", b"c", b"d", b"e", b"d", b"e"]  # at most the unacked twice
    assert link.out.outstanding == 0


def test_resend_within_one_epoch_is_deduplicated() -> None:
    inb = Inbound(8, 1 << 20)
    inb.on_resume(Resume(9, 0))
    assert inb.on_data(Data(9, 0, [b"a", b"b"])) == (2, False)
    assert inb.on_data(Data(9, 0, [b"a", b"b", b"c"])) == (1, False)
    assert inb.on_data(Data(9, 5, [b"z"])) == (0, True)  # a gap
    assert [m for _, _, msgs in inb.take(10) for m in msgs] == [b"a", b"b", b"c"]
    assert inb.duplicates == 2
    with pytest.raises(FrameError):
        inb.on_resume(Resume(9, 7))  # beyond what we received
    inb.on_resume(Resume(10, 0))  # a restarted sender: new epoch
    assert inb.on_data(Data(10, 0, [b"new"])) == (1, False)


def test_take_and_put_back_keep_counts() -> None:
    inb = Inbound(100, 1 << 20)
    inb.on_resume(Resume(1, 0))
    for i in range(3):
        inb.on_data(Data(1, 2 * i, [b"x%d" % i, b"y%d" % i]))
    chunks = inb.take(3)  # whole chunks, at most 3 messages unless one chunk is more
    assert [c[1] for c in chunks] == [0]
    assert inb.queued_messages == 4 and inb.queued_bytes == 8
    inb.put_back(chunks)
    assert inb.queued_messages == 6 and inb.queued_bytes == 12
    assert [c[1] for c in inb.take(100)] == [0, 2, 4]
    assert inb.queued_messages == 0 and inb.queued_bytes == 0


def test_inbound_queue_is_bounded() -> None:
    inb = Inbound(2, 1 << 20)
    inb.on_resume(Resume(1, 0))
    assert inb.on_data(Data(1, 0, [b"a", b"b"])) == (2, False)
    assert inb.on_data(Data(1, 2, [b"c"])) == (0, False)  # full: not received, resent later
    assert inb.received == 2


# -- configuration ------------------------------------------------------------------------


def test_route_flags() -> None:
    assert parse_out("frames:3") == OutRoute("frames", 3)
    assert parse_out("frames:3:drop") == OutRoute("frames", 3, "drop")
    assert parse_in("a/frames:5") == InRoute("a", "frames", 5, "frames")
    assert parse_in("a/frames:5:local") == InRoute("a", "frames", 5, "local")
    for bad, what in [
        ("frames", "expected CHANNEL:PEER"),
        ("frames:x", "not a peer id"),
        ("frames:70000", "not a peer id"),
        ("fr*mes:1", "cannot be part of a Zenoh key"),
        ("frames:1:maybe", "'block' or 'drop'"),
    ]:
        with pytest.raises(ConfigError, match=what):
            parse_out(bad)
    with pytest.raises(ConfigError, match="SITE/CHANNEL"):
        parse_in("frames:5")
    with pytest.raises(ConfigError, match="Zenoh key"):
        parse_in("a/b/c:5")


def test_toml(tmp_path: Path) -> None:
    f = tmp_path / "bridge.toml"
    f.write_text(
        """
site = "a"
socket = "/tmp/s"
window_bytes = "1M"
capacity = "1M"
on_remote_lost = "error"
server_timeout = 30
id_file = "/run/bridge-a.id"
[zenoh]
listen = ["tcp/127.0.0.1:7447"]
connect = ["tcp/127.0.0.1:7448"]
[[out]]
channel = "frames"
peer = 3
[[in]]
site = "b"
channel = "frames"
peer = 3
local_channel = "back"
"""
    )
    cfg = load_toml(f)
    cfg.check()
    assert cfg.outs == [OutRoute("frames", 3)]
    assert cfg.ins == [InRoute("b", "frames", 3, "back")]
    assert cfg.window_bytes == 1 << 20 and cfg.capacity == 1 << 20
    assert cfg.server_timeout == 30.0 and cfg.id_file == "/run/bridge-a.id"
    f.write_text(f.read_text().replace("server_timeout = 30\n", ""))
    assert load_toml(f).server_timeout is None, "left out: reconnect as long as it takes"
    assert cfg.data_key("a", "frames") == "ivshmem/a/frames/data"
    entries = dict(cfg.zenoh.entries())
    assert entries["scouting/multicast/enabled"] == "false"
    assert entries["transport/shared_memory/enabled"] == "false"
    assert entries["listen/endpoints"] == '["tcp/127.0.0.1:7447"]'


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("site = 'a'\nbogus = 1\n", "unknown keys"),
        ("site = 'a'\n[[out]]\nchannel = 'x'\npeer = 1\ncolour = 2\n", "takes channel"),
        ("site = 'a'\n[zenoh]\nfoo = 1\n", r"\[zenoh\] takes only"),
        ("site = [\n", "not valid TOML"),
        ("site = 'a'\nwindow_bytes = 'lots'\n", "lots"),
    ],
)
def test_toml_errors_name_the_file(tmp_path: Path, text: str, what: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=what):
        load_toml(f)


def test_config_checks() -> None:
    def cfg(**kw: object) -> BridgeConfig:
        base: dict[str, object] = {"site": "a", "socket": "/s", "outs": [OutRoute("x", 1)]}
        base.update(kw)
        return BridgeConfig(**base)  # type: ignore[arg-type]

    cfg().check()
    cases: list[tuple[dict[str, object], str]] = [
        ({"outs": []}, "nothing to relay"),
        ({"socket": None}, "give the local side"),
        ({"socket": None, "region": "/r"}, "needs --id"),
        ({"site": "a/b"}, "Zenoh key"),
        ({"on_remote_lost": "panic"}, "'wait' or 'error'"),
        ({"capacity": 5000}, "power of two"),
        ({"outs": [OutRoute("x", 1), OutRoute("x", 2)]}, "sent out twice"),
        ({"zenoh": ZenohOptions(mode="satellite")}, "zenoh mode"),
        ({"zenoh": ZenohOptions(listen=["7447"])}, "PROTO/ADDRESS"),
        ({"server_timeout": -1.0}, "0 or more"),
        ({"server_timeout": float("nan")}, "0 or more"),
        ({"socket": None, "region": "/r", "region_id": 1, "server_timeout": 5.0}, "needs --socket"),
        ({"id_file": ""}, "id_file is empty"),
    ]
    for kw, what in cases:
        with pytest.raises(ConfigError, match=what):
            cfg(**kw).check()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem.cli.main", "bridge", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_help_shows_the_two_host_example() -> None:
    out = _cli("--help").stdout
    assert "--out" in out and "--in" in out and "--listen" in out
    assert "two hosts, end to end" in out
    assert "--server-timeout" in out and "--id-file" in out and "status 3" in out


def _flags(*args: str) -> BridgeConfig:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return build_config(parser.parse_args(["bridge", "--site", "a", "--out", "x:1", *args]))


def test_cli_server_restart_flags() -> None:
    cfg = _flags("--socket", "/s")
    assert cfg.server_timeout is None and cfg.id_file is None
    cfg = _flags("--socket", "/s", "--server-timeout", "2.5", "--id-file", "/run/b.id")
    assert cfg.server_timeout == 2.5 and cfg.id_file == "/run/b.id"
    assert _flags("--socket", "/s", "--server-timeout", "inf").server_timeout is None
    with pytest.raises(ConfigError, match="needs --socket"):
        _flags("--region", "/r", "--id", "1", "--server-timeout", "1")


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["--socket", "/s", "--out", "x:1"], "give this bridge's --site"),
        (["--site", "a", "--out", "x:1"], "give the local side"),
        (["--site", "a", "--socket", "/s", "--out", "x"], "expected CHANNEL:PEER"),
        (["--site", "a", "--socket", "/nonexistent/sock", "--out", "x:1"], "nonexistent"),
        (["--site", "a", "--socket", "/s", "--out", "x:1", "--server-timeout", "-1"], "0 or more"),
    ],
)
def test_cli_errors_are_one_clear_line(args: list[str], what: str) -> None:
    r = _cli(*args)
    assert r.returncode == 1
    assert r.stderr.startswith("ivshmem bridge: error: ")
    assert what in r.stderr
    assert "Traceback" not in r.stderr


def test_zenoh_tuning_applies_where_the_configuration_file_is_silent(tmp_path: Path) -> None:
    """A bridge starts from a deeper Zenoh send queue and a larger receive buffer
    (ZENOH_TUNING), but a setting its Zenoh configuration file makes is the file's."""
    require(
        importlib.util.find_spec("zenoh"),
        "eclipse-zenoh is not installed (pip install '.[bridge]'; scripts/setup.sh does)",
    )
    import zenoh

    from ivshmem.bridge.config import ZENOH_TUNING
    from ivshmem.bridge.relay import tuned

    plain = zenoh.Config()
    assert tuned(plain, zenoh.Config()) == list(ZENOH_TUNING)
    for key, value in ZENOH_TUNING:  # the tuning differs from Zenoh's defaults
        assert plain.get_json(key) != value
    f = tmp_path / "zenoh.json5"
    f.write_text("{transport: {link: {rx: {buffer_size: 200000}}}}")
    from_file = zenoh.Config.from_file(str(f))
    left = dict(tuned(from_file, zenoh.Config()))
    assert "transport/link/rx/buffer_size" not in left
    assert left["transport/link/tx/queue/size/data"] == "16"
    for key, value in left.items():
        from_file.insert_json5(key, value)
    assert from_file.get_json("transport/link/rx/buffer_size") == "200000"
    assert from_file.get_json("transport/link/tx/queue/size/data") == "16"


def test_an_id_file_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    from ivshmem.bridge.relay import Bridge
    from ivshmem.channel import format_region
    from ivshmem.endpoint import open_region
    from ivshmem.errors import IvshmemError

    region = tmp_path / "region"
    ep = open_region(str(region), id=0, size="1M")
    try:
        format_region(ep, peers=[0, 1], max_peers=2)
        cfg = BridgeConfig(site="a", region=str(region), region_id=0, outs=[OutRoute("x", 1)])
        cfg.id_file = str(tmp_path / "no-such-dir" / "bridge.id")
        with pytest.raises(IvshmemError, match=r"cannot write the id file .*No such file"):
            Bridge(cfg, endpoint=ep).start()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["region"]
    finally:
        ep.close()

"""``ivshmem-client`` as a real process against a real ``ivshmem-server``, with host peers from
this process at the other end of every doorbell."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from serverproc import ServerProcess

from ivshmem.cli.client import hexdump, split_commands
from ivshmem.peer import Peer, connect

pytestmark = pytest.mark.timeout(60)

VECTORS = 4
WAIT = 10.0  # hang catcher only
CLIENT = [sys.executable, "-m", "ivshmem.cli.client"]


@pytest.fixture
def server(short_tmp: Path) -> Iterator[ServerProcess]:
    with ServerProcess(short_tmp, size="1M", vectors=VECTORS) as proc:
        yield proc


@pytest.fixture
def peer(server: ServerProcess) -> Iterator[Peer]:
    with connect(server.socket_path, vectors=VECTORS) as p:
        yield p


def client(server: ServerProcess, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIENT, "-S", server.socket_path, "-n", str(VECTORS), *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        **kwargs,
    )


def rung(p: Peer, count: int) -> list[int]:
    """The vectors of ``count`` rings, sorted (a missing ring fails the test)."""
    got = [p.wait(timeout=WAIT) for _ in range(count)]
    assert None not in got, f"only {got} rang"
    return sorted(v for v in got if v is not None)


def see(p: Peer, predicate: Callable[[frozenset[int]], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate(p.peers):
        assert time.monotonic() < deadline, "timed out waiting for a membership change"
        time.sleep(0.005)


class Interactive:
    """A client reading commands from a pipe; its stdout read line by line with a timeout
    (from the raw fd: select() on a buffered file would miss lines already buffered)."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLIENT, "-S", server.socket_path, "-n", str(server.vectors), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        self.buffer = b""

    def send(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def line(self) -> str:
        deadline = time.monotonic() + WAIT
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.stdout], [], [], deadline - time.monotonic())
            assert ready, f"the client printed no whole line (got {self.buffer!r})"
            data = os.read(self.stdout.fileno(), 4096)
            assert data, f"the client exited (got {self.buffer!r})"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def finish(self) -> tuple[int, str]:
        self.stdin.close()
        code = self.proc.wait(WAIT)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.stdout.close()
        self.proc.stderr.close()
        return code, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.stdin, self.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass


@pytest.fixture
def interactive(server: ServerProcess) -> Iterator[Callable[..., Interactive]]:
    started: list[Interactive] = []

    def start(*args: str) -> Interactive:
        started.append(Interactive(server, *args))
        return started[-1]

    yield start
    for one in started:
        one.kill()


def test_dump_shows_us_and_the_other_peers(server: ServerProcess, peer: Peer) -> None:
    result = client(server, "-c", "dump; id")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    own = int(lines[-1])
    assert own != peer.id
    assert lines[0] == f"own id {own}, 4 vector(s), region 1M (1048576 bytes), server " + (
        server.socket_path
    )
    assert lines[1].startswith("  own vector fds: ") and len(lines[1].split()) == 4 + 3
    assert lines[2] == f"  peer {peer.id}: 4 vector(s)"


def test_int_rings_the_vectors_asked_for(server: ServerProcess, peer: Peer) -> None:
    assert client(server, "-c", f"int {peer.id} 2").returncode == 0
    assert peer.wait(timeout=WAIT) == 2
    assert peer.wait(timeout=0) is None
    assert client(server, "-c", f"int {peer.id} all").returncode == 0
    assert rung(peer, VECTORS) == [0, 1, 2, 3]
    with connect(server.socket_path, vectors=VECTORS) as second:
        see(peer, lambda ids: second.id in ids)
        assert client(server, "-c", "int all").returncode == 0
        for p in (peer, second):
            assert rung(p, VECTORS) == [0, 1, 2, 3]
            assert p.wait(timeout=0) is None


def test_write_and_read_the_shared_memory(server: ServerProcess, peer: Peer) -> None:
    peer.memory[0x100:0x104] = b"\x01\x02AB"
    result = client(server, "-c", "write 0x10 hello world; write 4K hex:00ff41; read 0x100 4")
    assert result.returncode == 0, result.stderr
    assert bytes(peer.memory[0x10:0x1B]) == b"hello world"
    assert bytes(peer.memory[4096:4099]) == b"\x00\xffA"
    assert result.stdout.splitlines() == [
        "wrote 11 byte(s) at 0x10",
        "wrote 3 byte(s) at 0x1000",
        "00000100  01 02 41 42" + " " * 39 + "|..AB|",
    ]


@pytest.mark.parametrize(
    ("commands", "message"),
    [
        ("int 999 0", "peer 999 is not connected"),
        ("int {peer} 9", "vector 9 does not exist: peer {peer} has 4"),
        ("int {peer}", "usage: int PEER VECTOR"),
        ("read 1M 1", "outside the shared memory (0..0x100000, 1M)"),
        ("read x 1", "offset 'x' is not a number"),
        ("write 0 hex:zz", "not hex bytes"),
        ("wait 0 0.05", "no notification on vector 0 within 0.05 s"),
        ("frobnicate", "unknown command 'frobnicate'"),
    ],
)
def test_a_failing_command_stops_a_script_with_a_clear_message(
    server: ServerProcess, peer: Peer, commands: str, message: str
) -> None:
    result = client(server, "-c", f"{commands.format(peer=peer.id)}; write 0 not-reached")
    assert result.returncode == 1
    assert message.format(peer=peer.id) in result.stderr
    assert "not-reached" not in result.stdout
    assert bytes(peer.memory[0:11]) == bytes(11)


def test_wait_in_a_script_returns_when_rung(server: ServerProcess, peer: Peer) -> None:
    proc = subprocess.Popen(
        [*CLIENT, "-S", server.socket_path, "-c", "id; wait 3 10; read 0 2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        own = int(proc.stdout.readline())
        see(peer, lambda ids: own in ids)
        peer.memory[0:2] = b"ok"
        peer.notify(own, 3)
        out = proc.stdout.read()
        assert proc.wait(WAIT) == 0
        assert out.splitlines()[0] == "notification on vector 3"
        assert "|ok|" in out
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_piped_commands_and_events_printed_as_they_arrive(
    server: ServerProcess, peer: Peer, interactive: Callable[..., Interactive]
) -> None:
    cli = interactive()
    cli.send("id")
    own = int(cli.line())
    see(peer, lambda ids: own in ids)
    peer.notify(own, 1)  # no command pending: the client reports it by itself
    assert cli.line() == "notification on vector 1"
    with connect(server.socket_path, vectors=VECTORS) as newcomer:
        assert cli.line() == f"peer {newcomer.id} joined"
        newcomer.memory[8:11] = b"abc"
        cli.send(f"int {newcomer.id} 2; read 8 3")
        assert newcomer.wait(timeout=WAIT) == 2
        assert cli.line().endswith("|abc|")
        gone = newcomer.id
    assert cli.line() == f"peer {gone} left"
    cli.send("bogus")
    cli.send("dump")
    assert cli.line().startswith(f"own id {own},")
    code, err = cli.finish()
    assert code == 1  # a command failed
    assert "unknown command 'bogus'" in err


def test_int_with_our_own_id_rings_ourselves(
    server: ServerProcess, peer: Peer, interactive: Callable[..., Interactive]
) -> None:
    # As in QEMU's client: the server sends us the eventfds we receive on, so we can ring them.
    cli = interactive()
    cli.send("id")
    own = int(cli.line())
    cli.send(f"int {own} 2; wait 2 {WAIT}")
    assert cli.line() == "notification on vector 2"
    cli.send(f"int {own} all; wait all {WAIT}; int all")
    assert cli.line() == "notification on vector 0"  # the lowest pending first
    assert rung(peer, VECTORS) == [0, 1, 2, 3]  # int all: every other peer, not ourselves
    cli.send("id")  # the rest of our own vectors are pending: reported before it runs
    assert [cli.line() for _ in range(3)] == [
        "notification on vector 1",
        "notification on vector 2",
        "notification on vector 3",
    ]
    assert cli.line() == str(own)
    code, err = cli.finish()
    assert (code, err) == (0, "")
    assert peer.wait(timeout=0) is None  # int <own id> rang nobody else


def test_write_text_keeps_inner_spaces_and_hex_writes_the_rest(
    server: ServerProcess, peer: Peer
) -> None:
    result = client(server, "-c", "write 0   two  words  ; write 0x20 hex:203b20")
    assert result.returncode == 0, result.stderr
    assert bytes(peer.memory[0:11]) == b"two  words\0"
    assert bytes(peer.memory[0x20:0x23]) == b" ; "
    # An unquoted ';' ends the command: what follows is a command of its own.
    result = client(server, "-c", "write 0x40 a;b")
    assert result.returncode == 1
    assert "unknown command 'b'" in result.stderr
    assert bytes(peer.memory[0x40:0x42]) == b"a\0"


def run_on_a_terminal(server: ServerProcess, typed: bytes) -> tuple[int, str]:
    """A client whose stdin is a terminal (so it prompts and reports errors on stdout)."""
    master, slave = pty.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # nobody reads the echo
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        proc = subprocess.Popen(
            [*CLIENT, "-S", server.socket_path, "-n", str(VECTORS)],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(slave)
        slave = -1
        try:
            os.write(master, typed)
            out, err = proc.communicate(timeout=WAIT)
        finally:
            proc.kill()
            proc.wait()
        assert err == ""
        return proc.returncode, out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("ending", ["quit", "eof"])
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
@pytest.mark.parametrize("fail", [True, False], ids=["a-command-failed", "all-succeeded"])
def test_the_exit_status_says_whether_a_command_failed_however_the_client_ends(
    server: ServerProcess, ending: str, terminal: bool, fail: bool
) -> None:
    commands = "id\n" + ("bogus\n" if fail else "") + "id\n"
    if terminal:
        # A terminal's end of input is ^D at the start of a line.
        code, out = run_on_a_terminal(
            server, (commands + ("quit\n" if ending == "quit" else "\x04")).encode()
        )
        assert ("error: unknown command 'bogus'" in out) == fail
    else:
        result = client(server, input=commands + ("quit\n" if ending == "quit" else ""))
        code = result.returncode
        assert ("unknown command 'bogus'" in result.stderr) == fail
    assert code == (1 if fail else 0)


def test_the_client_exits_when_the_server_goes_away(short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="64K", vectors=VECTORS, check=False) as proc:
        cli = Interactive(proc)
        try:
            cli.send("id")
            int(cli.line())
            proc.kill()
            assert cli.proc.wait(WAIT) == 1
            assert cli.proc.stderr is not None
            assert b"disconnected" in cli.proc.stderr.read()
        finally:
            cli.kill()
        os.unlink(proc.socket_path)


def test_reconnect_option_survives_a_server_restart(short_tmp: Path) -> None:
    backing = ["--file", str(short_tmp / "region")]
    server = ServerProcess(short_tmp, size="64K", vectors=1, extra_args=backing).start()
    cli = Interactive(server, "--reconnect")
    try:
        cli.send("write 0 persists; id")
        assert cli.line() == "wrote 8 byte(s) at 0x0"
        assert cli.line() == "0"
        server.stop()
        server = ServerProcess(short_tmp, size="64K", vectors=1, extra_args=backing).start()
        assert cli.line() == "reconnected as peer 0 (was 0); memory kept"
        with connect(server.socket_path, vectors=1) as other:
            assert bytes(other.memory[0:8]) == b"persists"
            assert cli.line() == f"peer {other.id} joined"
            other.notify(0)
            assert cli.line() == "notification on vector 0"
        code, _ = cli.finish()
        assert code == 0
    finally:
        cli.kill()
        server.stop()


def test_no_server_is_a_clear_error(short_tmp: Path) -> None:
    result = subprocess.run(
        [*CLIENT, "-S", str(short_tmp / "none.sock"), "-c", "dump"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 1
    assert "no ivshmem server socket at" in result.stderr


def test_console_script_and_umbrella_command(server: ServerProcess, peer: Peer) -> None:
    bindir = Path(sys.executable).parent
    script = bindir / "ivshmem-client"
    assert script.exists(), "the ivshmem-client console script is not installed"
    for command in ([str(script)], [str(bindir / "ivshmem"), "client"]):
        result = subprocess.run(
            [*command, "-S", server.socket_path, "-c", f"int {peer.id} 1"],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert result.returncode == 0, result.stderr
        assert peer.wait(timeout=WAIT) == 1
    usage = subprocess.run([str(script), "-h"], capture_output=True, text=True, timeout=WAIT)
    assert usage.returncode == 0 and "int PEER VECTOR" in usage.stdout
    assert "hex:3b is ';'" in usage.stdout
    assert "exit status: 0 if every command succeeded, 1 if any failed" in usage.stdout


def test_helpers() -> None:
    assert split_commands("a; b\r\nc") == ["a", "b", "", "c"]
    assert list(hexdump(b"0123456789abcdefXY", 0x20)) == [
        "00000020  30 31 32 33 34 35 36 37  38 39 61 62 63 64 65 66  |0123456789abcdef|",
        "00000030  58 59" + " " * 45 + "|XY|",
    ]

"""``ivshmem-client`` (and ``ivshmem client``): a host peer you can type at, or script.

It speaks QEMU's ``ivshmem-client`` commands (``dump``, ``int PEER VECTOR``, ``int PEER all``,
``int all``, ``help``) and prints notifications, joins and leaves as they arrive. Unlike QEMU's
client it maps the shared memory, so it can also ``read`` and ``write`` bytes at an offset, and
it can ``wait`` for a notification, which makes it usable from shell scripts::

    ivshmem-client -S /tmp/ivshmem_socket -c "write 0 hello; int 1 0"
    ivshmem-client -S /tmp/ivshmem_socket -c "wait 0 10; read 0 16"
    printf 'dump\\nint all\\n' | ivshmem-client -S /tmp/ivshmem_socket

Commands are separated by newlines or ``;``. With ``-c`` they run in order and the first failing
one stops the client. Otherwise they are read from standard input until EOF (or ``quit``); a
failing command prints an error and the client goes on. The exit status is the same whichever
way the client was driven (``-c``, a pipe, a terminal) and ended (``quit``, EOF): 0 if every
command succeeded, 1 if any failed or the server could not be reached or went away. One rule for
all, so that a script driving a terminal session (expect, a pty) reads it like a piped one.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

from ..errors import ConnectionLostError, IvshmemError
from ..memory import format_size, parse_size
from ..peer import DEFAULT_TIMEOUT, Peer, Reconnected, connect

DEFAULT_SOCKET_PATH = "/tmp/ivshmem_socket"

HELP = """\
commands (separate several with ';'):
  dump                   show our id, vectors and fds, and every other peer
  id                     print our peer id
  int PEER VECTOR        notify one vector of a peer (our own id rings ourselves)
  int PEER all           notify every vector of a peer
  int all                notify every vector of every other peer
  read OFFSET LENGTH     hex and ASCII dump of the shared memory
  write OFFSET TEXT      write TEXT (UTF-8) at OFFSET: the rest of the command, inner
                         spaces kept; ';' ends the command and leading and trailing
                         spaces are dropped, so write those with hex: (hex:3b is ';')
  write OFFSET hex:BYTES write raw bytes, e.g. hex:48690a
  wait [VECTOR|all] [SECONDS]
                         wait for a notification not yet reported (fails on timeout)
  sleep SECONDS          keep reporting events for that long
  help                   this text
  quit                   leave
numbers: decimal, 0x hex, or with a K/M/G suffix (offsets and lengths)"""

EXIT_STATUS = """\
exit status: 0 if every command succeeded, 1 if any failed (with -c the first failure
stops the client) or the server could not be reached or went away; the same for -c,
piped and interactive input, ended by quit or by EOF."""


class CommandError(Exception):
    """A command that cannot be carried out; the message says why."""


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return parse_size(text)
    except IvshmemError:
        raise CommandError(f"{what} {text!r} is not a number (use 16, 0x10 or 4K)") from None


class Client:
    """Runs commands against a peer and reports events to ``out``."""

    def __init__(self, peer: Peer, out: TextIO) -> None:
        self.peer = peer
        self.out = out
        self.commands: dict[str, Callable[[list[str], str], None]] = {
            "help": self.cmd_help,
            "?": self.cmd_help,
            "dump": self.cmd_dump,
            "id": self.cmd_id,
            "int": self.cmd_int,
            "read": self.cmd_read,
            "write": self.cmd_write,
            "wait": self.cmd_wait,
            "sleep": self.cmd_sleep,
        }
        peer.on_peer_joined = lambda p: self.say(f"peer {p} joined")
        peer.on_peer_left = lambda p: self.say(f"peer {p} left")
        peer.on_reconnect = self._reconnected

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _reconnected(self, info: Reconnected) -> None:
        memory = "memory kept" if info.memory_kept else "the server has a new memory region"
        self.say(f"reconnected as peer {info.new_id} (was {info.old_id}); {memory}")

    # -- running ---------------------------------------------------------------------------

    def execute(self, command: str) -> bool:
        """Run one command; False for ``quit``. Raises CommandError."""
        words = command.split()
        if not words:
            return True
        name = words[0].lower()
        if name in ("quit", "exit", "q"):
            return False
        handler = self.commands.get(name)
        if handler is None:
            raise CommandError(f"unknown command {words[0]!r}: type help")
        try:
            handler(words[1:], command)
        except ConnectionLostError:
            raise
        except IvshmemError as err:
            raise CommandError(str(err)) from err
        return True

    def report_notifications(self) -> None:
        """Report every vector rung since the last report (non-blocking)."""
        while (vector := self.peer.wait(timeout=0)) is not None:
            self.say(f"notification on vector {vector}")

    # -- commands --------------------------------------------------------------------------

    def cmd_help(self, args: list[str], line: str) -> None:
        self.say(HELP)

    def cmd_id(self, args: list[str], line: str) -> None:
        self.say(str(self.peer.id))

    def cmd_dump(self, args: list[str], line: str) -> None:
        peer = self.peer
        others = sorted(peer.peers)
        self.say(
            f"own id {peer.id}, {peer.vectors} vector(s), region {format_size(peer.size)} "
            f"({peer.size} bytes), server {peer.socket_path}"
        )
        fds = " ".join(str(fd) for fd in peer.vector_fds)
        self.say(f"  own vector fds: {fds or '(none)'}")
        if not others:
            self.say("  no other peers")
        for other in others:
            self.say(f"  peer {other}: {peer.vectors_of(other)} vector(s)")

    def cmd_int(self, args: list[str], line: str) -> None:
        usage = "usage: int PEER VECTOR | int PEER all | int all"
        peer = self.peer
        if args == ["all"]:
            for other in sorted(peer.peers):
                for vector in range(peer.vectors_of(other)):
                    peer.notify(other, vector)
            return
        if len(args) != 2:
            raise CommandError(usage)
        target = _number(args[0], "peer")
        if args[1].lower() == "all":
            for vector in range(peer.vectors_of(target)):
                peer.notify(target, vector)
        else:
            peer.notify(target, _number(args[1], "vector"))

    def _span(self, offset: int, length: int) -> None:
        size = self.peer.size
        if offset < 0 or length < 0 or offset + length > size:
            raise CommandError(
                f"bytes {offset:#x}..{offset + length:#x} are outside the shared memory "
                f"(0..{size:#x}, {format_size(size)})"
            )

    def cmd_read(self, args: list[str], line: str) -> None:
        if len(args) != 2:
            raise CommandError("usage: read OFFSET LENGTH")
        offset, length = _number(args[0], "offset"), _number(args[1], "length")
        self._span(offset, length)
        data = bytes(self.peer.memory[offset : offset + length])
        for line_text in hexdump(data, offset):
            self.say(line_text)

    def cmd_write(self, args: list[str], line: str) -> None:
        words = line.split(None, 2)
        if len(words) < 3:
            raise CommandError("usage: write OFFSET TEXT  or  write OFFSET hex:BYTES")
        offset, text = _number(words[1], "offset"), words[2]
        if text.startswith("hex:"):
            try:
                data = bytes.fromhex(text[4:])
            except ValueError:
                raise CommandError(f"{text!r} is not hex bytes (e.g. hex:48690a)") from None
        else:
            data = text.encode()
        self._span(offset, len(data))
        self.peer.memory[offset : offset + len(data)] = data
        self.say(f"wrote {len(data)} byte(s) at {offset:#x}")

    def cmd_wait(self, args: list[str], line: str) -> None:
        vector: int | None = None
        timeout: float | None = None
        if len(args) > 2:
            raise CommandError("usage: wait [VECTOR|all] [SECONDS]")
        if args and args[0].lower() != "all":
            vector = _number(args[0], "vector")
        if len(args) == 2:
            try:
                timeout = float(args[1])
            except ValueError:
                raise CommandError(f"timeout {args[1]!r} is not a number of seconds") from None
        got = self.peer.wait(vector, timeout)
        if got is None:
            which = "any vector" if vector is None else f"vector {vector}"
            raise CommandError(f"no notification on {which} within {timeout} s")
        self.say(f"notification on vector {got}")

    def cmd_sleep(self, args: list[str], line: str) -> None:
        if len(args) != 1:
            raise CommandError("usage: sleep SECONDS")
        try:
            seconds = float(args[0])
        except ValueError:
            raise CommandError(f"{args[0]!r} is not a number of seconds") from None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            vector = self.peer.wait(timeout=left)
            if vector is not None:
                self.say(f"notification on vector {vector}")


def hexdump(data: bytes, offset: int = 0) -> Iterator[str]:
    """``hexdump -C`` style lines."""
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk[:8])
        if len(chunk) > 8:
            hexes += "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        yield f"{offset + start:08x}  {hexes:<48}  |{text}|"


def split_commands(text: str) -> list[str]:
    """QEMU's client splits on newlines, carriage returns and ';'."""
    return [c.strip() for c in text.replace("\r", "\n").replace(";", "\n").split("\n")]


# -- the two ways of running ---------------------------------------------------------------


def run_script(client: Client, commands: str) -> int:
    for command in split_commands(commands):
        try:
            if not client.execute(command):
                break
        except CommandError as err:
            print(f"ivshmem-client: {command}: {err}", file=sys.stderr)
            return 1
    return 0


def run_stdin(client: Client, stdin_fd: int, interactive: bool) -> int:
    """Commands from ``stdin_fd`` while reporting events, until EOF or quit."""
    peer = client.peer
    failed = False
    pending = b""

    def prompt() -> None:
        if interactive:
            print("cmd> ", end="", file=client.out, flush=True)

    if interactive:
        client.say(
            f"connected to {peer.socket_path} as peer {peer.id} ({peer.vectors} vector(s), "
            f"{format_size(peer.size)}); type help"
        )
    prompt()
    while True:
        poller = select.poll()
        poller.register(stdin_fd, select.POLLIN)
        watched: dict[int, int] = {}
        if peer.connected:
            for vector, fd in enumerate(peer.vector_fds):
                watched[fd] = vector
                poller.register(fd, select.POLLIN)
            poller.register(peer.server_fd, select.POLLIN)
        # While reconnecting, look again now and then (service() retries when due).
        events = poller.poll(None if peer.connected else 200)
        if not peer.connected or any(fd not in watched and fd != stdin_fd for fd, _ in events):
            peer.service()
        if any(fd in watched for fd, _ in events):
            client.report_notifications()
        if not any(fd == stdin_fd for fd, _ in events):
            continue
        data = os.read(stdin_fd, 65536)
        if not data:
            # EOF: a last partial line is still a command.
            commands, pending = [pending.decode(errors="replace")], b""
        else:
            pending += data
            *lines, pending = pending.split(b"\n")
            commands = [line.decode(errors="replace") for line in lines]
        for text in commands:
            for command in split_commands(text):
                try:
                    if not client.execute(command):
                        return 1 if failed else 0
                except CommandError as err:
                    failed = True
                    print(f"error: {err}", file=sys.stderr if not interactive else client.out)
            if text:
                prompt()
        if not data:
            return 1 if failed else 0  # as for quit: see the module docstring


# -- argument parsing ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-S",
        dest="socket_path",
        metavar="PATH",
        default=DEFAULT_SOCKET_PATH,
        help=f"Unix socket of the server (default {DEFAULT_SOCKET_PATH})",
    )
    parser.add_argument(
        "-v", dest="client_verbose", action="store_true", help="verbose: log debug messages"
    )
    parser.add_argument(
        "-c",
        dest="commands",
        metavar="COMMANDS",
        help="run these commands (separated by ';') and exit, instead of reading stdin",
    )
    parser.add_argument(
        "-n",
        dest="vectors",
        metavar="N",
        type=int,
        help="vectors the server gives each peer (its -n); learnt from the server if omitted",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for connecting and the handshake (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="reconnect when the server restarts (a new peer id), instead of exiting",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem-client",
        description="Connect to an ivshmem server as a host peer: ring and receive doorbells,\n"
        "read and write the shared memory (QEMU's ivshmem-client commands, and more).",
        epilog=f"{HELP}\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "client",
        help="an interactive or scripted host peer (QEMU's ivshmem-client commands)",
        description=build_parser().description,
        epilog=f"{HELP}\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace, stdin_fd: int | None = None) -> int:
    logging.getLogger("ivshmem").setLevel(logging.DEBUG if args.client_verbose else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="ivshmem-client: %(levelname)s: %(message)s")
    try:
        peer = connect(
            args.socket_path, timeout=args.timeout, vectors=args.vectors, reconnect=args.reconnect
        )
    except IvshmemError as err:
        print(f"ivshmem-client: error: {err}", file=sys.stderr)
        return 1
    with peer:
        client = Client(peer, sys.stdout)
        try:
            if args.commands is not None:
                return run_script(client, args.commands)
            fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
            return run_stdin(client, fd, os.isatty(fd))
        except ConnectionLostError as err:
            print(f"ivshmem-client: disconnected: {err}", file=sys.stderr)
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Our output was closed (e.g. piped into head): nothing more to say.
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""One running guest: its QEMU command line, its process, the threads that read its channels,
and the result it leaves.

A guest has four channels to the host:

* ``ttyS0``, the kernel console: boot noise, written by QEMU to ``console.log`` in the guest's
  job directory and read only when the guest is gone (it is for debugging failures);
* ``ttyS1``, the program's stdout and stderr, through a pipe: echoed live, line by line;
* ``ttyS2``, the control channel of the guest's init (``start UPTIME``, ``exit N``,
  ``error MESSAGE``), through a pipe: this is how the exit status comes back;
* QEMU's own stdout and stderr (``could not connect to the server`` and the like).

QEMU gets the pipes' write ends as inherited fds that its ``file`` chardev opens through
``/proc/self/fd/N`` (7.2 refuses a pipe in ``/dev/fdset``). Reading them needs no polling: each
reader thread sees EOF when QEMU exits.

QEMU is always killed and reaped: by :meth:`Guest.wait` at its deadline, by :meth:`Guest.kill`,
by the watchdog timer when nobody waits, by the :class:`~ivshmem.lab.Lab` that owns it on
close, and by the kernel (``PR_SET_PDEATHSIG``) if this whole process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from ..errors import IvshmemError, UsageError
from ..memory import format_size, is_power_of_two, parse_size, round_up_power_of_two
from .errors import GuestError, GuestTimeoutError, LabError, LabSetupError, LabUsageError

__all__ = [
    "DEVICE_KINDS",
    "DeviceKind",
    "Doorbell",
    "Guest",
    "GuestResult",
    "PlainRegion",
    "VfioUser",
]

log = logging.getLogger(__name__)

# Lines kept from the console and QEMU's log in error messages.
_TAIL_LINES = 15


#: Seconds a server's status socket gets to answer. A server on a loaded machine can take
#: seconds; only one that hangs takes this long.
STATUS_TIMEOUT = 30.0


def server_status(socket_path: str, timeout: float = STATUS_TIMEOUT) -> dict[str, Any] | None:
    """The JSON status of the ivshmem server listening at ``socket_path``, read from its status
    socket (``SOCKET.status``, see ``ivshmem-server --status``); None when it has none (QEMU's
    own server, or ours with ``--status-socket ''``) or does not answer within ``timeout``."""
    from ..server import query_status, status_path_for

    status_path = status_path_for(socket_path)
    if not Path(status_path).is_socket():
        return None
    try:
        return query_status(status_path, timeout=timeout)
    except IvshmemError:
        return None


def _check_vectors(path: str, vectors: int) -> None:
    """Refuse a doorbell whose vector count differs from the server's ``-n``.

    QEMU does not: with fewer vectors than the server's it logs "Too many eventfd received"
    and drops the rest, so peers ring vectors the guest never sees; with more, the guest's
    ``vectors`` counts vectors that nobody can ring. Both start and exit 0, silently."""
    status = server_status(path)
    if status is None:
        log.warning(
            "cannot check the vector count against the server at %s: it has no status socket "
            "(%s.status); make sure its -n is %d",
            path,
            path,
            vectors,
        )
        return
    server_vectors = status.get("vectors")
    if type(server_vectors) is not int or server_vectors == vectors:
        return
    if vectors < server_vectors:
        effect = (
            f"QEMU would take only {vectors} and log 'Too many eventfd received': rings of "
            f"vectors {vectors}..{server_vectors - 1} from other peers would be lost"
        )
    else:
        effect = (
            f"the guest would see {vectors} vectors, but no peer can ring vectors "
            f"{server_vectors}..{vectors - 1}: those rings would vanish"
        )
    raise LabUsageError(
        f"the ivshmem server at {path} gives every peer {server_vectors} vector(s) (-n "
        f"{server_vectors}), but this guest's ivshmem-doorbell asks for {vectors}: {effect}; "
        f"use vectors={server_vectors} (ivshmem lab run --vectors {server_vectors})"
    )


#: Which ivshmem device a guest gets: QEMU's own (``ivshmem-doorbell``/``ivshmem-plain``) or
#: this project's, served over vfio-user by an ``ivshmem-device`` process (QEMU >= 10.1).
DeviceKind = Literal["qemu", "vfio-user"]
DEVICE_KINDS: tuple[DeviceKind, ...] = ("qemu", "vfio-user")


@dataclass(frozen=True)
class Doorbell:
    """An ivshmem device with doorbells, connected to a server's Unix socket: QEMU's
    ``ivshmem-doorbell`` (``device="qemu"``) or this project's (``device="vfio-user"``, for
    which the lab starts an ``ivshmem-device`` process; ``device_args`` are passed to it,
    e.g. ``("--intx",)``)."""

    socket: str | os.PathLike[str]
    vectors: int = 1
    device: DeviceKind = "qemu"
    device_args: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class PlainRegion:
    """An ivshmem device without doorbells over a shared file (e.g. under ``/dev/shm``):
    QEMU's ``ivshmem-plain`` or this project's in plain mode (``device="vfio-user"``);
    ``size`` is the file's size when not given, and must be a power of two (it becomes a PCI
    BAR)."""

    path: str | os.PathLike[str]
    size: int | str | None = None
    device: DeviceKind = "qemu"
    device_args: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class VfioUser:
    """This project's ivshmem device, already served over vfio-user at ``socket`` (by an
    ``ivshmem-device`` process of your own). Needs QEMU >= 10.1."""

    socket: str | os.PathLike[str]


Device = Doorbell | PlainRegion | VfioUser


def _same(path: str) -> str:
    return path


def _escape(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return value.replace(",", ",,")


def device_arguments(
    devices: Sequence[Device], path_in_qemu: Callable[[str], str] = _same
) -> list[str]:
    """QEMU arguments for ``devices``, validated (socket present, size a power of two).

    ``path_in_qemu`` rewrites host paths for a QEMU that sees the host's files elsewhere (the
    QEMU 11 chroot). Devices of kind ``"vfio-user"`` must have been turned into
    :class:`VfioUser` sockets first (the lab starts their ``ivshmem-device``).
    """
    args: list[str] = []
    for i, device in enumerate(devices):
        ident = f"ivshmem{i}"
        if isinstance(device, VfioUser):
            path = os.path.abspath(os.fspath(device.socket))
            if not Path(path).is_socket():
                raise LabUsageError(
                    f"no vfio-user socket at {path}: start the device first "
                    f"(ivshmem-device ... {path})"
                )
            spec = {
                "driver": "vfio-user-pci",
                "id": ident,
                "socket": {"type": "unix", "path": path_in_qemu(path)},
            }
            args += ["-device", json.dumps(spec, separators=(",", ":"))]
            continue
        if device.device != "qemu":
            raise LabUsageError(
                f"{device!r}: this project's device is served by an ivshmem-device process "
                "the lab starts (Lab.start does it); device_arguments takes its VfioUser socket"
            )
        if isinstance(device, Doorbell):
            path = _check_doorbell(device)
            _check_vectors(path, device.vectors)
            args += ["-chardev", f"socket,id={ident},path={_escape(path_in_qemu(path))}"]
            args += ["-device", f"ivshmem-doorbell,chardev={ident},vectors={device.vectors}"]
        elif isinstance(device, PlainRegion):
            path = os.fspath(device.path)
            size = _plain_size(path, device.size)
            args += [
                "-object",
                f"memory-backend-file,id={ident},share=on,"
                f"mem-path={_escape(path_in_qemu(os.path.abspath(path)))},size={size}",
            ]
            args += ["-device", f"ivshmem-plain,memdev={ident}"]
        else:
            raise LabUsageError(f"not an ivshmem device description: {device!r}")
    return args


def _check_doorbell(device: Doorbell) -> str:
    """The server socket of ``device`` (it must exist) after checking its vector count."""
    path = os.fspath(device.socket)
    if not Path(path).is_socket():
        raise LabUsageError(
            f"no ivshmem server socket at {path}: start the server first "
            f"(ivshmem-server -F -S {path} ...)"
        )
    if (
        isinstance(device.vectors, bool)
        or not isinstance(device.vectors, int)
        or not 1 <= device.vectors <= 1024
    ):
        raise LabUsageError(f"vectors must be 1..1024, got {device.vectors!r}")
    return path


def _plain_size(path: str, size: int | str | None) -> int:
    if size is None:
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError as err:
            raise LabUsageError(
                f"shared file {path} does not exist: create it, or give a size"
            ) from err
        if actual == 0:
            raise LabUsageError(f"shared file {path} is empty: give it a size first")
        size = actual
    try:
        value = parse_size(size)
    except UsageError as err:
        raise LabUsageError(f"ivshmem-plain region {path}: {err}") from err
    if not is_power_of_two(value):
        raise LabUsageError(
            f"ivshmem-plain region {path} is {value} bytes; its size becomes a PCI BAR and "
            f"must be a power of two (e.g. {format_size(round_up_power_of_two(max(value, 4096)))})"
        )
    return value


@dataclass(frozen=True)
class GuestResult:
    """What one guest left behind."""

    name: str
    #: The program's exit status (128+N if killed by signal N); None if it never finished.
    returncode: int | None
    #: The program's stdout and stderr, merged as on a terminal.
    output: str
    #: The kernel console (boot messages, init's complaints).
    console: str
    #: QEMU's own messages.
    qemu_log: str
    #: Why the program did not run to the end, if it did not.
    error: str | None
    timed_out: bool
    #: Seconds from starting QEMU to the program starting (None if it never started).
    boot_seconds: float | None
    #: Seconds the program ran (None if it did not finish).
    program_seconds: float | None
    #: Seconds from starting QEMU to QEMU exiting (its pipes closing), however much later the
    #: guest was waited for.
    wall_seconds: float
    #: What this project's device processes serving the guest (``ivshmem-device``) logged, the
    #: last lines of each under a ``--- ivshmem-device NAME ---`` line; "" when it has none.
    device_log: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def qemu_warnings(self) -> tuple[str, ...]:
        """What QEMU itself said, line by line (in the lab it says nothing unless something is
        wrong: "Too many eventfd received", a chardev that cannot connect...)."""
        return tuple(line.strip() for line in self.qemu_log.splitlines() if line.strip())

    def describe(self) -> str:
        """A multi-line explanation for error messages: status, then the logs' tails."""
        if self.timed_out:
            head = f"guest {self.name} timed out after {self.wall_seconds:.1f} s and was killed"
        elif self.returncode is None:
            head = f"guest {self.name} failed: {self.error or 'it stopped before its program'}"
        else:
            head = f"guest {self.name}: program exited with status {self.returncode}"
        parts = [head]
        for label, text in (
            ("program output", self.output),
            ("QEMU", self.qemu_log),
            ("console", self.console),
        ):
            lines = text.strip().splitlines()[-_TAIL_LINES:]
            if lines:
                parts.append(f"--- {label} (last lines) ---\n" + "\n".join(lines))
        if self.device_log.strip():
            parts.append(self.device_log.strip())  # already cut to the last lines, per process
        return "\n".join(parts)

    def check(self) -> GuestResult:
        """Return self if the program exited with status 0, else raise :class:`GuestError`."""
        if not self.ok:
            raise GuestError(self.describe(), self)
        return self


# PR_SET_PDEATHSIG (linux/prctl.h): the kernel kills QEMU when the thread that forked it
# ends. Guests are therefore forked from one long-lived thread per Lab (see lab.py), never from
# a caller's short-lived thread.
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _die_with_parent() -> None:  # runs in the child between fork and exec: keep it tiny
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_qemu(argv: Sequence[str], pass_fds: Sequence[int]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds),
            start_new_session=True,  # Ctrl-C reaches us, and we decide QEMU's fate
            preexec_fn=_die_with_parent,
        )
    except OSError as err:
        raise LabSetupError(f"cannot start {argv[0]}: {err.strerror}") from err


class _Output:
    """Accumulates one pipe's bytes; optionally echoes complete lines with a prefix."""

    def __init__(
        self, echo: IO[str] | None, prefix: str, lock: threading.Lock, changed: threading.Condition
    ) -> None:
        self._echo = echo
        self._prefix = prefix
        self._echo_lock = lock
        self._changed = changed
        self._data = bytearray()
        self._echoed = 0

    def feed(self, chunk: bytes) -> None:
        with self._changed:
            self._data.extend(chunk)
            self._changed.notify_all()
        if self._echo is not None:
            end = self._data.rfind(b"\n") + 1
            if end > self._echoed:
                self._write(bytes(self._data[self._echoed : end]))
                self._echoed = end

    def finish(self) -> None:
        if self._echo is not None and self._echoed < len(self._data):
            self._write(bytes(self._data[self._echoed :]) + b"\n")
            self._echoed = len(self._data)

    def _write(self, block: bytes) -> None:
        assert self._echo is not None
        text = block.decode("utf-8", "replace")
        if self._prefix:
            text = "".join(self._prefix + line for line in text.splitlines(keepends=True))
        with self._echo_lock, contextlib.suppress(OSError, ValueError):
            self._echo.write(text)
            self._echo.flush()

    def text(self) -> str:
        with self._changed:
            return self._data.decode("utf-8", "replace")


_ECHO_LOCK = threading.Lock()

# Longest single wait for QEMU in Guest.wait (see Guest._reap).
_WAIT_SLICE = 1.0


class Guest:
    """A running guest. Created by :meth:`ivshmem.lab.Lab.start`; use :meth:`wait` for its
    :class:`GuestResult`. ``pid`` is QEMU's process id, :meth:`peer_id` the peer id its
    server assigned (known as soon as QEMU has connected, before the guest boots)."""

    def __init__(
        self,
        name: str,
        command: Callable[[int, int], Sequence[str]],
        job_dir: Path,
        spawn: Callable[[Sequence[str], Sequence[int]], subprocess.Popen[bytes]],
        *,
        timeout: float | None,
        echo: IO[str] | None,
        prefix: str,
        devices: Sequence[Device] = (),
        on_exit: Callable[[], None] | None = None,
        device_log: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.job_dir = job_dir
        #: The ivshmem devices of this guest, in PCI order.
        self.devices: tuple[Device, ...] = tuple(devices)
        # Called once, from a reader thread, when QEMU has exited (this project's device
        # processes of the guest are stopped there, as QEMU's own device ends with QEMU).
        self._on_exit = on_exit
        # The last lines its device processes logged, read when the result is made.
        self._device_log = device_log
        self._changed = threading.Condition()
        self._output = _Output(echo, prefix, _ECHO_LOCK, self._changed)
        self._qemu_log = _Output(None, "", _ECHO_LOCK, threading.Condition())
        self._returncode: int | None = None
        self._error: str | None = None
        self._timed_out = False
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._exited_at: float | None = None
        self._result: GuestResult | None = None
        self._lock = threading.Lock()

        out_r, out_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        try:
            #: QEMU's command line (``command(output_fd, control_fd)``)
            self.argv: tuple[str, ...] = tuple(command(out_w, ctl_w))
            self._t0 = time.monotonic()
            self._proc = spawn(self.argv, (out_w, ctl_w))
        except BaseException:
            for fd in (out_r, out_w, ctl_r, ctl_w):
                os.close(fd)
            raise
        # Only QEMU holds the write ends now, so each reader sees EOF when QEMU exits.
        os.close(out_w)
        os.close(ctl_w)
        #: QEMU's process id (the process that connects to the servers).
        self.pid: int = self._proc.pid
        assert self._proc.stdout is not None
        self._open_pipes = 3
        self._threads = [
            threading.Thread(target=self._pump, args=(out_r, self._output.feed), daemon=True),
            threading.Thread(target=self._read_control, args=(ctl_r,), daemon=True),
            threading.Thread(
                target=self._pump,
                args=(os.dup(self._proc.stdout.fileno()), self._qemu_log.feed),
                daemon=True,
            ),
        ]
        self._proc.stdout.close()
        for thread in self._threads:
            thread.start()
        self._watchdog: threading.Timer | None = None
        if timeout is not None:
            self._watchdog = threading.Timer(timeout, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    # -- reader threads ---------------------------------------------------------------------

    def _pump(self, fd: int, sink: Callable[[bytes], None]) -> None:
        try:
            while chunk := os.read(fd, 65536):
                sink(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)
            self._pipe_closed()

    def _pipe_closed(self) -> None:
        # Only QEMU holds the write ends, so the last of its pipes to reach EOF marks its exit:
        # a guest's wall time ends there, not whenever someone gets round to wait() or close().
        with self._changed:
            self._open_pipes -= 1
            exited = self._open_pipes == 0
            if exited:
                self._exited_at = time.monotonic()
        if exited and self._on_exit is not None:
            with contextlib.suppress(Exception):  # a reader thread has no one to report to
                self._on_exit()

    def _read_control(self, fd: int) -> None:
        buffer = b""

        def handle(line: str) -> None:
            word, _, rest = line.strip().partition(" ")
            with self._changed:
                if word == "start":
                    self._started_at = time.monotonic()
                elif word == "exit":
                    self._ended_at = time.monotonic()
                    with contextlib.suppress(ValueError):
                        self._returncode = int(rest)
                elif word == "error":
                    self._error = rest
                self._changed.notify_all()

        def feed(chunk: bytes) -> None:
            nonlocal buffer
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                handle(line.decode("utf-8", "replace"))

        self._pump(fd, feed)
        if buffer:
            handle(buffer.decode("utf-8", "replace"))

    # -- state -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def output(self) -> str:
        """The program's output so far."""
        return self._output.text()

    @property
    def boot_seconds(self) -> float | None:
        """Seconds from starting QEMU to the program starting, once it has started."""
        with self._changed:
            return None if self._started_at is None else self._started_at - self._t0

    def peer_ids(self, timeout: float = 30.0) -> tuple[int, ...]:
        """The peer id each of this guest's ivshmem-doorbell devices got from its server, in
        device order: the id a host peer sees join, and the guest reads as IVPosition.

        Learnt from each server's status socket (our server's default ``SOCKET.status``),
        which lists every peer with the pid the kernel reported for its connection
        (SO_PEERCRED): the peers whose pid is QEMU's are this guest's. This needs no help
        from the guest and none from QEMU (7.2 has no monitor command for IVPosition), and
        cannot be confused by other guests starting at the same time. QEMU connects while it
        starts, before the guest boots; this waits up to ``timeout`` seconds for that.
        Raises :class:`LabUsageError` (no doorbell, or a server without a status socket) and
        :class:`LabError` (QEMU exited or did not connect in time).
        """
        from ..server import status_path_for

        sockets = [os.fspath(d.socket) for d in self.devices if isinstance(d, Doorbell)]
        if not sockets:
            raise LabUsageError(f"guest {self.name} has no ivshmem-doorbell device: no peer id")
        wanted = Counter(sockets)
        deadline = time.monotonic() + timeout
        while True:
            found: dict[str, list[int]] = {}
            for path in wanted:
                status = server_status(path, max(1.0, deadline - time.monotonic()))
                if status is None and Path(status_path_for(path)).is_socket():
                    raise LabError(
                        f"the server at {path} did not answer on its status socket "
                        f"({path}.status) within {timeout:g} s: is it hung or stopped?"
                    )
                if status is None:
                    raise LabUsageError(
                        f"the server at {path} has no status socket ({path}.status), so the "
                        "lab cannot learn which peer id it gave this guest: run ivshmem-server "
                        "with its status socket (the default)"
                    )
                peers = status.get("peers")
                found[path] = sorted(
                    p["id"]
                    for p in (peers if isinstance(peers, list) else [])
                    if isinstance(p, dict) and p.get("pid") == self.pid and type(p.get("id")) is int
                )
            if all(len(found[path]) >= n for path, n in wanted.items()):
                # A QEMU with two doorbells on one server connects them in device order, and
                # a server hands out increasing ids: the lowest belongs to the first device.
                iters = {path: iter(ids) for path, ids in found.items()}
                return tuple(next(iters[path]) for path in sockets)
            if not self.running:
                raise LabError(
                    f"guest {self.name}: QEMU (pid {self.pid}) exited without holding a peer id "
                    "on every server"
                )
            if time.monotonic() >= deadline:
                raise LabError(
                    f"guest {self.name}: QEMU (pid {self.pid}) is not among the peers of "
                    f"{', '.join(wanted)} after {timeout:g} s"
                )
            time.sleep(0.05)

    def peer_id(self, timeout: float = 30.0) -> int:
        """The peer id of this guest's only ivshmem-doorbell device (see :meth:`peer_ids`)."""
        ids = self.peer_ids(timeout)
        if len(ids) != 1:
            raise LabUsageError(
                f"guest {self.name} has {len(ids)} ivshmem-doorbell devices: use peer_ids()"
            )
        return ids[0]

    def wait_for_output(self, text: str, timeout: float) -> str:
        """Block until the program's output contains ``text``; return the output so far.

        Raises :class:`GuestError` if the guest ends first and :class:`GuestTimeoutError`
        (killing the guest) if ``timeout`` passes: for host code that must not act before the
        guest is ready.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                current = self._output.text()
                if text in current:
                    return current
                if self._proc.poll() is not None and not self._threads[0].is_alive():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Woken by new output; the short cap notices QEMU exiting without output.
                self._changed.wait(min(remaining, 0.2))
        if self._proc.poll() is None:
            self._expire()
            self._proc.wait()
            result = self._finish()
            raise GuestTimeoutError(
                f"guest {self.name} did not print {text!r} within {timeout} s\n{result.describe()}",
                result,
            )
        self._proc.wait()
        result = self._finish()
        raise GuestError(
            f"guest {self.name} ended before printing {text!r}\n{result.describe()}", result
        )

    # -- ending ----------------------------------------------------------------------------

    def _expire(self) -> None:
        if self._proc.poll() is None:
            self._timed_out = True
            self.kill()

    def kill(self) -> None:
        """Kill QEMU now (the guest gets no chance to clean up: it is throw-away)."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to power off and return its result.

        After ``timeout`` seconds (or the deadline given to ``start``) the guest is killed and
        :class:`GuestTimeoutError` raised. :class:`GuestError` means the program never ran to
        its end (QEMU refused to start, init failed, the kernel crashed); a program that ran
        and failed is a normal result: see :meth:`GuestResult.check`.
        """
        try:
            self._reap(timeout)
        except subprocess.TimeoutExpired:
            self._expire()
            self._proc.wait()
        result = self._finish()
        if result.timed_out:
            raise GuestTimeoutError(result.describe(), result)
        if result.returncode is None:
            raise GuestError(result.describe(), result)
        return result

    def _reap(self, timeout: float | None) -> None:
        """Wait for QEMU to exit, in slices: raise TimeoutExpired after ``timeout`` seconds.

        Never one blocking ``waitpid``: Ctrl-C and SIGTERM become exceptions only when the
        main thread runs Python code, and the kernel may hand a signal sent to the process to
        any of its threads (the reader threads here). The main thread's ``waitpid`` is then
        restarted, not interrupted, and would sleep until the guest ends. Popen's wait with a
        timeout polls, so a signal taken by another thread is acted on within a poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = (
                _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
            )
            try:
                self._proc.wait(max(step, 0.0))
                return
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    async def wait_async(self, timeout: float | None = None) -> GuestResult:
        """:meth:`wait` for asyncio code (in a worker thread; the event loop keeps running)."""
        return await asyncio.to_thread(self.wait, timeout)

    @property
    def result(self) -> GuestResult | None:
        """The result once the guest has been waited for (or closed), else None."""
        return self._result

    def _finish(self) -> GuestResult:
        with self._lock:
            if self._result is not None:
                return self._result
            if self._watchdog is not None:
                self._watchdog.cancel()
            for thread in self._threads:
                thread.join(10.0)
            with self._changed:
                exited = self._exited_at
            # A reader still stuck after 10 s (a grandchild inherited a pipe?): QEMU itself has
            # been reaped by now, so this moment is an upper bound.
            wall = (exited if exited is not None else time.monotonic()) - self._t0
            self._output.finish()
            try:
                console = (self.job_dir / "console.log").read_bytes().decode("utf-8", "replace")
            except OSError:
                console = ""
            qemu_log = self._qemu_log.text()
            device_log = self._device_log() if self._device_log is not None else ""
            error = self._error
            if self._returncode is None and error is None and not self._timed_out:
                status = self._proc.returncode
                error = (
                    f"QEMU exited with status {status} before the program finished"
                    if status
                    else "the guest powered off before its program finished"
                )
            self._result = GuestResult(
                name=self.name,
                returncode=None if self._timed_out else self._returncode,
                output=self._output.text(),
                console=console,
                qemu_log=qemu_log,
                error=error,
                timed_out=self._timed_out,
                boot_seconds=self.boot_seconds,
                program_seconds=(
                    self._ended_at - self._started_at
                    if self._ended_at is not None and self._started_at is not None
                    else None
                ),
                wall_seconds=wall,
                device_log=device_log,
            )
            return self._result

    def close(self) -> None:
        """Kill (if still running) and reap QEMU, and stop the reader threads."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(30)
        self._finish()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited ({self._proc.returncode})"
        return f"<Guest {self.name} pid={self.pid} {state}>"

"""The ``ivshmem-device`` processes a lab starts for guests that get this project's device.

One process per device of a guest, serving one vfio-user socket in the lab's temporary
directory; it is started (and listening) before the guest's QEMU and stopped when that QEMU
has exited (so the guest leaves the server then, as with QEMU's own device, whose QEMU is the
peer), or when the lab closes. Never before QEMU exits: QEMU would see its device vanish (BAR0
reads 0xffffffff). Its output goes to ``<name>.log`` next to the socket; the last lines of a
guest's device logs end its error messages (:attr:`GuestResult.device_log`), after QEMU's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LabSetupError, LabUsageError
from .guest import (
    Device,
    Doorbell,
    PlainRegion,
    VfioUser,
    _check_doorbell,
    _die_with_parent,
    _plain_size,
)

__all__ = ["DeviceHosts", "check_device", "device_command", "shared_command"]

#: Seconds a device process gets to open its socket (it is a Python start-up, on a loaded box).
START_TIMEOUT = 60.0


def check_device(device: Device) -> None:
    """Refuse bad inputs of this project's devices before anything starts."""
    if isinstance(device, VfioUser):
        return  # device_arguments checks the socket
    if device.device == "qemu":
        return
    if isinstance(device, Doorbell):
        _check_doorbell(device)
    elif isinstance(device, PlainRegion):
        _plain_size(os.fspath(device.path), device.size)


def device_command(device: Doorbell | PlainRegion, socket: str) -> list[str]:
    """The ``ivshmem-device`` command line serving ``device`` at ``socket``."""
    argv = [sys.executable, "-m", "ivshmem.cli.device", "--socket", socket]
    if isinstance(device, Doorbell):
        argv += ["--server", os.path.abspath(os.fspath(device.socket))]
        argv += ["--vectors", str(device.vectors)]
    else:
        path = os.path.abspath(os.fspath(device.path))
        argv += ["--plain", "--region", path, "--size", str(_plain_size(path, device.size))]
    return [*argv, *device.device_args]


def _vm_field(value: str) -> str:
    if "," in value or "=" in value:
        raise LabUsageError(
            f"{value!r} has a ',' or '=', which ivshmem-device's --vm KEY=VALUE list cannot "
            "carry: use another path"
        )
    return value


def shared_command(devices: Sequence[Doorbell], sockets: Sequence[str]) -> list[str]:
    """One ``ivshmem-device`` command line serving each of ``devices`` at its socket
    (``--vm``); of the device options, ``--intx`` and ``--event-vector N`` carry over."""
    argv = [sys.executable, "-m", "ivshmem.cli.device"]
    for device, socket in zip(devices, sockets, strict=True):
        if not isinstance(device, Doorbell) or device.device != "vfio-user":
            raise LabUsageError(
                f"one device process serves Doorbell(..., 'vfio-user') devices, not {device!r}"
            )
        fields = [
            f"socket={_vm_field(socket)}",
            f"server={_vm_field(os.path.abspath(os.fspath(device.socket)))}",
            f"vectors={device.vectors}",
        ]
        options = list(device.device_args)
        while options:
            option = options.pop(0)
            if option == "--intx":
                fields.append("intx=1")
            elif option == "--event-vector" and options:
                fields.append(f"event-vector={int(options.pop(0))}")
            else:
                raise LabUsageError(
                    f"device option {option!r} cannot be given to a device process serving "
                    "several guests (only --intx and --event-vector N)"
                )
        argv += ["--vm", ",".join(fields)]
    return argv


@dataclass
class _Process:
    proc: subprocess.Popen[bytes]
    name: str
    log: Path
    sockets: frozenset[str]
    #: Guests whose QEMU uses it now; every guest that ever did (their errors show its log).
    users: set[str] = field(default_factory=set)
    served: set[str] = field(default_factory=set)


class DeviceHosts:
    """The lab's device processes, all under ``directory``."""

    def __init__(self, directory: Path, launch: Callable[[Callable[[], object]], object]) -> None:
        # ``launch`` runs a function in the lab's long-lived spawning thread: PR_SET_PDEATHSIG
        # follows the thread that forked, and a device must not die with a caller's thread.
        self._dir = directory
        self._launch = launch
        self._procs: list[_Process] = []  # running, or not yet reaped
        self._all: list[_Process] = []  # every one started (for logs, kept after it stops)
        self._lock = threading.Lock()
        self._started: list[int] = []

    def serve(self, device: Device, name: str) -> VfioUser:
        """Start a device process for ``device``; return its socket once it listens."""
        if isinstance(device, VfioUser):
            return device
        self._dir.mkdir(exist_ok=True)
        socket = self._dir / f"{name}.sock"
        self._start(device_command(device, str(socket)), name, self._dir, [socket])
        return VfioUser(socket)

    def serve_shared(self, devices: Sequence[Doorbell], name: str) -> list[VfioUser]:
        """Start one device process serving every one of ``devices`` (one socket each, for
        one guest each); return the sockets once all listen. It stops when the last guest
        that used it has exited (or with the lab)."""
        if not devices:
            raise LabUsageError("a device process needs at least one device to serve")
        for device in devices:
            check_device(device)
        # A directory of their own: a guest's device names (<guest>-<n>) never clash with them.
        where = self._dir / "shared"
        where.mkdir(parents=True, exist_ok=True)
        sockets = [where / f"{name}-{i}.sock" for i in range(len(devices))]
        self._start(shared_command(devices, [str(s) for s in sockets]), name, where, sockets)
        return [VfioUser(s) for s in sockets]

    def attach(self, guest: str, devices: Sequence[Device]) -> None:
        """``guest``'s QEMU uses these devices: the processes serving them stay until it has
        exited, and its error messages show their logs."""
        paths = {os.fspath(d.socket) for d in devices if isinstance(d, VfioUser)}
        with self._lock:
            for entry in self._procs:
                if entry.sockets & paths:
                    entry.users.add(guest)
                    entry.served.add(guest)

    def _start(self, argv: list[str], name: str, where: Path, sockets: list[Path]) -> None:
        log_path = where / f"{name}.log"
        if log_path.exists():
            raise LabUsageError(f"a device process named {name!r} was started already")
        with open(log_path, "wb") as log:

            def start() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches the lab, which stops it
                    preexec_fn=_die_with_parent,  # and it dies with the lab's process
                )

            try:
                proc = self._launch(start)
            except OSError as err:
                raise LabSetupError(f"cannot start ivshmem-device: {err.strerror}") from err
        assert isinstance(proc, subprocess.Popen)
        entry = _Process(proc, name, log_path, frozenset(str(s) for s in sockets))
        with self._lock:
            self._procs.append(entry)
            self._all.append(entry)
            self._started.append(proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        for socket in sockets:
            while not socket.is_socket():
                if proc.poll() is not None:
                    raise LabSetupError(
                        f"ivshmem-device for {name} exited with status {proc.returncode} "
                        f"before listening on {socket}:\n{_tail(log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise LabSetupError(
                        f"ivshmem-device for {name} did not listen on {socket} within "
                        f"{START_TIMEOUT:.0f} s:\n{_tail(log_path)}"
                    )
                time.sleep(0.02)

    @property
    def pids(self) -> list[int]:
        """Every device process started, running or not."""
        with self._lock:
            return list(self._started)

    def logs(self) -> list[str]:
        return [_tail(entry.log) for entry in self._procs]

    def log_path(self, name: str) -> Path:
        """Where the device process ``name`` logs (a shared one's name, or ``<guest>-<n>``)."""
        shared = self._dir / "shared" / f"{name}.log"
        return shared if shared.exists() else self._dir / f"{name}.log"

    def log_of(self, guest: str) -> str:
        """The last lines each device process that served ``guest`` logged, each under a
        ``--- ivshmem-device NAME (last lines) ---`` line ("" when it has none)."""
        with self._lock:
            mine = sorted((e.name, e.log) for e in self._all if guest in e.served)
        return "\n".join(
            f"--- ivshmem-device {name} (last lines) ---\n{_tail(path)}" for name, path in mine
        )

    def stop(self, guest: str) -> None:
        """``guest``'s QEMU is gone: stop the device processes no running guest uses now."""
        with self._lock:
            for entry in self._procs:
                entry.users.discard(guest)
            done = [e for e in self._procs if guest in e.served and not e.users]
            self._procs = [e for e in self._procs if e not in done]
        self._terminate(done)

    def close(self) -> None:
        """SIGTERM each device process, SIGKILL what is left after 10 s; reap all."""
        with self._lock:
            procs, self._procs = self._procs, []
        self._terminate(procs)

    @staticmethod
    def _terminate(entries: list[_Process]) -> None:
        procs = [e.proc for e in entries]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:])

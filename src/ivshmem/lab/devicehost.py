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
from collections.abc import Callable
from pathlib import Path

from .errors import LabSetupError, LabUsageError
from .guest import Device, Doorbell, PlainRegion, VfioUser, _die_with_parent, _plain_size

__all__ = ["DeviceHosts", "check_device", "device_command"]

#: Seconds a device process gets to open its socket (it is a Python start-up, on a loaded box).
START_TIMEOUT = 60.0


def check_device(device: Device) -> None:
    """Refuse bad inputs of this project's devices before anything starts."""
    if isinstance(device, VfioUser):
        return  # device_arguments checks the socket
    if device.device == "qemu":
        return
    if isinstance(device, Doorbell):
        path = os.fspath(device.socket)
        if not Path(path).is_socket():
            raise LabUsageError(
                f"no ivshmem server socket at {path}: start the server first "
                f"(ivshmem-server -F -S {path} ...)"
            )
        if isinstance(device.vectors, bool) or not 1 <= device.vectors <= 1024:
            raise LabUsageError(f"vectors must be 1..1024, got {device.vectors!r}")
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


class DeviceHosts:
    """The lab's device processes, all under ``directory``."""

    def __init__(self, directory: Path, launch: Callable[[Callable[[], object]], object]) -> None:
        # ``launch`` runs a function in the lab's long-lived spawning thread: PR_SET_PDEATHSIG
        # follows the thread that forked, and a device must not die with a caller's thread.
        self._dir = directory
        self._launch = launch
        self._procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._lock = threading.Lock()
        self._started: list[int] = []
        self._logs: dict[str, Path] = {}  # <guest>-<n>: its log, kept after the process stops

    def serve(self, device: Device, name: str) -> VfioUser:
        """Start a device process for ``device``; return its socket once it listens."""
        if isinstance(device, VfioUser):
            return device
        self._dir.mkdir(exist_ok=True)
        socket = self._dir / f"{name}.sock"
        log_path = self._dir / f"{name}.log"
        argv = device_command(device, str(socket))
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
        with self._lock:
            self._procs.append((proc, log_path))
            self._logs[name] = log_path
            self._started.append(proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.is_socket():
            if proc.poll() is not None:
                raise LabSetupError(
                    f"ivshmem-device for {name} exited with status {proc.returncode} before "
                    f"listening on {socket}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise LabSetupError(
                    f"ivshmem-device for {name} did not listen on {socket} within "
                    f"{START_TIMEOUT:.0f} s:\n{_tail(log_path)}"
                )
            time.sleep(0.02)
        return VfioUser(socket)

    @property
    def pids(self) -> list[int]:
        """Every device process started, running or not."""
        with self._lock:
            return list(self._started)

    def logs(self) -> list[str]:
        return [_tail(path) for _, path in self._procs]

    def log_of(self, guest: str) -> str:
        """The last lines each device process of ``guest`` logged, each under a
        ``--- ivshmem-device <guest>-<n> (last lines) ---`` line ("" when it has none)."""
        prefix = f"{guest}-"
        with self._lock:
            mine = sorted((n, p) for n, p in self._logs.items() if n.startswith(prefix))
        return "\n".join(
            f"--- ivshmem-device {name} (last lines) ---\n{_tail(path)}" for name, path in mine
        )

    def stop(self, guest: str) -> None:
        """Stop the device processes of ``guest`` (named ``<guest>-<n>``): its QEMU is gone."""
        prefix = f"{guest}-"
        with self._lock:
            mine = [(p, log) for p, log in self._procs if log.name.startswith(prefix)]
            self._procs = [(p, log) for p, log in self._procs if not log.name.startswith(prefix)]
        self._terminate(mine)

    def close(self) -> None:
        """SIGTERM each device process, SIGKILL what is left after 10 s; reap all."""
        with self._lock:
            procs, self._procs = self._procs, []
        self._terminate(procs)

    @staticmethod
    def _terminate(procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
        for proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
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

"""Running ``ivshmem-server`` as a child process (the demo, the benchmarks).

The child runs in the foreground and is ready when it says ``READY=1`` over the sd_notify
protocol, on a datagram socket made for it. Probing its socket instead would race the server's
``bind()``/``listen()``, and a probe that connects becomes a phantom peer that shifts every
later id.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from .errors import IvshmemError

__all__ = ["start_server", "stop_server"]


def start_server(
    socket_path: str, args: Sequence[str], log_path: str, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """Start ``ivshmem-server -F -S socket_path *args``, logging to ``log_path``; return once
    it serves. Raises IvshmemError with the server's log if it exits or is not ready in time."""
    notify_path = socket_path + ".notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(notify_path)
        notify.settimeout(0.1)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "ivshmem.cli.server", "-F", "-S", socket_path, *args]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in notify.recv(4096):
                    return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc, 0)
                with open(log_path, errors="replace") as f:
                    text = f.read()
                raise IvshmemError(
                    f"ivshmem-server did not start (status {proc.returncode}):\n{text}"
                )
    finally:
        notify.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` seconds; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode

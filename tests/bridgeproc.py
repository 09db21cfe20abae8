"""Two "hosts" on one machine for the bridge tests and benchmark: ``from bridgeproc import ...``.

A site is an ivshmem server (tests/serverproc.py) plus an ``ivshmem bridge`` process talking
Zenoh over 127.0.0.1 only (multicast and gossip scouting off, Zenoh's shared-memory transport
off), on ports picked free. :func:`zenoh_session` opens a session in this process with the
same restrictions (for a hostile publisher, or raw Zenoh in the benchmark).
:func:`zenoh_shm_files` lists ``*.zenoh`` objects in /dev/shm, which must not appear.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BridgeProcess", "free_port", "zenoh_session", "zenoh_shm_files"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def zenoh_shm_files() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "zenoh" in n.lower()}


def zenoh_session(
    listen: Sequence[str] = (), connect: Sequence[str] = (), tuned: bool = False
) -> Any:
    """A Zenoh session that stays on loopback: no scouting, no shared memory; ``tuned``: with
    the Zenoh settings a bridge starts from (``ivshmem.bridge.config.ZENOH_TUNING``)."""
    import zenoh

    from ivshmem.bridge.config import ZENOH_TUNING

    c = zenoh.Config()
    for key, value in (
        ("mode", '"peer"'),
        ("listen/endpoints", json.dumps(list(listen))),
        ("connect/endpoints", json.dumps(list(connect))),
        ("scouting/multicast/enabled", "false"),
        ("scouting/gossip/enabled", "false"),
        ("transport/shared_memory/enabled", "false"),
        *(ZENOH_TUNING if tuned else ()),
    ):
        c.insert_json5(key, value)
    return zenoh.open(c)


class BridgeProcess:
    """``python -m ivshmem.cli.main bridge ARGS`` with its log in ``log_path``; ``start()``
    returns once it printed ``ready: peer N`` (``peer_id``)."""

    def __init__(self, args: Sequence[str], log_path: str | os.PathLike[str]) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.peer_id = -1
        self.stdout = b""

    def start(self, timeout: float = 30.0) -> BridgeProcess:
        cmd = [sys.executable, "-m", "ivshmem.cli.main", "bridge", *self.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.stdout:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"bridge did not become ready:\n{self.log()}")
            if select.select([fd], [], [], min(left, 0.2))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue
                self.stdout += chunk
        line = self.stdout.split(b"\n", 1)[0].decode()
        assert line.startswith("ready: peer "), line
        self.peer_id = int(line.split()[-1])
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; the exit status."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"bridge ignored SIGTERM:\n{self.log()}") from None
        self._finish()
        return status

    def kill(self) -> None:
        """SIGKILL: a bridge dying without any cleanup."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._finish()

    def _finish(self) -> None:
        proc = self.proc
        if proc is not None and proc.stdout is not None:
            self.stdout += proc.stdout.read()
            proc.stdout.close()
        self.proc = None

    def __enter__(self) -> BridgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

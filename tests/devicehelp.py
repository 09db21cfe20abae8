"""Helpers for the device tests: our vfio-user device in a thread, QEMU 11 attached to it.

::

    with serving([VmSpec(socket=..., server=...)]) as device:      # DeviceServer in a thread
        with attach(qemu11, short_tmp, spec.socket) as qemu:         # QEMU 11 under -accel qtest
            dev = IvshmemDevice.find(qemu)

The device runs in this process, so a test can count this process's fds and look at the
device's state; ``serving`` stops the loop and closes everything on the way out (and the
caller's assertions about leaks run after that).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from qtest import Qemu

from ivshmem.device import DeviceServer, VmSpec

__all__ = ["attach", "device_arg", "fd_count", "open_fds", "serving"]


def device_arg(socket_path: str | os.PathLike[str]) -> str:
    """QEMU's -device value for a vfio-user-pci device at ``socket_path``."""
    return json.dumps(
        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(socket_path)}}
    )


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def new_fds(before: dict[int, str]) -> dict[int, str]:
    """The fds open now that were not open (as the same thing) in ``before``: what a test
    leaked. An fd another part of the process closed meanwhile (a finalizer of an earlier
    test's object) does not count, as a plain count would."""
    return {fd: what for fd, what in open_fds().items() if before.get(fd) != what}


def open_fds() -> dict[int, str]:
    """This process's fds and what they are (for a leak's error message)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory listing's own fd
    return found


@contextlib.contextmanager
def serving(specs: Sequence[VmSpec]) -> Iterator[DeviceServer]:
    server = DeviceServer(specs)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=run, name="ivshmem-device", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=30)
        alive = thread.is_alive()
        if not alive:
            server.close()
    assert not alive, "the device loop did not stop"
    assert not errors, f"the device loop failed: {errors[0]!r}"


@contextlib.contextmanager
def attach(
    qemu11: Sequence[str],
    workdir: Path,
    *sockets: str | os.PathLike[str],
    name: str = "vm",
    extra: Sequence[str] = (),
) -> Iterator[Qemu]:
    """A paused QEMU 11 (``-accel qtest``) with one vfio-user-pci device per socket; killed
    and reaped on the way out."""
    args: list[str] = []
    for path in sockets:
        args += ["-device", device_arg(path)]
    with Qemu(list(qemu11), workdir, [*args, *extra], name=name, accel="qtest") as qemu:
        yield qemu

"""Fetching Debian packages with the system's own tools: apt-cache, apt-get download, dpkg-deb.

The lab needs two packages it never installs: the guest kernel (``linux-image-*-amd64``) and,
when the host's busybox is not static, ``busybox-static``. ``apt-get download`` fetches a .deb
into the current directory without root; only ``apt-get update`` (needed on a fresh machine
whose package lists are empty, as in CI) needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import LabSetupError

__all__ = ["Progress", "download", "metapackage_target", "unpack"]

Progress = Callable[[str], None]

_TOOL_HINT = (
    "the lab fetches its guest kernel with Debian's package tools (apt-get, dpkg-deb); "
    "on a system without them, run the lab on Debian or Ubuntu"
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LabSetupError(f"{name} not found: {_TOOL_HINT}")
    return path


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _update_lists(progress: Progress) -> None:
    """``apt-get update``: without it a fresh machine (CI) knows no packages at all."""
    progress("ivshmem lab: package lists are missing or stale; running apt-get update")
    if os.geteuid() != 0:
        raise LabSetupError(
            "apt knows no current guest kernel package and updating its lists needs root: "
            "run `sudo apt-get update` (or `ivshmem lab fetch` as root) and try again"
        )
    done = _run([_tool("apt-get"), "update", "-qq"])
    if done.returncode != 0:
        raise LabSetupError(f"apt-get update failed:\n{_tail(done.stderr or done.stdout)}")


def metapackage_target(meta: str, pattern: str, progress: Progress) -> str:
    """The package ``meta`` depends on whose name matches ``pattern`` (``linux-image-amd64`` ->
    ``linux-image-6.1.0-56-amd64``); updates the package lists once if apt does not know it."""
    regex = re.compile(pattern)
    for attempt in (1, 2):
        done = _run([_tool("apt-cache"), "depends", meta])
        if done.returncode == 0:
            for line in done.stdout.splitlines():
                key, _, value = line.strip().partition(":")
                if key.strip() == "Depends" and regex.fullmatch(value.strip()):
                    return value.strip()
        if attempt == 1:
            _update_lists(progress)
    raise LabSetupError(
        f"apt does not know which package {meta} depends on (no dependency matching "
        f"{pattern!r}); check /etc/apt/sources.list for Debian's main archive"
    )


def download(package: str, directory: Path, progress: Progress, size_hint: str = "") -> Path:
    """Fetch ``package``'s .deb into ``directory`` and return its path."""
    hint = f" ({size_hint})" if size_hint else ""
    progress(f"ivshmem lab: downloading {package}{hint} into {directory}")
    for attempt in (1, 2):
        done = _run([_tool("apt-get"), "download", "-q", package], cwd=directory)
        debs = sorted(directory.glob(f"{package}_*.deb"))
        if done.returncode == 0 and debs:
            return debs[-1]
        if attempt == 1:
            _update_lists(progress)
    raise LabSetupError(
        f"apt-get download {package} failed:\n{_tail(done.stderr or done.stdout)}\n"
        "check the network connection to Debian's archive"
    )


def unpack(deb: Path, destination: Path) -> None:
    """``dpkg-deb -x``: the package's files under ``destination``, nothing installed."""
    done = _run([_tool("dpkg-deb"), "-x", str(deb), str(destination)])
    if done.returncode != 0:
        raise LabSetupError(f"dpkg-deb -x {deb.name} failed:\n{_tail(done.stderr)}")

"""Build QEMU's own contrib ivshmem-server once, into a cache, for same-run comparisons.

The binary comes from Debian's ``qemu`` source package: a ``deb-src`` entry for bookworm is
added in a file of its own under /etc/apt/sources.list.d/ (only when none is present), then
``apt-get source qemu``, ``configure --disable-system --disable-user --disable-docs
--disable-werror --enable-tools`` and ``ninja contrib/ivshmem-server/ivshmem-server``. Build
dependencies are installed with apt-get. Needs root (as CI runs) for the apt steps.

    .venv/bin/python benchmarks/qemu_server.py      # build (if needed) and print the path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ivshmem" / "qemu-server"
BINARY = CACHE / "ivshmem-server"
SOURCES = Path("/etc/apt/sources.list.d/ivshmem-deb-src.sources")
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
BUILD_DEPS = [
    "build-essential",
    "ninja-build",
    "meson",
    "pkg-config",
    "python3-venv",
    "libglib2.0-dev",
    "libpixman-1-dev",
    "flex",
    "bison",
    "dpkg-dev",
]


class BuildError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path | None = None, log: Path | None = None) -> None:
    out = open(log, "a") if log else None  # noqa: SIM115 - closed below
    try:
        result = subprocess.run(
            cmd, cwd=cwd, stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False
        )
    finally:
        if out:
            out.close()
    if result.returncode != 0:
        where = f"; see {log}" if log else ""
        raise BuildError(f"{' '.join(cmd)} failed with status {result.returncode}{where}")


def _has_deb_src() -> bool:
    paths = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources" and "deb-src" in text:
            return True
        if any(line.strip().startswith("deb-src") for line in text.splitlines()):
            return True
    return False


def build(verbose: bool = True) -> Path:
    """Return the path of QEMU's ivshmem-server, building it first if the cache lacks it."""
    if BINARY.exists():
        return BINARY
    if os.geteuid() != 0:
        raise BuildError(
            "building QEMU's ivshmem-server needs root for apt-get (deb-src entry, build deps)"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "build.log"
    work = CACHE / "src"

    def say(msg: str) -> None:
        if verbose:
            print(f"qemu-server: {msg}", file=sys.stderr, flush=True)

    if not _has_deb_src():
        say(f"adding a deb-src entry in {SOURCES}")
        SOURCES.write_text(
            "Types: deb-src\n"
            "URIs: http://deb.debian.org/debian\n"
            "Suites: bookworm bookworm-updates\n"
            "Components: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    say("apt-get update")
    _run([*APT, "update"], log=log)
    say("installing build dependencies")
    env_noninteractive = ["env", "DEBIAN_FRONTEND=noninteractive"]
    _run(
        [*env_noninteractive, *APT, "install", "-y", "--no-install-recommends", *BUILD_DEPS],
        log=log,
    )
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    say("apt-get source qemu")
    _run([*APT, "source", "--download-only", "qemu"], cwd=work, log=log)
    dsc = sorted(work.glob("qemu_*.dsc"))
    if not dsc:
        raise BuildError(f"apt-get source qemu left no .dsc in {work}; see {log}")
    _run(["dpkg-source", "--no-check", "-x", dsc[-1].name, "qemu"], cwd=work, log=log)
    tree = work / "qemu"
    build_dir = tree / "build-ivshmem"
    build_dir.mkdir(exist_ok=True)
    say("configure")
    _run(
        [
            "../configure",
            "--disable-system",
            "--disable-user",
            "--disable-docs",
            "--disable-werror",
            "--enable-tools",
        ],
        cwd=build_dir,
        log=log,
    )
    say("ninja contrib/ivshmem-server/ivshmem-server")
    _run(["ninja", "contrib/ivshmem-server/ivshmem-server"], cwd=build_dir, log=log)
    built = build_dir / "contrib" / "ivshmem-server" / "ivshmem-server"
    if not built.exists():
        raise BuildError(f"ninja finished but {built} is missing; see {log}")
    tmp = BINARY.with_suffix(".tmp")
    shutil.copy2(built, tmp)
    tmp.rename(BINARY)
    shutil.rmtree(work, ignore_errors=True)
    say(f"built {BINARY}")
    return BINARY


if __name__ == "__main__":
    try:
        print(build())
    except BuildError as exc:
        print(f"qemu-server: {exc}", file=sys.stderr)
        sys.exit(1)

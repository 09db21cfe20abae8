"""The pid file: written atomically without following links, removed only if it still
names this process."""

from __future__ import annotations

import contextlib
import os

from ..errors import ServerConfigError


def write_pidfile(path: str) -> None:
    """Write this process's pid to ``path``."""
    # Written beside and renamed over: a reader never sees a partial pid. O_EXCL and
    # O_NOFOLLOW: the temporary name is predictable, and a link planted there by someone
    # else must not make a privileged server write through it.
    tmp = f"{path}.{os.getpid()}.tmp"
    created = False
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        created = True
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise ServerConfigError(
            f"cannot write pid file {path!r}: {err.strerror}; choose a writable path with "
            "-p PATH, or run in the foreground with -F (which writes no pid file unless "
            "-p asks for one)"
        ) from err


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still holds this process's pid (another server may have
    written it since)."""
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass

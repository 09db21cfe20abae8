"""Listening sockets: claiming a socket path (refusing a live server's, removing a stale
one), binding with the right mode and group, and systemd's readiness notification."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

from ..errors import ServerConfigError

log = logging.getLogger("ivshmem.server")


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd's $NOTIFY_SOCKET, if there is one.

    Returns whether it was sent. Never raises: readiness notification must not stop a server
    that is otherwise fine."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.warning("cannot notify systemd at %r: %s", os.environ["NOTIFY_SOCKET"], err.strerror)
        return False
    return True


def _listening_unix_paths() -> set[str] | None:
    """Paths of the listening Unix sockets in this network namespace (None if unknown)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    paths = set()
    for line in lines:
        parts = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON = 0x10000.
        if len(parts) == 8 and int(parts[3], 16) & 0x10000:
            paths.add(parts[7])
    return paths


def _is_listening(path: str, st: os.stat_result, listening: set[str]) -> bool:
    """Whether the socket file ``path`` (``st``: its lstat) is one of ``listening``.

    The table lists paths as they were given to bind(), so the same socket may be listed
    under another spelling (a symlinked directory, a bind mount, a relative path): compare
    the files themselves, not their names."""
    if path in listening:
        return True
    for other in listening:
        if not other.startswith("/"):
            continue  # abstract (@...) or relative to a cwd we do not know
        try:
            ost = os.stat(other, follow_symlinks=False)
        except OSError:
            continue
        if (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def claim_socket_path(path: str, option: str = "-S") -> None:
    """Make ``path`` free for bind(): refuse if a live server listens there, remove a stale
    socket file, refuse to remove anything that is not a socket. ``option`` is the flag that
    chose the path, for the messages."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise ServerConfigError(f"cannot check socket path {path!r}: {err.strerror}") from err
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerConfigError(
            f"{path!r} exists and is not a socket: remove it or choose another path with {option}"
        )
    # /proc/net/unix tells without connecting. Connecting to a live ivshmem server would make
    # it admit (and then drop) a phantom peer, which every connected VM would see.
    listening = _listening_unix_paths()
    live = listening is not None and _is_listening(path, st, listening)
    if not live:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(2.0)
            probe.connect(path)
            live = True
        except (ConnectionRefusedError, FileNotFoundError):
            live = False
        except OSError as err:
            raise ServerConfigError(
                f"cannot tell whether {path!r} belongs to a running server: {err.strerror}"
            ) from err
        finally:
            probe.close()
    if live:
        raise ServerConfigError(
            f"socket {path!r} is in use by a running server: stop it first, or choose "
            f"another path with {option}"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ServerConfigError(
            f"cannot remove stale socket {path!r}: {err.strerror}; remove it by hand"
        ) from err
    log.info("removed stale socket %s (no server was listening on it)", path)


def listen(
    path: str, mode: int, group: int | None, backlog: int, option: str = "-S"
) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` with ``mode``/``group``."""
    claim_socket_path(path, option)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # bind() creates the file with 0777 & ~umask; a umask that leaves only the owner bits
        # closes the window in which another user could connect before chmod() runs.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ServerConfigError(
                f"cannot set group/mode of socket {path!r}: {err.strerror}"
            ) from err
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        directory = os.path.dirname(path) or "."
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ServerConfigError(
                f"cannot create socket {path!r}: directory {directory!r} is not writable "
                f"({err.strerror}); choose another path with {option}"
            ) from err
        if err.errno == errno.ENOENT:
            raise ServerConfigError(
                f"cannot create socket {path!r}: directory {directory!r} does not exist; "
                f"create it, or choose another path with {option}"
            ) from err
        raise ServerConfigError(f"cannot listen on {path!r}: {err.strerror}") from err
    except BaseException:
        sock.close()
        raise
    return sock

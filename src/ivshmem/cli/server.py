"""``ivshmem-server`` (and ``ivshmem server``): QEMU's server flags, and more.

QEMU's flags keep their meaning and defaults: ``-S PATH`` (``/tmp/ivshmem_socket``), ``-M NAME``
(``ivshmem``), ``-m DIR``, ``-l SIZE`` (``4M``), ``-n N`` (``1``), ``-F``, ``-p PIDFILE``
(``/var/run/ivshmem-server.pid``, daemon mode), ``-v``, ``-h``. Without ``-F`` the server
daemonizes; any startup error is still printed on the launching terminal and the command exits
non-zero, because the launching process waits for the daemon to say it is serving. The daemon
closes every fd it inherited (a launcher waiting for EOF on a pipe is not kept waiting) and logs
to syslog (``/dev/log``) or to ``--log-file``; without either it says on the terminal, before
detaching, that its log will be lost.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT) or a ``--status`` query; 1 when the
server cannot start (the message says what to change: restarting it unchanged fails the same
way); 2 for unusable arguments; 70 when it fails while serving (an internal error: restarting
it is worth a try).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import logging.handlers
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import IvshmemError, ServerConfigError, UsageError
from ..memory import parse_size
from ..protocol import MAX_PEER_ID, MAX_VECTORS
from ..server import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_QUEUED_TOTAL,
    DEFAULT_SHM_NAME,
    DEFAULT_SIZE,
    DEFAULT_SOCKET_PATH,
    Server,
    ServerConfig,
    parse_gid,
    parse_uid,
    query_status,
    run,
    status_path_for,
)

DEFAULT_PIDFILE = "/var/run/ivshmem-server.pid"
#: Exit statuses (see the module docstring). 70 is sysexits.h's EX_SOFTWARE.
EXIT_CANNOT_START = 1
EXIT_USAGE = 2
EXIT_FAILED = 70

log = logging.getLogger("ivshmem.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options (shared by ``ivshmem-server`` and ``ivshmem server``)."""
    qemu = parser.add_argument_group("QEMU ivshmem-server options (same meaning and defaults)")
    qemu.add_argument(
        "-S",
        dest="socket_path",
        metavar="PATH",
        default=DEFAULT_SOCKET_PATH,
        help=f"Unix socket to listen on (default {DEFAULT_SOCKET_PATH})",
    )
    backing = qemu.add_mutually_exclusive_group()
    backing.add_argument(
        "-M",
        dest="shm_name",
        metavar="NAME",
        help=f"POSIX shared-memory object /dev/shm/NAME (the default, NAME={DEFAULT_SHM_NAME}); "
        "kept after exit, so a restarted server keeps the region's content. An existing one "
        "must belong to the server's user; it is grown to -l, never shrunk",
    )
    backing.add_argument(
        "-m",
        dest="shm_dir",
        metavar="DIR",
        help="create the memory as an unlinked file in DIR (e.g. a hugetlbfs mount)",
    )
    backing.add_argument(
        "--memfd",
        action="store_true",
        help="anonymous memory (memfd): nothing in the filesystem, gone with the last user; "
        "sealed at its size, so no peer can truncate it (recommended when peers are not all "
        "trusted)",
    )
    backing.add_argument(
        "--file",
        dest="shm_file",
        metavar="PATH",
        help="a named file as the memory (created if missing; kept after exit; same rules "
        "as -M, never a symbolic link, never on /proc, /sys or another pseudo filesystem)",
    )
    qemu.add_argument(
        "-l",
        dest="size",
        metavar="SIZE",
        default=str(DEFAULT_SIZE),
        help="size of the memory in bytes, with an optional K, M, G or T suffix (powers of "
        "1024); rounded up to a power of two (default 4M)",
    )
    qemu.add_argument(
        "-n",
        dest="vectors",
        metavar="N",
        default="1",
        help=f"vectors (doorbell interrupts) per peer, 1..{MAX_VECTORS} (default 1; QEMU's "
        "device accepts at most 64)",
    )
    qemu.add_argument(
        "-F", dest="foreground", action="store_true", help="stay in the foreground (no daemon)"
    )
    qemu.add_argument(
        "-p",
        dest="pidfile",
        metavar="PIDFILE",
        help=f"write the server's pid here (daemon mode default {DEFAULT_PIDFILE}; also "
        "honoured with -F); removed at exit",
    )
    qemu.add_argument(
        "-v",
        dest="server_verbose",
        action="store_true",
        help="verbose: log debug messages (to syslog in daemon mode)",
    )
    more = parser.add_argument_group("beyond QEMU's server")
    more.add_argument(
        "--mode",
        metavar="OCTAL",
        help="permissions of the socket, the status socket and a named memory file "
        "(default 600, or 660 with --group)",
    )
    more.add_argument("--group", metavar="GROUP", help="group (name or gid) given to those files")
    more.add_argument(
        "--allow-uid",
        metavar="UID",
        action="append",
        default=[],
        help="serve only these users (names or uids, comma-separated, repeatable) besides the "
        "server's own user and --allow-gid; others are refused (checked with SO_PEERCRED)",
    )
    more.add_argument(
        "--allow-gid",
        metavar="GID",
        action="append",
        default=[],
        help="serve members of these groups (primary or supplementary; names or gids)",
    )
    more.add_argument(
        "--status-socket",
        metavar="PATH",
        help="Unix socket answering every connection with the JSON status (default "
        "SOCKET.status; an empty string disables it)",
    )
    more.add_argument(
        "--status",
        action="store_true",
        help="do not serve: print the status of the server running at -S (or at "
        "--status-socket) as JSON and exit",
    )
    more.add_argument(
        "--max-queue",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="messages a client may fall behind beyond one full handshake; past it, a client "
        "that has read nothing for a second is disconnected (one that reads never is; "
        f"default {DEFAULT_MAX_QUEUE})",
    )
    more.add_argument(
        "--max-pending",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_PENDING,
        help="handshakes one client process may have unsent at once; its further connections "
        f"wait and join in order (default {DEFAULT_MAX_PENDING})",
    )
    more.add_argument(
        "--max-queued-total",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_QUEUED_TOTAL,
        help="messages queued for all clients together before the clients with the longest "
        f"queues are disconnected (default {DEFAULT_MAX_QUEUED_TOTAL}, about 16 bytes each)",
    )
    more.add_argument(
        "--log-file",
        metavar="PATH",
        help="log to this file (appended; reopened when rotated away) instead of stderr "
        "with -F, or instead of syslog as a daemon; never through a symbolic link, and only a "
        "regular file of the server's user",
    )
    more.add_argument(
        "--first-id",
        metavar="ID",
        type=int,
        default=0,
        help=f"first peer id to hand out, 0..{MAX_PEER_ID} (default 0 like QEMU; for tests "
        "of id wrap-around)",
    )
    layout = parser.add_argument_group("membership table (ivshmem.channel region layout)")
    layout.add_argument(
        "--format",
        dest="format_region",
        action="store_true",
        help="format the region for channels unless it already is, and keep its membership "
        "table (which peers are present; guests read it, as the device cannot tell them)",
    )
    layout.add_argument(
        "--reformat",
        action="store_true",
        help="like --format, but lay the region out afresh even if it already carries a "
        "layout (of another version, for another size or --max-peers); erases every channel "
        "in it",
    )
    layout.add_argument(
        "--max-peers",
        metavar="N",
        type=int,
        default=16,
        help="membership slots (peers that can have channels) when formatting (default 16)",
    )
    layout.add_argument(
        "--membership-vector",
        metavar="V",
        type=int,
        default=None,
        help="ring vector V of every peer when a peer joins or leaves (needs --format)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem-server",
        description="Serve shared memory and doorbell eventfds to QEMU ivshmem-doorbell "
        "devices and host peers (QEMU's ivshmem-server protocol).",
    )
    add_arguments(parser)
    return parser


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "server",
        help="run the ivshmem server (QEMU's ivshmem-server flags)",
        description=build_parser().description,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def _nonempty(value: str | None, option: str, what: str) -> None:
    """Refuse an empty string, which would silently mean the current directory or the
    default, depending on the option."""
    if value is not None and not value.strip():
        raise UsageError(f"{option}: empty {what}: give a {what}, or leave {option} out")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Turn parsed options into a ServerConfig; UsageError/ServerConfigError on bad values."""
    _nonempty(args.socket_path, "-S", "socket path")
    _nonempty(args.shm_dir, "-m", "directory")
    _nonempty(args.shm_file, "--file", "file path")
    _nonempty(args.pidfile, "-p", "pid file path")
    _nonempty(args.log_file, "--log-file", "log file path")
    if args.shm_name is not None and not args.shm_name.strip("/ "):
        raise UsageError(
            f"-M: empty shared-memory name {args.shm_name!r}: give a name such as "
            f"{DEFAULT_SHM_NAME} (the object becomes /dev/shm/NAME), or leave -M out for that "
            "default"
        )
    try:
        size = parse_size(args.size)
    except UsageError as err:
        raise UsageError(f"-l: {err}") from None
    try:
        vectors = int(args.vectors, 10)
    except ValueError:
        raise UsageError(f"-n: cannot parse {args.vectors!r} as a number of vectors") from None
    if not 1 <= vectors <= MAX_VECTORS:
        raise UsageError(f"-n: {vectors} vectors per peer is out of range 1..{MAX_VECTORS}")
    group = parse_gid(args.group) if args.group else None
    if args.mode is not None:
        try:
            mode = int(args.mode, 8)
        except ValueError:
            raise UsageError(f"--mode: {args.mode!r} is not an octal mode like 600") from None
        if not 0 <= mode <= 0o777:
            raise UsageError(f"--mode: {args.mode!r} is not a permission mode (000..777)")
    else:
        mode = 0o660 if group is not None else 0o600
    allow_uids = frozenset(
        parse_uid(part.strip()) for item in args.allow_uid for part in item.split(",") if part
    )
    allow_gids = frozenset(
        parse_gid(part.strip()) for item in args.allow_gid for part in item.split(",") if part
    )
    socket_path = os.path.abspath(args.socket_path)
    if args.status_socket is None:
        status_socket: str | None = status_path_for(socket_path)
    elif args.status_socket == "":
        status_socket = None
    else:
        status_socket = os.path.abspath(args.status_socket)
    if args.memfd:
        backing, shm_path = "memfd", ""
    elif args.shm_dir is not None:
        backing, shm_path = "directory", os.path.abspath(args.shm_dir)
    elif args.shm_file is not None:
        backing, shm_path = "file", os.path.abspath(args.shm_file)
    else:
        backing = "posix"
        shm_path = DEFAULT_SHM_NAME if args.shm_name is None else args.shm_name
    pidfile = args.pidfile
    if pidfile is None and not args.foreground:
        pidfile = DEFAULT_PIDFILE
    config = ServerConfig(
        socket_path=socket_path,
        backing=backing,
        shm_path=shm_path,
        size=size,
        vectors=vectors,
        mode=mode,
        group=group,
        allow_uids=allow_uids,
        allow_gids=allow_gids,
        status_socket=status_socket,
        max_queue=args.max_queue,
        max_queued_total=args.max_queued_total,
        max_pending=args.max_pending,
        first_id=args.first_id,
        format_region=args.format_region or args.reformat,
        reformat=args.reformat,
        max_peers=args.max_peers,
        membership_vector=args.membership_vector,
        pidfile=os.path.abspath(pidfile) if pidfile else None,
    )
    config.validate()
    return config


class _Formatter(logging.Formatter):
    """A Formatter whose timestamp costs a string format, not a ``localtime`` and a
    ``strftime``, on all but the first line of each second: the server logs a line per join
    and leave, and the default conversion was a third of a line's cost."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        msec = self.default_msec_format
        return self._stamp if msec is None else msec % (self._stamp, record.msecs)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    # journald stamps every line itself; elsewhere a timestamp helps.
    fmt = "%(levelname)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s ivshmem-server " + fmt
    handler.setFormatter(_Formatter(fmt))
    return handler


def open_log_file(path: str) -> int:
    """Open ``path`` for appending with the care the pid file gets: never through a symbolic
    link (a link planted there would make a root server append to, say, a file in /etc),
    only a regular file (not a FIFO or a device), with one name (a hard link to another
    file is the same trick), owned by the server's own user. Returns the fd."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader forever.
        fd = os.open(path, flags | os.O_NONBLOCK, 0o640)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ServerConfigError(
                f"--log-file: {path!r} is a symbolic link, which is not followed (a link could "
                "point the server at any file it may write); give the path of the file itself"
            ) from err
        if err.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK), or a socket
            raise ServerConfigError(
                f"--log-file: {path!r} is not a regular file: remove it, or choose another path"
            ) from err
        raise ServerConfigError(
            f"--log-file: cannot open {path!r}: {err.strerror}; choose a writable path"
        ) from err
    try:
        st = os.fstat(fd)
        problem = ""
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_nlink != 1:
            problem = f"has {st.st_nlink} hard links (it may be another file under a new name)"
        elif st.st_uid != os.geteuid():
            problem = (
                f"belongs to uid {st.st_uid}, not to uid {os.geteuid()} who runs the server "
                "(its owner could make it anything)"
            )
        if problem:
            raise ServerConfigError(
                f"--log-file: {path!r} {problem}: remove it, or choose another path"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _LogFileHandler(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that opens (and, after a rotation, reopens) the file with
    :func:`open_log_file`; a reopen that is refused costs log lines, never the server."""

    def _open(self) -> Any:
        return os.fdopen(open_log_file(self.baseFilename), "a", encoding=self.encoding)

    _refused = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
        except (OSError, IvshmemError) as err:
            # Said once on stderr (a traceback per line would follow otherwise), and again
            # only after the file could be opened in between.
            if not self._refused:
                self._refused = True
                note = f"ivshmem-server: {err} (log lines are dropped until it can be opened)"
                with contextlib.suppress(OSError, ValueError):
                    print(note, file=sys.stderr)
            return
        self._refused = False
        logging.StreamHandler.emit(self, record)


def _file_handler(path: str) -> logging.Handler:
    # Watched: after logrotate moves the file away, the next line goes to a new one.
    handler = _LogFileHandler(path, encoding="utf-8")
    handler.setFormatter(
        _Formatter("%(asctime)s ivshmem-server[%(process)d] %(levelname)s: %(message)s")
    )
    return handler


def _syslog_handler() -> logging.Handler | None:
    """A handler for the local syslog daemon, or None if nothing listens at /dev/log."""
    if not os.path.exists("/dev/log"):
        return None
    handler = logging.handlers.SysLogHandler(
        address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
    )
    # The handler swallows a failed connect (and would drop every line): find out now.
    if getattr(handler, "socket", None) is None:
        handler.close()
        return None
    handler.setFormatter(logging.Formatter("ivshmem-server[%(process)d]: %(message)s"))
    return handler


def _use_handlers(*handlers: logging.Handler, verbose: bool) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _close_inherited_fds(keep: set[int]) -> None:
    """Close every fd above 2 that is not in ``keep``.

    A daemon must not hold what its launcher gave it: a launcher that reads a pipe until EOF
    (a test harness, a deployment script capturing output) would wait as long as the daemon
    lives. Nothing in this process has opened anything of its own yet."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            # The listing's own fd is gone already (EBADF).
            with contextlib.suppress(OSError):
                os.close(fd)


def _serve(server: Server) -> int:
    try:
        run(server)
    except Exception:
        log.exception("the server failed")
        return EXIT_FAILED
    finally:
        server.close()  # idempotent; after a failure, removes the socket and pid files
        # Shut down already: a repeated SIGTERM/SIGINT must not turn a clean exit into a
        # death by signal in the last moments.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("server stopped")
    return 0


def _run_foreground(config: ServerConfig, verbose: bool, log_file: str | None) -> int:
    try:
        if log_file is not None:
            _use_handlers(_file_handler(log_file), verbose=verbose)
        server = Server(config)
        server.open()  # cleans up after itself when it fails
    except IvshmemError as err:
        print(f"ivshmem-server: error: {err}", file=sys.stderr)
        return EXIT_CANNOT_START
    return _serve(server)


def _run_daemon(config: ServerConfig, verbose: bool, log_file: str | None) -> int:
    """Double fork and setsid; the launching process exits only once the daemon serves (0)
    or has failed to start (1, with the daemon's error printed here)."""
    # Launched with 0, 1 or 2 closed, the report pipe would get one of those numbers, and
    # the daemon's redirection of 0-2 to /dev/null would swallow its "OK".
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: this one
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        chunks = []
        with os.fdopen(read_end, "rb") as reader:
            while chunk := reader.read(4096):
                chunks.append(chunk)
        os.waitpid(pid, 0)
        message = b"".join(chunks).decode(errors="replace")
        if message.startswith("OK"):
            return 0
        print(
            message.strip() or "ivshmem-server: error: the daemon exited during startup",
            file=sys.stderr,
        )
        return EXIT_CANNOT_START
    # Intermediate child: leave the launching session, then fork again so the daemon is not
    # a session leader and can never acquire a controlling terminal.
    code = EXIT_CANNOT_START
    try:
        os.close(read_end)
        os.setsid()
        code = 0 if os.fork() > 0 else _daemon_main(config, verbose, log_file, write_end)
    finally:
        os._exit(code)


def _daemon_main(config: ServerConfig, verbose: bool, log_file: str | None, report_fd: int) -> int:
    def report(text: str) -> None:
        try:
            os.write(report_fd, text.encode())
        except OSError:
            pass

    server: Server | None = None
    try:
        _close_inherited_fds({report_fd})
        os.chdir("/")
        target = _file_handler(log_file) if log_file is not None else _syslog_handler()
        # Until it detaches, the daemon also logs to the launching terminal, so warnings
        # about the configuration are seen where the command was typed.
        _use_handlers(_stderr_handler(), *([target] if target else []), verbose=verbose)
        server = Server(config)
        server.open()
        if target is None:
            log.warning(
                "nothing listens at /dev/log (no syslog): the daemon's log will be lost once "
                "it detaches; give --log-file PATH, or run in the foreground with -F and let "
                "a supervisor keep stderr"
            )
        _use_handlers(target or logging.NullHandler(), verbose=verbose)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        report("OK\n")
    except BaseException as err:
        if server is not None:
            server.close(discard=True)
        reason: object = err
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror + (f" ({err.filename})" if err.filename else "")
        report(f"ivshmem-server: error: {reason}\n")
        return EXIT_CANNOT_START
    finally:
        os.close(report_fd)
    return _serve(server)


def run_from_args(args: argparse.Namespace) -> int:
    verbose = bool(args.server_verbose)
    _use_handlers(_stderr_handler(), verbose=verbose)
    try:
        config = config_from_args(args)
    except IvshmemError as err:
        print(f"ivshmem-server: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.status:
        path = config.status_socket or status_path_for(config.socket_path)
        try:
            status = query_status(path)
        except IvshmemError as err:
            print(f"ivshmem-server: error: {err}", file=sys.stderr)
            return EXIT_CANNOT_START
        print(json.dumps(status, indent=2))
        return 0
    if args.foreground:
        return _run_foreground(config, verbose, args.log_file)
    return _run_daemon(config, verbose, args.log_file)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

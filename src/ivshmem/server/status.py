"""The status socket: one JSON document per connection (:meth:`Server.status`), and
:func:`query_status`, its client side."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import time
from typing import Any

from .. import __version__
from ..errors import IvshmemError, ServerConfigError
from .base import ServerBase

log = logging.getLogger("ivshmem.server")

_ACCEPT_BURST = 64


def status_path_for(socket_path: str) -> str:
    """The default status socket of a server listening on ``socket_path``."""
    return socket_path + ".status"


class StatusMixin(ServerBase):
    """The status report and the socket that serves it."""

    def status(self) -> dict[str, Any]:
        """Everything an operator asks about, JSON-ready."""
        return self._status(self._count_fds())

    def _status(self, open_fds: int) -> dict[str, Any]:
        cfg = self.config
        now = time.monotonic()
        shm = self._shm
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        c = self._counters
        clients = sorted(self._clients.values(), key=lambda cl: cl.peer)
        unread = {cl.peer: self._unread(cl) for cl in clients}
        return {
            "server": {
                "version": __version__,
                "pid": os.getpid(),
                "socket": cfg.socket_path,
                "uptime_seconds": round(now - self._started, 3),
            },
            "shared_memory": {
                "backing": cfg.backing,
                "path": None if shm is None or cfg.backing == "memfd" else shm.path or cfg.shm_path,
                "size": self.size,
                "sealed": self._guard is not None and self._guard.sealed,
                "size_restores": 0 if self._guard is None else self._guard.restores,
            },
            "vectors": cfg.vectors,
            "peers": [
                {
                    "id": cl.peer,
                    "pid": cl.pid,
                    "uid": cl.uid,
                    "gid": cl.gid,
                    "queued": len(cl.queue),
                    "unread": unread[cl.peer],
                    "sent": self._sent_to(cl)[0],
                    "connected_seconds": round(now - cl.connected_at, 3),
                }
                for cl in clients
            ],
            "counters": {
                "peers": len(self._clients),
                "joins": c.joins,
                "leaves": c.leaves,
                "messages_sent": c.messages_sent,
                "messages_queued": self._queued_total,
                "messages_unread": sum(unread.values()),
                "clients_refused": c.clients_refused,
                "slow_clients_dropped": c.slow_clients_dropped,
                "queue_budget_drops": c.queue_budget_drops,
                "clients_sent_data": c.clients_sent_data,
                "send_stalls": c.send_stalls,
                "stalled_clients_dropped": c.stalled_clients_dropped,
                "accept_errors": c.accept_errors,
                "fd_shortages": c.fd_shortages,
                "joins_collapsed": c.joins_collapsed,
                "clients_waited": c.clients_waited,
                "status_queries": c.status_queries,
            },
            "membership": None
            if self._membership is None
            else {
                "generation": self._membership.generation,
                "listed": sorted(self._membership.peers),
                "vector": cfg.membership_vector,
            },
            "limits": {
                "max_queue": cfg.max_queue,
                "max_queued_total": cfg.max_queued_total,
                "max_pending": cfg.max_pending,
                "clients_waiting": sum(len(src.waiting) for src in self._sources.values()),
                "open_fds": open_fds,
                "fd_limit": soft,
                "accept_paused": self._accept_paused,
                "fd_shortage": self._shortage is not None,
                "sends_stalled": self._stall is not None,
            },
        }

    def _on_status_accept(self) -> None:
        listener = self._status_listener
        if listener is None or self._loop is None:
            return
        for _ in range(_ACCEPT_BURST):
            open_fds: int | None = None
            conn: socket.socket | None = None
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE) and self._reserve >= 0:
                    # Out of fds: answer with the reserve's slot, so that an operator can
                    # still ask the server what is going on.
                    open_fds = self._count_fds()
                    self._release_reserve()
                    with contextlib.suppress(OSError):
                        conn, _addr = listener.accept()
                    if conn is None:
                        self._restore_reserve()
                if conn is None:
                    log.warning(
                        "status socket: accept failed: %s; retrying in %.1f s", err.strerror, 0.5
                    )
                    # A level-triggered reader on a backlog we cannot accept from would spin.
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(0.5, self._resume_status)
                    return
            self._counters.status_queries += 1
            try:
                conn.setblocking(False)
                report = self._status(self._count_fds() if open_fds is None else open_fds)
                body = (json.dumps(report, indent=1) + "\n").encode()
            except Exception:
                log.exception("cannot build the status report")
                conn.close()
                self._restore_reserve()
                continue
            task = self._loop.create_task(self._send_status(conn, body))
            self._tasks.status.add(task)
            task.add_done_callback(self._tasks.status.discard)
            if open_fds is not None:
                return  # the reserve is in use: the next query waits for its reopening

    def _resume_status(self) -> None:
        if self._status_listener is not None and self._loop is not None and not self._closed:
            self._loop.add_reader(self._status_listener.fileno(), self._on_status_accept)

    async def _send_status(self, conn: socket.socket, body: bytes) -> None:
        assert self._loop is not None
        try:
            await asyncio.wait_for(self._loop.sock_sendall(conn, body), timeout=10.0)
        except asyncio.TimeoutError:
            log.info("status reader went away: it read nothing for 10 s")
        except OSError as err:
            log.info("status reader went away: %s", err.strerror)
        finally:
            conn.close()
            self._restore_reserve()


def query_status(status_socket: str, timeout: float = 10.0) -> dict[str, Any]:
    """Read the JSON status from a running server's status socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(status_socket)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as err:
        raise ServerConfigError(
            f"cannot read the status of the server at {status_socket!r}: {err.strerror or err}"
        ) from err
    finally:
        sock.close()
    try:
        result = json.loads(b"".join(chunks))
    except ValueError as err:
        raise IvshmemError(f"{status_socket!r} did not answer with a JSON status") from err
    if not isinstance(result, dict):
        raise IvshmemError(f"{status_socket!r} did not answer with a JSON object")
    return result

"""The ivshmem server: an asyncio loop around :class:`ivshmem.protocol.PeerTable`.

A drop-in replacement for QEMU's example ``ivshmem-server`` (same wire protocol, same flags
through :mod:`ivshmem.cli.server`), built to keep serving when clients misbehave:

* **Nothing blocks, nothing is dropped.** Every client has a queue of messages. A queue is
  flushed with non-blocking ``sendmsg`` calls, one 8-byte message (and at most one fd) at a
  time, until the kernel says the socket is full (EAGAIN); the loop then waits until the socket
  is writable. A client whose queue grows past a bound (its full handshake plus
  ``max_queue`` messages) is disconnected with a log line saying why -- it is never silently
  skipped, which is what QEMU's server does once a client's socket buffer is full. All queues
  together are bounded too (``max_queued_total``): past it, the longest queues go first.
* **Fds in flight.** The kernel counts every fd sent but not yet received against the sending
  user's open-file limit and refuses more (ETOOMANYREFS) past it, for every client at once.
  Clients that do not read can fill that budget; the server then warns once, retries with a
  back-off, and disconnects the clients that hold the most unread messages and read none of
  them, largest first (their unread fds are returned once their process reads or closes).
* **Fd lifetimes.** A queued message may carry the eventfd of a peer that has left since. Every
  eventfd therefore lives in a :class:`SharedFd`, a reference-counted holder: the peer's table
  entry holds one reference and every queued message one more, and the fd is closed when the
  last goes. A number is never sent after it was closed (or reused by the kernel for another
  file), and every fd the server creates is inside a holder or a socket object from the moment
  it exists, so no error path leaks it.
* **One client's failure is that client's problem.** Accept errors (EMFILE included: accepting
  pauses with a back-off and resumes), a client that closes during its handshake, a client that
  sends bytes (a protocol violation that QEMU's server also answers with a disconnect), a
  client refused by the allow-list: each is logged and the server goes on.
* **Scale.** The default asyncio selector on Linux is epoll, so fds above 1023 are fine, and
  the soft fd limit is raised to the hard one at start. Client sockets are watched for their
  leave through one epoll set of the server's own (:mod:`.readers`), not a loop reader each.

Clients never send anything on the ivshmem socket, so the status query lives on a second Unix
socket (``status_socket``): connecting to it returns one JSON document (see
:meth:`Server.status`) and EOF. :func:`query_status` is the client side.

With ``format_region`` the server keeps the membership table of the channel layout
(:mod:`ivshmem.channel`) in the region: a peer is listed before its handshake is sent (so it
finds itself there at once) and unlisted when it leaves, also at shutdown; with
``membership_vector`` every other peer is rung on that vector after each join or leave has
been announced. Guests, which cannot learn membership from the device, read the table.
Membership observers (:class:`MembershipObserver`) are told about every join and leave after
the announcements are queued, for anything else that wants to follow membership.

The package has one module per job: :mod:`.config` (options and defaults), :mod:`.core` (the
asyncio loop: accepting, admitting and dropping clients), :mod:`.region` (the backings and the
membership table), :mod:`.queues` (per-client queues and flushing), :mod:`.flow` (send stalls
and clients that do not read), :mod:`.admission` (the bound per client process),
:mod:`.shortage` (running out of fds), :mod:`.access` (credentials and allow-lists),
:mod:`.sockets` (claiming and listening), :mod:`.status` (the status socket), :mod:`.pidfile`
and :mod:`.fds` (:class:`SharedFd`, the fd limit).
"""

from .access import client_allowed, peer_credentials, peer_groups
from .base import MembershipObserver
from .config import (
    BACKINGS,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_QUEUED_TOTAL,
    DEFAULT_SHM_NAME,
    DEFAULT_SIZE,
    DEFAULT_SOCKET_PATH,
    MAX_ID,
    QEMU_MAX_VECTORS,
    ServerConfig,
    parse_gid,
    parse_uid,
)
from .core import Server, run
from .fds import SharedFd, raise_fd_limit
from .sockets import sd_notify
from .status import query_status, status_path_for

__all__ = [
    "BACKINGS",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_QUEUED_TOTAL",
    "DEFAULT_SHM_NAME",
    "DEFAULT_SIZE",
    "DEFAULT_SOCKET_PATH",
    "MAX_ID",
    "QEMU_MAX_VECTORS",
    "MembershipObserver",
    "Server",
    "ServerConfig",
    "SharedFd",
    "client_allowed",
    "parse_gid",
    "parse_uid",
    "peer_credentials",
    "peer_groups",
    "query_status",
    "raise_fd_limit",
    "run",
    "sd_notify",
    "status_path_for",
]

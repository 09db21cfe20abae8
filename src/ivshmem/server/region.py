"""The shared-memory region: opening its backing (POSIX shm, a directory such as
hugetlbfs, a memfd, a named file), checking a kept channel layout before growing it, the
membership table the server keeps in a formatted region, and keeping an unsealed region at
its size (:mod:`ivshmem.server.regionguard`: checked on every join and every
``CHECK_INTERVAL`` seconds)."""

from __future__ import annotations

import errno
import logging
import os
import stat

from ..errors import ClosedError, IvshmemError, ServerConfigError, UsageError
from ..memory import (
    SharedMemory,
    ShrinkRefusedError,
    format_size,
    posix_shm_path,
    round_up_power_of_two,
)
from ..protocol import PeerTable
from .base import ServerBase
from .fds import SharedFd
from .queues import new_wire
from .regionguard import RegionGuard, RegionMembership

log = logging.getLogger("ivshmem.server")

#: QEMU's server tries doubling sizes up to this when ftruncate fails in a directory backing
#: (hugetlbfs only accepts multiples of its page size); so do we.
_MAX_HUGEPAGE_SIZE = 1 << 30


class RegionMixin(ServerBase):
    """The region and its membership table."""

    @property
    def shm(self) -> SharedMemory:
        """The shared memory (for observers that format or read the region)."""
        if self._shm is None or self._shm.closed:
            raise ClosedError("the server is not open")
        return self._shm

    def _open_shm(self) -> None:
        cfg = self.config
        size = round_up_power_of_two(cfg.size)
        if size != cfg.size:
            log.info(
                "size %s (%d bytes) rounded up to %s, the next power of two (QEMU sizes the "
                "BAR as a power of two)",
                format_size(cfg.size),
                cfg.size,
                format_size(size),
            )
        if cfg.format_region and not cfg.reformat and cfg.backing in ("posix", "file"):
            self._check_layout_fits(size)
        shm: SharedMemory
        try:
            if cfg.backing == "memfd":
                shm = SharedMemory.memfd(size, "ivshmem")
            elif cfg.backing == "posix":
                shm = SharedMemory.posix(
                    cfg.shm_path, size, cfg.mode, owner_uid=os.geteuid(), group=cfg.group
                )
            elif cfg.backing == "file":
                # Never through a symbolic link: a link planted at the path would make the
                # server resize and chmod whatever it points to.
                shm = SharedMemory.file(
                    cfg.shm_path,
                    size,
                    cfg.mode,
                    follow_symlinks=False,
                    owner_uid=os.geteuid(),
                    group=cfg.group,
                    pseudo_filesystems=False,  # never /proc/self/mem
                )
            else:
                shm = self._open_in_directory(size)
        except ShrinkRefusedError as err:
            flag = "-M" if cfg.backing == "posix" else "--file"
            raise ServerConfigError(
                f"shared memory {err.path} ({flag}) is {format_size(err.current)}, larger than "
                f"the {format_size(err.requested)} asked for with -l: shrinking it would crash "
                "(SIGBUS) every process that still maps its end, such as a running VM or a "
                f"peer of an earlier server; start with -l {format_size(err.current)} or more, "
                f"or remove it first (rm {err.path}) if its content is not needed"
            ) from err
        if shm.previous_size is not None:
            log.info(
                "grew shared memory %s from %s to %s (its content is kept; processes that "
                "mapped it before see only the first %s)",
                shm.path,
                format_size(shm.previous_size),
                format_size(shm.size),
                format_size(shm.previous_size),
            )
        self.size = shm.size
        self._shm = shm
        self._guard = RegionGuard(shm)
        self._shm_ref = SharedFd(shm.fd, close=lambda _fd: shm.close())
        self._table = PeerTable(self._shm_ref, first_id=cfg.first_id)
        self._wire = new_wire(cfg.vectors, shm.fd)

    def _check_layout_fits(self, size: int) -> None:
        """Before a named region is grown: refuse to start if it carries a channel layout
        that growing it would make stale (the layout records the region's size), or one of
        another layout version, saying how to go on. Anything unusual about the file (missing,
        a link, not ours) is left to the opening code, which explains it."""
        from ..channel.layout import LAYOUT_VERSION, PAGE, peek_header

        cfg = self.config
        path = cfg.shm_path if cfg.backing == "file" else posix_shm_path(cfg.shm_path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < PAGE:
                return
            header = peek_header(os.pread(fd, PAGE, 0))
        except OSError:
            return
        finally:
            os.close(fd)
        if header is None:
            return
        version, formatted, _ = header
        flag = "-M" if cfg.backing == "posix" else "--file"
        erase = "--reformat to lay it out afresh (this erases every channel in it)"
        if version != LAYOUT_VERSION:
            raise ServerConfigError(
                f"shared memory {path} ({flag}) carries a channel layout of version {version}; "
                f"this server writes version {LAYOUT_VERSION}: add {erase}, or run the "
                "version of this project that formatted it"
            )
        final = max(size, st.st_size)
        if formatted != final:
            raise ServerConfigError(
                f"shared memory {path} ({flag}) carries a channel layout for "
                f"{format_size(formatted)}, and would be {format_size(final)} with -l "
                f"{format_size(size)}: start with -l {format_size(formatted)} to keep its "
                f"channels, or add {erase}"
            )

    def _open_in_directory(self, size: int) -> SharedMemory:
        directory = self.config.shm_path
        attempt = size
        while True:
            try:
                return SharedMemory.in_directory(directory, attempt)
            except UsageError as err:
                cause = err.__cause__
                # hugetlbfs rejects sizes that are not multiples of its page size (EINVAL):
                # QEMU's server then tries the next powers of two up to 1 GiB; so do we.
                if not (
                    isinstance(cause, OSError)
                    and cause.errno == errno.EINVAL
                    and attempt < _MAX_HUGEPAGE_SIZE
                ):
                    raise
                attempt *= 2
                log.info(
                    "%s cannot hold %s (%s); trying %s",
                    directory,
                    format_size(attempt // 2),
                    cause.strerror,
                    format_size(attempt),
                )

    def _open_membership(self) -> None:
        """Take the membership table's writer role, formatting the region first unless it
        already carries the layout (kept across a restart)."""
        # Written with pwrite (or into a sealed region's mapping): see ivshmem.server.regionguard.
        assert self._guard is not None and self._shm is not None
        self._membership = RegionMembership.open(
            self._guard, self._shm, max_peers=self.config.max_peers, reformat=self.config.reformat
        )

    def _membership_joined(self, peer: int) -> None:
        if self._membership is None:
            return
        try:
            self._membership.joined(peer, self.config.vectors)
        except IvshmemError as err:  # e.g. every slot taken: the peer still gets doorbells
            log.warning("peer %d is not in the membership table: %s", peer, err)

    def _membership_changed(self, peer: int) -> None:
        """Ring the membership vector of every peer but ``peer`` (who joined or left)."""
        vector = self.config.membership_vector
        if vector is None or self._table is None:
            return
        for other in list(self._table):
            if other != peer:
                self.ring(other, vector)

    # -- the region's size ----------------------------------------------------------------

    def _check_region(self) -> None:
        """Restore an unsealed region's size if a peer changed it, write back what the
        server keeps in it, and ring the membership vector if that changed the table."""
        guard = self._guard
        if guard is None or guard.sealed or self._closed:
            return
        resized = guard.check() is not None
        if self._membership is not None and self._membership.repair(resized):
            self._membership_changed(-1)

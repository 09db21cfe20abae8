"""The guest endpoint: an ivshmem PCI device behind the common :class:`Endpoint` contract.

Two ways to open a device, chosen by :func:`open_pci`:

* **VFIO** (ivshmem-doorbell bound to vfio-pci): BARs are mapped through the VFIO device fd
  and every MSI-X vector signals an eventfd, so ``wait``, ``wait_async``, ``fileno`` work as
  for a host peer. A device in the seed's legacy **INTx mode** (this project's vfio-user
  device with ``--intx``: interrupt pin 1, no MSI-X) has one level-triggered line instead:
  VFIO signals one eventfd, the endpoint reads IntrStatus (which clears it and lowers the
  line), turns each bit set into a ring of that vector, and unmasks the line; ``wait`` and
  ``wait_async`` work the same.
* **sysfs** (ivshmem-plain, or a doorbell device used without interrupts): BAR0 and BAR2 are
  mapped from ``resource0``/``resource2``. Ringing other peers still works on a doorbell
  device (it is only a store to BAR0), but nothing can be received: ``wait`` raises
  :class:`DoorbellUnavailableError` saying how to get interrupts.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Literal

from .._args import flag_arg, int_arg, peer_arg, range_arg
from ..endpoint import EventfdEndpoint
from ..errors import (
    DeviceError,
    DoorbellUnavailableError,
    UnknownVectorError,
    UsageError,
)
from ..memory import format_size
from ..registers import EVENTS, GENERATION, INTRMASK, INTRSTATUS
from ._bind import VFIO_PCI, bind_commands, bind_vfio_pci, check_vfio_ready, unbind_command
from ._errors import (
    BarError,
    DevicePermissionError,
    InterruptsUnavailableError,
    WrongDriverError,
    driver_error,
)
from ._extension import (
    DeviceStatus,
    Extension,
    Membership,
    MembershipEvent,
    ServerState,
    probe,
    read_membership,
    read_status,
    server_state,
)
from ._mmio import (
    DOORBELL,
    MAX_VECTORS,
    PAGE_SIZE,
    REGISTERS_SIZE,
    BarMapping,
    FdRegisters,
    MappedRegisters,
    Registers,
    doorbell_value,
)
from ._sysfs import IvshmemDevice, find_devices, select_device
from ._vfio import (
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
    VfioDevice,
)

__all__ = ["InterruptMode", "PciEndpoint", "PeersSource", "open_pci", "read_ivposition"]

log = logging.getLogger(__name__)

#: A callable giving the ids of the other peers (e.g. read from a formatted region's
#: membership table); see :meth:`PciEndpoint.set_peers_source`.
PeersSource = Callable[[], frozenset[int]]

#: How an opened endpoint receives doorbells: ``"msix"`` (one eventfd per MSI-X vector),
#: ``"intx"`` (the legacy line, demultiplexed through IntrStatus) or None (it cannot).
InterruptMode = Literal["msix", "intx"] | None

#: IntrStatus is 32 bits wide: in INTx mode a device can report at most 32 vectors apart.
MAX_INTX_VECTORS = 32


class _Intx:
    """The legacy INTx line through VFIO, turned into per-vector counts.

    vfio-pci signals ``trigger`` and masks the line (INTx is level-triggered). :meth:`service`
    reads IntrStatus, which clears it, so the device lowers the line; each bit set counts a
    ring of that vector on the endpoint's vector eventfd (bits the endpoint has no vector for
    go to vector 0: a ring is never dropped, and QEMU's and the seed's devices only ever set
    bit 0); then it unmasks the line. Order matters: unmasking before the read would let the
    still-raised line interrupt again at once, for a ring already counted.
    """

    def __init__(self, trigger: int, registers: Registers, unmask: Callable[[], None]) -> None:
        self.trigger = trigger  # owned by the endpoint, closed with its eventfds
        self._registers = registers
        self._unmask = unmask

    def service(self, vector_fds: Sequence[int]) -> int:
        """Take one interrupt if one is pending; return the IntrStatus bits it carried."""
        # A plain read is enough here: the trigger is ours alone (made by this endpoint, given
        # only to vfio-pci), so nobody else can clear its O_NONBLOCK or take its count.
        try:
            os.eventfd_read(self.trigger)
        except BlockingIOError:
            return 0
        status = self._registers.read32(INTRSTATUS)
        bits = status
        while bits:
            bit = (bits & -bits).bit_length() - 1
            bits &= bits - 1
            os.eventfd_write(vector_fds[bit if bit < len(vector_fds) else 0], 1)
        self._unmask()
        return status


class PciEndpoint(EventfdEndpoint):
    """An opened ivshmem PCI device. Create with :func:`open_pci`."""

    def __init__(
        self,
        device: IvshmemDevice,
        registers: Registers,
        shared: BarMapping,
        *,
        id: int,
        vfio: VfioDevice | None = None,
        eventfds: Sequence[int] = (),
        max_vector: int = MAX_VECTORS,
        no_irq_reason: str | None = None,
        extension: Extension | None = None,
        intx: _Intx | None = None,
    ) -> None:
        # Takes ownership of everything passed in.
        self._device = device
        self._registers = registers
        self._shared = shared
        self._vfio = vfio
        self._eventfds = list(eventfds)
        self._id = id
        self._max_vector = max_vector
        self._peers_source: PeersSource | None = None
        self._no_irq_reason = no_irq_reason
        self._extension = extension
        self._intx = intx
        self._closed = False
        if intx is not None:
            self._how = f"vfio intx vectors={len(self._eventfds)}"
        else:
            self._how = f"vfio vectors={len(self._eventfds)}" if self._eventfds else "sysfs"

    # -- what it is ------------------------------------------------------------------------

    @property
    def device(self) -> IvshmemDevice:
        """The sysfs description of the device (address, kind, driver, BARs…)."""
        return self._device

    @property
    def interrupts(self) -> bool:
        """Whether doorbells can be received (VFIO with MSI-X or INTx)."""
        return bool(self._eventfds)

    @property
    def interrupt_mode(self) -> InterruptMode:
        """``"msix"``, ``"intx"`` (the legacy line, see the module docstring) or None."""
        if not self._eventfds:
            return None
        return "intx" if self._intx is not None else "msix"

    @property
    def intx_fd(self) -> int | None:
        """In INTx mode, the eventfd VFIO signals for the line (None otherwise). An event
        loop that watches fds itself watches this one and calls ``wait(timeout=0)`` when it
        is readable: the vector fds count a ring only once the line was serviced."""
        return None if self._intx is None else self._intx.trigger

    @property
    def id(self) -> int:
        """IVPosition: the peer id the server gave this device (read once at open: QEMU fixes
        it when the device starts). An ivshmem-plain device has no server: its id is the one
        given to :func:`open_pci` (default 0, which is also what its IVPosition reads).

        This project's device keeps the VM running across a restart of the server, which may
        hand out a new id: :meth:`membership` and :meth:`take_events` (when they see
        ``RECONNECTED``) read IVPosition again and update this."""
        return self._id

    @property
    def size(self) -> int:
        return self._shared.size

    @property
    def memory(self) -> memoryview:
        self._check_open()
        return self._shared.memory

    @property
    def vectors(self) -> int:
        """Vectors this endpoint receives on (MSI-X vectors enabled; 0 without interrupts)."""
        return len(self._eventfds)

    # -- peers -----------------------------------------------------------------------------

    @property
    def peers(self) -> frozenset[int]:
        """The other peers connected to the server: from this project's device's membership
        registers when it offers them, else from :meth:`set_peers_source` if one was given,
        else from the region's membership table when the server keeps one (``--format``);
        PeersUnknownError otherwise."""
        self._check_open()
        # This project's device answers from its membership registers, before anything else.
        if self._extension is not None and self._extension.membership:
            return self.membership().peers
        if self._peers_source is not None:
            return self._peers_source()
        return self._peers_from_table()

    def _peers_from_table(self) -> frozenset[int]:
        """The fallback of :attr:`peers`: the membership table a server with ``--format``
        keeps in the shared region (every listed id but ours)."""
        from ..channel.layout import listed_peers

        return listed_peers(
            self._shared.memory,
            self._id,
            f"{self._device.describe()}: a guest cannot learn from QEMU's device which peers are "
            "connected (the server tells only QEMU, which shows the guest nothing but its own "
            "IVPosition); with a server started with --format, peers answers from the "
            "region's membership table, and this project's device (ivshmem-device) answers "
            "from its registers",
        )

    def set_peers_source(self, source: PeersSource | None) -> None:
        """Make :attr:`peers` answer from ``source`` (e.g. a membership table kept in the
        shared region by a layer above); None restores "cannot be known"."""
        if source is not None and not callable(source):
            raise UsageError(
                f"a peers source is a callable returning the peer ids (or None), not {source!r}"
            )
        self._peers_source = source

    # -- this project's device: the register extension ---------------------------------------

    @property
    def extension(self) -> Extension | None:
        """What this project's vfio-user device offers beyond QEMU's (features, the vector
        membership events ring); None on QEMU's devices, which have none of it."""
        return self._extension

    def _need_extension(self, what: str, membership: bool = False) -> Extension:
        self._check_open()
        ext = self._extension
        if ext is None:
            raise DeviceError(
                f"{self._device.describe()}: {what} needs this project's ivshmem device "
                "(ivshmem-device over vfio-user, QEMU >= 10.1); QEMU's own ivshmem device "
                "has no such registers"
            )
        if membership and not ext.membership:
            raise DeviceError(
                f"{self._device.describe()}: {what}: this device does not offer membership "
                "registers (a plain region has no server, so no peers)"
            )
        return ext

    def membership(self) -> Membership:
        """A consistent snapshot of the peers from the device's registers (generation, the
        other peers' ids, the server connection's state). Re-reads this device's own id too:
        it changes when the device reconnected to a restarted server."""
        ext = self._need_extension("reading the membership", membership=True)
        snapshot = read_membership(self._registers, self._device.describe())
        if ext.server and snapshot.server_state == "connected":
            self._id = self._registers.ivposition()
        return snapshot

    @property
    def generation(self) -> int:
        """The membership Generation register: changes on every join, leave and server
        (re)connection; compare two readings to learn that something changed."""
        self._need_extension("the membership generation", membership=True)
        return self._registers.read32(GENERATION)

    @property
    def server_state(self) -> ServerState:
        """``"connected"``, ``"reconnecting"`` (the server is gone; memory works, doorbells
        do not) or ``"plain"`` (a region without server)."""
        self._need_extension("the server state")
        return server_state(self._registers)

    def take_events(self) -> MembershipEvent:
        """The membership events (joined, left, reconnected, server lost) since the last
        call, cleared by this read (the Events register clears on read: one reader per
        guest). After ``RECONNECTED`` :attr:`id` is read again."""
        self._need_extension("membership events", membership=True)
        events = MembershipEvent(self._registers.read32(EVENTS) & 0xF)
        if events & MembershipEvent.RECONNECTED:
            self._id = self._registers.ivposition()
        return events

    def wait_membership(self, timeout: float | None = None) -> MembershipEvent:
        """Block until a peer joins or leaves or the server connection changes; return the
        events (:meth:`take_events`), ``MembershipEvent.NONE`` (false) after ``timeout``.

        Needs interrupts (MSI-X or INTx) and a device started with a membership event vector:
        this waits on that vector, so do not use it for doorbells of your own meanwhile.
        """
        ext = self._need_extension("waiting for membership events", membership=True)
        if not ext.membership_irq or ext.event_vector is None:
            raise DeviceError(
                f"{self._device.describe()}: the device rings no vector on membership events: "
                "start ivshmem-device with a membership event vector, or poll generation"
            )
        if ext.event_vector >= self.vectors:
            if not self._eventfds:
                raise self._no_interrupts()
            raise UnknownVectorError(ext.event_vector, self.vectors)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            events = self.take_events()
            if events:
                return events
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.wait(ext.event_vector, left) is None:
                return self.take_events()

    # -- doorbells -------------------------------------------------------------------------

    def notify(self, peer: int, vector: int = 0) -> None:
        """Ring ``vector`` of ``peer`` through the doorbell register.

        A guest cannot know which ids are connected, so any id 0..65535 is accepted; QEMU
        silently drops a ring to an id (or a vector) that has no peer behind it.
        """
        peer = int_arg(peer, "peer id")  # numpy ints pass; ranges: doorbell_value below
        vector = int_arg(vector, "vector")
        self._check_open()
        if not self._device.doorbell:
            raise DoorbellUnavailableError(
                f"{self._device.describe()} is an ivshmem-plain device: it has no doorbell; "
                "use -device ivshmem-doorbell with an ivshmem server to ring peers"
            )
        value = doorbell_value(peer, vector)  # range checks: 0..65535, 0..255
        if vector >= self._max_vector:
            # Every peer of a QEMU-compatible server has the same vector count, and a device
            # cannot start with fewer MSI-X vectors than that count: a vector beyond our own
            # table exists for nobody.
            raise UnknownVectorError(vector, self._max_vector, peer)
        self._registers.write32(DOORBELL, value)

    def _no_interrupts(self) -> DoorbellUnavailableError:
        dev = self._device
        if not dev.doorbell:
            how = (
                "an ivshmem-plain device has no interrupts: use -device ivshmem-doorbell with "
                "an ivshmem server to receive doorbells"
            )
        elif self._no_irq_reason is not None:
            return DoorbellUnavailableError(
                "cannot wait for doorbells: the device was mapped through sysfs, without "
                f"interrupts, because: {self._no_irq_reason}"
            )
        else:
            how = (
                "it was opened with interrupts=False: to receive doorbells open it with "
                "interrupts=True (and bind_vfio=True, as root, in a guest with an IOMMU) so "
                "MSI-X arrives through VFIO"
            )
        return DoorbellUnavailableError(f"{dev.describe()}: cannot wait for doorbells: {how}")

    def _own_fds(self) -> Sequence[int]:
        return self._eventfds

    def _extra_fds(self) -> Sequence[int]:
        return () if self._intx is None else (self._intx.trigger,)

    def _on_extra(self, fd: int) -> None:
        if self._intx is not None and fd == self._intx.trigger:
            self._intx.service(self._eventfds)

    def _candidates(self, vector: int | None) -> list[tuple[int, int]]:
        self._check_open()
        if not self._eventfds:
            raise self._no_interrupts()
        return super()._candidates(vector)

    def fileno(self, vector: int = 0) -> int:
        self._check_open()
        if not self._eventfds:
            raise self._no_interrupts()
        return super().fileno(vector)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disable interrupts, unmap BAR0 and BAR2, close VFIO and eventfds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fds_changed()  # unregister async readers and cached poll sets before fds go
        first: BaseException | None = None
        steps: list[Callable[[], None]] = []
        if self._intx is not None:
            # Leave the device with its line quiet: nobody will read IntrStatus any more.
            steps.append(lambda: self._registers.write32(INTRMASK, 0))
        steps += [self._registers.close, self._shared.close]
        if self._vfio is not None:
            steps.append(self._vfio.close)  # disables MSI-X/INTx before the eventfds go
        for step in steps:
            try:
                step()
            except Exception as err:  # release the rest anyway; report the first failure
                first = first or err
        fds, self._eventfds = self._eventfds, []
        if self._intx is not None:
            fds.append(self._intx.trigger)
        for fd in fds:
            os.close(fd)
        if first is not None:
            raise first

    def __enter__(self) -> PciEndpoint:
        return self

    def __repr__(self) -> str:
        dev = self._device
        state = "closed" if self._closed else f"id={self._id} {format_size(self.size)}"
        return f"<PciEndpoint {dev.address} ivshmem-{dev.kind} {state} {self._how}>"


# -- opening ---------------------------------------------------------------------------------

Interrupts = bool | Literal["auto"]


def open_pci(
    device: str | int | None = None,
    *,
    interrupts: Interrupts = "auto",
    bind_vfio: bool = False,
    write_combining: bool = False,
    vectors: int | None = None,
    id: int | None = None,
    intx: bool | None = None,
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
) -> PciEndpoint:
    """Open an ivshmem PCI device from inside a Linux guest.

    ``device``: a PCI address (``"0000:00:04.0"`` or ``"00:04.0"``), an index into the
    ivshmem devices in address order (``0``, or ``"0"``), or None for the only one.

    ``interrupts``: ``True`` receives doorbells through VFIO (doorbell devices only; the
    device must be bound to vfio-pci, or ``bind_vfio=True``) and raises when that cannot be
    done; ``False`` maps the BARs through sysfs (no ``wait``); ``"auto"`` (the default) tries
    VFIO for a doorbell device and falls back to sysfs when VFIO cannot be used (not bound
    and ``bind_vfio`` not given, no IOMMU, no modules…): ``wait`` then says why.

    ``bind_vfio``: bind the device to vfio-pci first (root; it stays bound after close).
    ``write_combining``: map BAR2 from sysfs ``resource2_wc`` (faster bulk writes; order
    matters only against the doorbell, which drains the write-combining buffers).
    ``vectors``: how many MSI-X vectors to enable through VFIO (default: all it has); in
    INTx mode, how many vectors IntrStatus bits are told apart for (1..32; default 1, or
    enough to include the device's membership event vector).
    ``intx``: receive doorbells through the legacy INTx line instead of MSI-X (True), never
    (False), or None (the default): INTx when the device has an interrupt pin and no MSI-X,
    as this project's vfio-user device in its INTx mode.
    ``id``: the peer id of an ivshmem-plain device (it has no server to assign one);
    for a doorbell device it may only repeat IVPosition.
    ``sysfs_root``/``dev_root``: where sysfs and /dev are (tests use fake trees).
    """
    # The argument rule (ivshmem._args): checked before anything is opened.
    if not (interrupts is True or interrupts is False or interrupts == "auto"):
        raise UsageError(f"interrupts must be True, False or 'auto', not {interrupts!r}")
    if device is not None and (isinstance(device, bool) or not isinstance(device, (str, int))):
        raise UsageError(
            f"device must be a PCI address (str), a device index (int) or None, not {device!r}"
        )
    bind_vfio = flag_arg(bind_vfio, "bind_vfio")
    write_combining = flag_arg(write_combining, "write_combining")
    if vectors is not None:
        vectors = range_arg(vectors, "vectors", 1, MAX_VECTORS)
    if id is not None:
        id = peer_arg(id)
    for name, value in (("sysfs_root", sysfs_root), ("dev_root", dev_root)):
        if not isinstance(value, str) or not value or "\0" in value:
            raise UsageError(f"{name} must be a directory path (str), not {value!r}")
    if vectors is not None and (isinstance(vectors, bool) or vectors < 1):
        raise UsageError(f"vectors must be a positive number, not {vectors!r}")
    if intx not in (True, False, None):
        raise UsageError(f"intx must be True, False or None, not {intx!r}")
    dev = select_device(find_devices(sysfs_root), device, sysfs_root)
    if not dev.doorbell:
        if interrupts is True:
            raise InterruptsUnavailableError(
                f"{dev.describe()} has no interrupts (no MSI-X): use -device ivshmem-doorbell "
                "with an ivshmem server, or open it with interrupts=False"
            )
        return _open_sysfs(dev, write_combining, id, None)
    if interrupts is False:
        return _open_sysfs(dev, write_combining, id, None)
    try:
        dev = _prepare_vfio(dev, bind_vfio)
    except DeviceError as err:
        if interrupts is True:
            raise
        # "auto": without VFIO the device is still usable (memory, notify); wait() will say
        # why it cannot receive.
        log.info("%s: no interrupts, mapping through sysfs: %s", dev.describe(), err)
        return _open_sysfs(dev, write_combining, id, str(err))
    return _open_vfio(dev, dev_root, write_combining, vectors, id, intx)


def _prepare_vfio(dev: IvshmemDevice, bind_vfio: bool) -> IvshmemDevice:
    """The device, bound to vfio-pci (binding it if allowed), or the error saying why not."""
    if dev.driver == VFIO_PCI:
        return dev
    if bind_vfio:
        return bind_vfio_pci(dev)
    check_vfio_ready(dev)  # a missing module or IOMMU is the more useful news
    raise driver_error(
        f"{dev.describe()} is bound to {dev.driver or 'no driver'}, not {VFIO_PCI}, so its "
        "interrupts cannot be received: open it with bind_vfio=True (as root), or bind it "
        f"yourself as root: {bind_commands(dev)}",
        dev.driver,
    )


def _check_bars(dev: IvshmemDevice) -> None:
    bar0, bar2 = dev.bar(0), dev.bar(2)
    if bar0 is None or not bar0.is_memory or bar0.size < REGISTERS_SIZE:
        size = "missing" if bar0 is None else f"{bar0.size} bytes"
        raise BarError(
            f"{dev.describe()}: BAR0 (registers) is {size}; ivshmem needs a memory BAR of at "
            f"least {REGISTERS_SIZE} bytes: is this really a QEMU ivshmem device?"
        )
    if bar2 is None or not bar2.is_memory:
        raise BarError(
            f"{dev.describe()}: BAR2 (shared memory) is missing or not assigned: the guest "
            "kernel could not place it (check `dmesg` for 'BAR 2' and give the VM more "
            "address space, e.g. a 64-bit PCI hole)"
        )


def _resolve_id(dev: IvshmemDevice, ivposition: int, id: int | None) -> int:
    if id is None:
        return ivposition
    if isinstance(id, bool) or not 0 <= id <= 0xFFFF:
        raise UsageError(f"peer id {id!r} is out of range 0..65535")
    if dev.doorbell and id != ivposition:
        raise UsageError(
            f"{dev.describe()}: its peer id is {ivposition} (IVPosition, given by the server); "
            f"it cannot be {id}: leave id unset for a doorbell device"
        )
    return id


def _open_resource(dev: IvshmemDevice, index: int, wc: bool, size: int) -> BarMapping:
    """mmap sysfs ``resource<index>`` (or ``_wc``); these files cannot be read(), only mapped."""
    bar = dev.bar(index)
    assert bar is not None
    name = f"resource{index}" + ("_wc" if wc else "")
    path = dev.file(name)
    what = f"BAR{index}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        if wc:
            raise BarError(
                f"{dev.describe()}: {path} does not exist: the kernel offers no "
                f"write-combining mapping of {what}; open without write_combining"
            ) from err
        raise BarError(f"{dev.describe()}: {path} does not exist") from err
    except PermissionError as err:
        raise DevicePermissionError(
            f"{dev.describe()}: no permission to open {path}: mapping a BAR needs root"
        ) from err
    except OSError as err:
        raise BarError(f"{dev.describe()}: cannot open {path}: {err.strerror or err}") from err
    try:
        st_size = os.fstat(fd).st_size
        if 0 < st_size < size:
            raise BarError(
                f"{dev.describe()}: {path} is {st_size} bytes, but {what} is {size} bytes"
            )
        # The mapping starts at the page holding the BAR: keep the BAR's offset in that page.
        page_offset = bar.start % PAGE_SIZE
        if page_offset and 0 < st_size < page_offset + size:
            # Python's mmap will not map past the end of a regular file, and a sysfs resource
            # file is exactly as long as its BAR: a BAR that does not start a page cannot be
            # reached this way. VFIO reads registers with pread/pwrite instead.
            raise BarError(
                f"{dev.describe()}: {what} starts {page_offset:#x} bytes into a page, which "
                f"cannot be mapped through {path}: open the device through VFIO "
                "(interrupts=True, bind_vfio=True)"
            )
        return BarMapping(fd, size, 0, page_offset, what)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError):
            raise BarError(f"{dev.describe()}: mapping {path} failed: {err}") from err
        if err.errno == errno.EPERM:
            raise DevicePermissionError(
                f"{dev.describe()}: the kernel refused to map {path} (EPERM): as root this "
                "means kernel lockdown (secure boot) forbids BAR access from user space"
            ) from err
        if err.errno == errno.EINVAL and dev.driver is not None:
            # With CONFIG_IO_STRICT_DEVMEM (Debian's default) sysfs will not map a BAR that
            # a driver has claimed; vfio-pci claims them while a VFIO user has the device open.
            if dev.driver == VFIO_PCI:
                hint = (
                    "a VFIO user (this process or another) has the device open and holds its "
                    "BARs: use that endpoint, or close it first"
                )
            else:
                hint = (
                    f"driver {dev.driver} claims it: unbind that driver first (as root: "
                    f"{unbind_command(dev)})"
                )
            raise WrongDriverError(
                f"{dev.describe()}: the kernel refused to map {path} (EINVAL): {hint}",
                dev.driver,
            ) from err
        raise BarError(f"{dev.describe()}: mapping {path} failed: {err.strerror or err}") from err
    finally:
        os.close(fd)  # the mapping keeps what it needs


def read_ivposition(device: IvshmemDevice) -> int:
    """Read IVPosition through sysfs without opening the whole device (needs root; fails
    with WrongDriverError while a VFIO user holds the device)."""
    if not isinstance(device, IvshmemDevice):
        raise UsageError(
            f"expected an IvshmemDevice (from find_devices() or select_device()), not {device!r}"
        )
    _check_bars(device)
    bar0 = device.bar(0)
    assert bar0 is not None
    mapping = _open_resource(device, 0, False, bar0.size)
    registers = MappedRegisters(mapping)
    try:
        return registers.ivposition()
    finally:
        registers.close()


def read_device_status(device: IvshmemDevice) -> DeviceStatus | None:
    """What this project's device says about itself through its registers (features, peers,
    server state), read through sysfs like :func:`read_ivposition` (needs root); None for
    QEMU's device."""
    if not isinstance(device, IvshmemDevice):
        raise UsageError(
            f"expected an IvshmemDevice (from find_devices() or select_device()), not {device!r}"
        )
    bar0 = device.bar(0)
    if bar0 is None:
        return None
    mapping = _open_resource(device, 0, False, bar0.size)
    registers = MappedRegisters(mapping)
    try:
        return read_status(registers, bar0.size)
    except DeviceError as err:
        raise DeviceError(f"{device.address}: {err}") from None
    finally:
        registers.close()


def _open_sysfs(
    dev: IvshmemDevice, write_combining: bool, id: int | None, no_irq_reason: str | None
) -> PciEndpoint:
    _check_bars(dev)
    bar0, bar2 = dev.bar(0), dev.bar(2)
    assert bar0 is not None and bar2 is not None
    regs_map = _open_resource(dev, 0, False, bar0.size)
    shared: BarMapping | None = None
    try:
        registers = MappedRegisters(regs_map)
        shared = _open_resource(dev, 2, write_combining, bar2.size)
        peer_id = _resolve_id(dev, registers.ivposition(), id)
        extension = probe(registers, bar0.size)
    except BaseException:
        regs_map.close()
        if shared is not None:
            shared.close()
        raise
    return PciEndpoint(
        dev,
        registers,
        shared,
        id=peer_id,
        max_vector=dev.msix_vectors or MAX_VECTORS,
        no_irq_reason=no_irq_reason,
        extension=extension,
    )


def _open_vfio(
    dev: IvshmemDevice,
    dev_root: str,
    write_combining: bool,
    vectors: int | None,
    id: int | None,
    intx: bool | None,
) -> PciEndpoint:
    _check_bars(dev)
    vfio = VfioDevice(dev, dev_root)
    registers: Registers | None = None
    shared: BarMapping | None = None
    eventfds: list[int] = []
    trigger: int | None = None
    try:
        bar0 = vfio.region_info(VFIO_PCI_BAR0_REGION_INDEX, "BAR0 (registers)")
        if bar0.size < REGISTERS_SIZE:
            raise BarError(
                f"{dev.describe()}: BAR0 is {bar0.size} bytes through VFIO, at least "
                f"{REGISTERS_SIZE} are needed"
            )
        if bar0.flags & VFIO_REGION_INFO_FLAG_MMAP:
            registers = MappedRegisters(
                vfio.map_region(VFIO_PCI_BAR0_REGION_INDEX, "BAR0 (registers)", REGISTERS_SIZE)
            )
        else:
            # vfio-pci mmaps a BAR smaller than a page only if it sits alone in its page;
            # QEMU's firmware packs the 256-byte BAR0 next to others, so pread/pwrite it is.
            registers = FdRegisters(vfio.fd, bar0.offset)
        if write_combining:
            bar2 = dev.bar(2)
            assert bar2 is not None
            # VFIO maps BARs uncached and has no write-combining option.
            shared = _open_resource(dev, 2, True, bar2.size)
        else:
            shared = vfio.map_region(VFIO_PCI_BAR2_REGION_INDEX, "BAR2 (shared memory)", 1)
        extension = probe(registers, bar0.size)
        available = vfio.msix_count()
        use_intx = intx is True or (intx is None and available == 0 and vfio.intx_available())
        intx_state: _Intx | None = None
        if use_intx:
            if not vfio.intx_available():
                raise InterruptsUnavailableError(
                    f"{dev.describe()}: VFIO offers no INTx line for it: the device has no "
                    "interrupt pin (QEMU's ivshmem devices have none; this project's device "
                    "has one in its INTx mode), or the line is shared with another device"
                )
            count = _intx_vectors(dev, vectors, extension)
            for _ in range(count):
                eventfds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            intx_state = _Intx(trigger, registers, vfio.unmask_intx)
            registers.read32(INTRSTATUS)  # drop a stale ring from before we listened
            vfio.enable_intx(trigger)
            # Every bit: a ring on a vector we do not tell apart still interrupts (and counts
            # for vector 0) rather than waiting, unseen, in IntrStatus for the next one.
            registers.write32(INTRMASK, 0xFFFFFFFF)
            max_vector = MAX_VECTORS  # the other peers' vector counts are not known here
        else:
            if available == 0:
                raise InterruptsUnavailableError(
                    f"{dev.describe()}: VFIO reports no MSI-X vectors: is it ivshmem-doorbell?"
                    + (" (it has an INTx line: open it with intx=True)" if dev.intx else "")
                )
            count = available if vectors is None else vectors
            if count > available:
                raise UsageError(
                    f"{dev.describe()} has {available} MSI-X vector(s); {count} were asked for"
                )
            for _ in range(count):
                eventfds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            vfio.enable_bus_master()
            vfio.enable_msix(eventfds)
            max_vector = available
        peer_id = _resolve_id(dev, registers.ivposition(), id)
    except BaseException:
        for closer in (registers, shared):
            if closer is not None:
                closer.close()
        try:
            vfio.close()
        finally:
            for fd in eventfds if trigger is None else [*eventfds, trigger]:
                os.close(fd)
        raise
    log.debug(
        "%s opened through VFIO: id %d, %d vector(s)%s",
        dev.describe(),
        peer_id,
        count,
        " over INTx" if use_intx else "",
    )
    return PciEndpoint(
        dev,
        registers,
        shared,
        id=peer_id,
        vfio=vfio,
        eventfds=eventfds,
        max_vector=max_vector,
        extension=extension,
        intx=intx_state,
    )


def _intx_vectors(dev: IvshmemDevice, vectors: int | None, extension: Extension | None) -> int:
    """How many vectors an INTx endpoint tells apart (IntrStatus bit n is vector n)."""
    if vectors is not None:
        if vectors > MAX_INTX_VECTORS:
            raise UsageError(
                f"{dev.describe()}: in INTx mode IntrStatus tells at most {MAX_INTX_VECTORS} "
                f"vectors apart; {vectors} were asked for"
            )
        return vectors
    if extension is not None and extension.event_vector is not None:
        return min(MAX_INTX_VECTORS, max(1, extension.event_vector + 1))
    return 1

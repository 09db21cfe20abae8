"""Drive a real QEMU's buses from a test, with no guest OS: qtest, PCI config space, ivshmem.

QEMU runs paused (``-S``) under TCG with ``-qtest``: the test listens on a Unix socket, QEMU
connects to it, and the test then sends one text command per line (``outl 0xcf8 …``,
``readl ADDR``, ``b64write ADDR LEN DATA`` …) which QEMU executes in its main loop as if a CPU
had issued the access, answering ``OK [value]`` or ``FAIL reason``. Lines that begin with
``IRQ`` are asynchronous and are set aside. QMP, QEMU's JSON control channel, is connected the
same way and used to stop QEMU politely.

Facts of Debian's QEMU 7.2 this module relies on:

* there is no ``-accel qtest``; ``-accel tcg -S`` works, and ``-S`` is needed, because running
  the firmware would reprogram the BARs behind the test's back;
* with ``-S`` no firmware runs at all, so every BAR reads 0 and the PCI COMMAND register is 0:
  the test itself assigns addresses and enables memory decoding and bus mastering;
* every command is executed in QEMU's main loop, the same loop that reads the ivshmem server
  socket and the vector eventfds, so polling guest memory through qtest lets those run.

:class:`Qemu` owns one process and always kills and reaps it (also when starting fails or the
test fails), and removes its socket and log files. :class:`PciDevice` reads and writes config
space through the legacy ports 0xcf8/0xcfc, sizes and places BARs. :class:`IvshmemDevice` puts
the ivshmem registers, BAR2 and MSI-X behind named methods.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "IvshmemDevice",
    "MsixCapability",
    "PciDevice",
    "Qemu",
    "QemuError",
    "QemuExitedError",
    "find_pci_devices",
    "poll_until",
]

# How long QEMU may take to connect, and to answer one command. Only hang catchers: a paused
# TCG QEMU connects in a few hundred milliseconds and answers in microseconds.
START_TIMEOUT = 20.0
REPLY_TIMEOUT = 20.0


class QemuError(Exception):
    """QEMU refused a command, broke the link, or could not be started."""


class QemuExitedError(QemuError):
    """The QEMU process ended while the test still needed it; its stderr is in the message."""


def poll_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.002
) -> bool:
    """Call ``predicate`` until it is true; False once ``timeout`` seconds passed.

    For effects QEMU produces asynchronously (an MSI written by its main loop, a peer's join
    reaching a host endpoint). The timeout only catches hangs: callers assert on the result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)


# -- process ------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_live: set[Qemu] = set()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the test runner itself is killed (pytest-timeout's hard kill, ^C twice), the kernel
    # kills QEMU too, so no paused QEMU outlives the suite.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@atexit.register
def _kill_leftovers() -> None:
    for qemu in list(_live):
        qemu.close()


def _listen(path: Path) -> socket.socket:
    if len(os.fsencode(path)) >= 108:
        raise QemuError(f"socket path {path} is too long for a Unix socket (108 bytes at most)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


class Qemu:
    """One ``qemu-system-x86_64`` process, paused, driven through qtest and QMP.

    Use as a context manager (or call :meth:`close`): the process is killed if still running
    and always reaped, and its sockets and log file are removed. ``extra_args`` are appended to
    the fixed command line (devices, memory backends, chardevs).
    """

    def __init__(
        self,
        binary: str | Sequence[str],
        workdir: Path,
        extra_args: Sequence[str] = (),
        *,
        name: str = "vm",
        machine: str = "q35",
        accel: str = "tcg",
    ) -> None:
        self.name = name
        self._workdir = Path(workdir)
        self._qtest_path = self._workdir / f"{name}.qtest"
        self._qmp_path = self._workdir / f"{name}.qmp"
        self._log_path = self._workdir / f"{name}.log"
        # ``binary`` may be an argv prefix (QEMU 11 runs chrooted: ivshmem.lab.qemu11); QEMU
        # >= 6 has ``-accel qtest``, which starts faster and runs no guest code at all.
        prefix = [binary] if isinstance(binary, str) else list(binary)
        self.argv: list[str] = [
            *prefix,
            "-machine", machine,
            "-accel", accel,
            "-S",
            "-display", "none",
            "-nodefaults",
            "-m", "128M",
            "-qtest", f"unix:{self._qtest_path}",
            # Without -qtest-log QEMU copies the whole qtest conversation to stderr.
            "-qtest-log", "/dev/null",
            "-chardev", f"socket,id=qmp,path={self._qmp_path}",
            "-mon", "chardev=qmp,mode=control",
            *extra_args,
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        self._qtest: socket.socket | None = None
        self._qtest_buf = b""
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""
        self.irq_events: list[str] = []
        self.qmp_events: list[dict[str, Any]] = []
        self._allocator = _AddressAllocator()
        self._start()

    # -- lifecycle ------------------------------------------------------------------------

    def _start(self) -> None:
        listeners: list[socket.socket] = []
        try:
            listeners.append(_listen(self._qtest_path))
            listeners.append(_listen(self._qmp_path))
            with open(self._log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    preexec_fn=_die_with_parent,
                )
            _live.add(self)
            # QEMU connects to both sockets while it initialises (a client chardev connects
            # synchronously, and the listen backlog completes the connection before we
            # accept); the devices, including an ivshmem-doorbell's synchronous handshake
            # with its server, are realized before the first qtest command is answered.
            self._qtest = self._accept(listeners[0])
            self._qmp = self._accept(listeners[1])
            greeting = self._qmp_read()
            if "QMP" not in greeting:
                raise QemuError(f"{self.name}: unexpected QMP greeting {greeting!r}")
            self.qmp("qmp_capabilities")
            self.command("endianness")  # first answer: the machine is completely built
        except BaseException:
            self.close()
            raise
        finally:
            for sock in listeners:
                sock.close()
            for path in (self._qtest_path, self._qmp_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _accept(self, listener: socket.socket) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                conn, _ = listener.accept()
                conn.settimeout(REPLY_TIMEOUT)
                return conn
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name} did not connect within {START_TIMEOUT} s")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stderr_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_alive(self, doing: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise QemuExitedError(
                f"{self.name} exited with status {self._proc.returncode} {doing}; "
                f"its output:\n{self.stderr_text().strip()}"
            )

    def kill(self) -> None:
        """SIGKILL, as when a VM crashes: its sockets close without any goodbye."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def quit(self, timeout: float = 10.0) -> int:
        """Ask QEMU to exit through QMP ``quit`` and wait for it; returns the exit status."""
        assert self._proc is not None
        self.qmp("quit")
        return self._proc.wait(timeout)

    def close(self) -> None:
        """Kill (if needed) and reap QEMU, close the links, remove every file. Idempotent."""
        self.kill()
        _live.discard(self)
        for sock in (self._qtest, self._qmp):
            if sock is not None:
                sock.close()
        self._qtest = self._qmp = None
        for path in (self._qtest_path, self._qmp_path, self._log_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<Qemu {self.name} pid={pid} alive={self.alive}>"

    # -- qtest ----------------------------------------------------------------------------

    def _readline(self, sock: socket.socket | None, buf_attr: str, what: str) -> bytes:
        if sock is None:
            raise QemuError(f"{self.name}: {what} link is closed")
        buf: bytes = getattr(self, buf_attr)
        while b"\n" not in buf:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                self._check_alive(f"while waiting for a {what} reply")
                raise QemuError(
                    f"{self.name} did not answer on {what} within {REPLY_TIMEOUT} s"
                ) from None
            if not chunk:
                self._proc_wait_briefly()
                self._check_alive(f"(its {what} link closed)")
                raise QemuError(f"{self.name} closed its {what} link")
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        setattr(self, buf_attr, rest)
        return line.rstrip(b"\r")

    def _proc_wait_briefly(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1.0)

    def command(self, *words: object) -> str:
        """Send one qtest command; return what follows ``OK`` in the answer."""
        line = " ".join(str(w) for w in words)
        if self._qtest is None:
            raise QemuError(f"{self.name}: qtest link is closed")
        try:
            self._qtest.sendall(line.encode() + b"\n")
        except OSError as err:
            self._check_alive("(sending a qtest command)")
            raise QemuError(f"{self.name}: cannot send {line!r}: {err}") from err
        while True:
            reply = self._readline(self._qtest, "_qtest_buf", "qtest").decode()
            if reply.startswith("IRQ "):
                self.irq_events.append(reply)
                continue
            if reply == "OK" or reply.startswith("OK "):
                return reply[3:]
            raise QemuError(f"{self.name} refused {line[:80]!r}: {reply}")

    # Port I/O (PCI configuration mechanism #1 lives at 0xcf8/0xcfc).
    def outb(self, port: int, value: int) -> None:
        self.command("outb", hex(port), hex(value))

    def outw(self, port: int, value: int) -> None:
        self.command("outw", hex(port), hex(value))

    def outl(self, port: int, value: int) -> None:
        self.command("outl", hex(port), hex(value))

    def inb(self, port: int) -> int:
        return int(self.command("inb", hex(port)), 16)

    def inw(self, port: int) -> int:
        return int(self.command("inw", hex(port)), 16)

    def inl(self, port: int) -> int:
        return int(self.command("inl", hex(port)), 16)

    # Guest-physical memory, as the CPU sees it (RAM, MMIO BARs, RAM-backed BARs).
    def readb(self, addr: int) -> int:
        return int(self.command("readb", hex(addr)), 16)

    def readw(self, addr: int) -> int:
        return int(self.command("readw", hex(addr)), 16)

    def readl(self, addr: int) -> int:
        return int(self.command("readl", hex(addr)), 16)

    def readq(self, addr: int) -> int:
        return int(self.command("readq", hex(addr)), 16)

    def writeb(self, addr: int, value: int) -> None:
        self.command("writeb", hex(addr), hex(value))

    def writew(self, addr: int, value: int) -> None:
        self.command("writew", hex(addr), hex(value))

    def writel(self, addr: int, value: int) -> None:
        self.command("writel", hex(addr), hex(value))

    def writeq(self, addr: int, value: int) -> None:
        self.command("writeq", hex(addr), hex(value))

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes of guest-physical memory (base64 on the wire)."""
        if size == 0:
            return b""
        data = base64.b64decode(self.command("b64read", hex(addr), size))
        if len(data) != size:
            raise QemuError(f"{self.name}: b64read of {size} bytes returned {len(data)}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        """Write bytes to guest-physical memory (base64 on the wire)."""
        if data:
            self.command("b64write", hex(addr), len(data), base64.b64encode(data).decode())

    def memset(self, addr: int, size: int, value: int) -> None:
        self.command("memset", hex(addr), size, hex(value))

    # -- QMP ------------------------------------------------------------------------------

    def _qmp_read(self) -> dict[str, Any]:
        line = self._readline(self._qmp, "_qmp_buf", "QMP")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QemuError(f"{self.name}: QMP sent {line!r}")
        return message

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Execute one QMP command and return its ``return`` value (events are kept aside)."""
        if self._qmp is None:
            raise QemuError(f"{self.name}: QMP link is closed")
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._qmp.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._qmp_read()
            if "event" in message:
                self.qmp_events.append(message)
            elif "error" in message:
                raise QemuError(f"{self.name}: QMP {command} failed: {message['error']}")
            elif "return" in message:
                return message["return"]

    # -- guest-physical address space -----------------------------------------------------

    def allocate_mmio(self, size: int, *, above_4g: bool = False) -> int:
        """A free, naturally aligned guest-physical range for a BAR of ``size`` bytes."""
        return self._allocator.allocate(size, above_4g)

    #: Guest RAM the tests may use freely (MSI targets, scratch): 2 MiB up, far from the
    #: BIOS areas below 1 MiB and never touched, since no guest code runs.
    SCRATCH_RAM = 0x200000


class _AddressAllocator:
    # q35's PCI address space is mapped beneath the whole system address space at low
    # priority, so any address that is neither RAM (128 MiB here), the MMCONFIG window
    # (0xb0000000, 256 MiB), nor the IOAPIC/LAPIC/BIOS area (0xfec00000 up) reaches BARs.
    _LOW = (0xC000_0000, 0xFEC0_0000)
    _HIGH = (1 << 36, 1 << 46)

    def __init__(self) -> None:
        self._next = {False: self._LOW[0], True: self._HIGH[0]}

    def allocate(self, size: int, above_4g: bool) -> int:
        if size <= 0 or size & (size - 1):
            raise QemuError(f"BAR size {size:#x} is not a power of two")
        start = (self._next[above_4g] + size - 1) & ~(size - 1)
        limit = (self._HIGH if above_4g else self._LOW)[1]
        if start + size > limit:
            where = "above" if above_4g else "below"
            raise QemuError(f"no room for a {size:#x}-byte BAR {where} 4 GiB")
        self._next[above_4g] = start + size
        return start


# -- PCI ----------------------------------------------------------------------------------

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_HEADER_TYPE = 0x0E
PCI_BAR0 = 0x10
PCI_INTERRUPT_PIN = 0x3D
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS_CAP_LIST = 0x10
PCI_CAP_ID_MSIX = 0x11
_BAR_IO = 0x1
_BAR_TYPE_64 = 0x4
_BAR_PREFETCH = 0x8


@dataclass(frozen=True)
class Bar:
    index: int
    size: int
    is_64bit: bool
    prefetchable: bool
    is_io: bool


class PciDevice:
    """One PCI function, reached through configuration mechanism #1 (ports 0xcf8/0xcfc)."""

    def __init__(self, qemu: Qemu, bus: int, slot: int, function: int) -> None:
        self.qemu = qemu
        self.bus, self.slot, self.function = bus, slot, function
        self.bar_addresses: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<PciDevice {self.bus:02x}:{self.slot:02x}.{self.function} on {self.qemu.name}>"

    def _select(self, offset: int) -> None:
        address = (
            0x8000_0000 | self.bus << 16 | self.slot << 11 | self.function << 8 | (offset & 0xFC)
        )
        self.qemu.outl(0xCF8, address)

    def config_read(self, offset: int, size: int = 4) -> int:
        self._select(offset)
        port = 0xCFC + (offset & 3)
        if size == 1:
            return self.qemu.inb(port)
        if size == 2:
            return self.qemu.inw(port)
        return self.qemu.inl(port)

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self._select(offset)
        port = 0xCFC + (offset & 3)
        if size == 1:
            self.qemu.outb(port, value)
        elif size == 2:
            self.qemu.outw(port, value)
        else:
            self.qemu.outl(port, value)

    @property
    def vendor_id(self) -> int:
        return self.config_read(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.config_read(PCI_DEVICE_ID, 2)

    @property
    def command(self) -> int:
        return self.config_read(PCI_COMMAND, 2)

    @command.setter
    def command(self, value: int) -> None:
        self.config_write(PCI_COMMAND, value, 2)

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """(capability id, config offset) for each entry of the capability list."""
        if not self.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return
        offset = self.config_read(PCI_CAPABILITY_LIST, 1) & 0xFC
        seen: set[int] = set()
        while offset and offset not in seen:
            seen.add(offset)
            yield self.config_read(offset, 1), offset
            offset = self.config_read(offset + 1, 1) & 0xFC

    def find_capability(self, cap_id: int) -> int | None:
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    def probe_bar(self, index: int) -> Bar | None:
        """Size BAR ``index`` the standard way (write all ones, read back); None if absent.

        Memory decoding is switched off meanwhile, so the all-ones address never decodes."""
        reg = PCI_BAR0 + 4 * index
        saved_command = self.command
        self.command = saved_command & ~PCI_COMMAND_MEMORY
        try:
            low = self.config_read(reg)
            self.config_write(reg, 0xFFFF_FFFF)
            mask = self.config_read(reg)
            self.config_write(reg, low)
            if mask == 0:
                return None
            if low & _BAR_IO:
                size = (~(mask & ~0x3) & 0xFFFF) + 1
                return Bar(index, size, False, False, True)
            is_64 = (low & 0x6) == _BAR_TYPE_64
            size_mask = mask & ~0xF
            if is_64:
                high = self.config_read(reg + 4)
                self.config_write(reg + 4, 0xFFFF_FFFF)
                size_mask |= self.config_read(reg + 4) << 32
                self.config_write(reg + 4, high)
                size = (~size_mask & 0xFFFF_FFFF_FFFF_FFFF) + 1
            else:
                size = (~size_mask & 0xFFFF_FFFF) + 1
            return Bar(index, size, is_64, bool(low & _BAR_PREFETCH), False)
        finally:
            self.command = saved_command

    def map_bar(self, index: int, address: int | None = None) -> int:
        """Place memory BAR ``index`` at ``address`` (or a free one); returns the address.

        64-bit BARs go above 4 GiB unless an address is given, which also proves the upper
        half of the BAR is honoured."""
        bar = self.probe_bar(index)
        if bar is None:
            raise QemuError(f"{self!r} has no BAR{index}")
        if bar.is_io:
            raise QemuError(f"{self!r} BAR{index} is an I/O BAR; only memory BARs are mapped")
        if address is None:
            address = self.qemu.allocate_mmio(max(bar.size, 0x1000), above_4g=bar.is_64bit)
        if address & (bar.size - 1):
            raise QemuError(f"BAR{index} address {address:#x} is not aligned to {bar.size:#x}")
        reg = PCI_BAR0 + 4 * index
        self.config_write(reg, address & 0xFFFF_FFFF)
        if bar.is_64bit:
            self.config_write(reg + 4, address >> 32)
        elif address >> 32:
            raise QemuError(f"BAR{index} is 32-bit and cannot be placed at {address:#x}")
        self.bar_addresses[index] = address
        return address

    def enable(self, *, memory: bool = True, bus_master: bool = True) -> None:
        """Set memory decoding and bus mastering in COMMAND (no firmware did it: ``-S``).

        Bus mastering matters for MSI-X: QEMU sends an MSI as a DMA write through the
        device's bus-master address space, which is disabled while the bit is clear."""
        value = self.command
        value |= (PCI_COMMAND_MEMORY if memory else 0) | (PCI_COMMAND_MASTER if bus_master else 0)
        self.command = value


def find_pci_devices(qemu: Qemu, vendor: int, device: int, bus: int = 0) -> list[PciDevice]:
    """Every function on ``bus`` with the given ids, in slot order."""
    found = []
    for slot in range(32):
        first = PciDevice(qemu, bus, slot, 0)
        if first.vendor_id == 0xFFFF:
            continue
        functions = 8 if first.config_read(PCI_HEADER_TYPE, 1) & 0x80 else 1
        for function in range(functions):
            dev = first if function == 0 else PciDevice(qemu, bus, slot, function)
            if dev.vendor_id == vendor and dev.device_id == device:
                found.append(dev)
    return found


# -- MSI-X --------------------------------------------------------------------------------

_MSIX_CONTROL = 2
_MSIX_TABLE = 4
_MSIX_PBA = 8
_MSIX_ENABLE = 1 << 15
_MSIX_FUNCTION_MASK = 1 << 14
_MSIX_ENTRY_SIZE = 16
_MSIX_VECTOR_MASKED = 1


class MsixCapability:
    """The MSI-X capability of a device whose table/PBA BARs are already mapped."""

    def __init__(self, dev: PciDevice) -> None:
        offset = dev.find_capability(PCI_CAP_ID_MSIX)
        if offset is None:
            raise QemuError(f"{dev!r} has no MSI-X capability")
        self.dev, self.offset = dev, offset
        self.size = (dev.config_read(offset + _MSIX_CONTROL, 2) & 0x7FF) + 1
        table = dev.config_read(offset + _MSIX_TABLE)
        pba = dev.config_read(offset + _MSIX_PBA)
        self.table_bar, self.table_offset = table & 7, table & ~7
        self.pba_bar, self.pba_offset = pba & 7, pba & ~7

    def _bar_address(self, index: int) -> int:
        try:
            return self.dev.bar_addresses[index]
        except KeyError:
            raise QemuError(f"map BAR{index} of {self.dev!r} before using MSI-X") from None

    @property
    def table(self) -> int:
        return self._bar_address(self.table_bar) + self.table_offset

    @property
    def pba(self) -> int:
        return self._bar_address(self.pba_bar) + self.pba_offset

    @property
    def control(self) -> int:
        return self.dev.config_read(self.offset + _MSIX_CONTROL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & _MSIX_ENABLE)

    def enable(self) -> None:
        """MSI-X enable on, function mask off. QEMU's ivshmem drops a doorbell that arrives
        while MSI-X is disabled (the eventfd is consumed, nothing is recorded)."""
        control = (self.control | _MSIX_ENABLE) & ~_MSIX_FUNCTION_MASK
        self.dev.config_write(self.offset + _MSIX_CONTROL, control, 2)

    def _entry(self, vector: int) -> int:
        if not 0 <= vector < self.size:
            raise QemuError(f"vector {vector} is outside the MSI-X table of {self.size}")
        return self.table + vector * _MSIX_ENTRY_SIZE

    def route(self, vector: int, address: int, data: int, *, masked: bool = False) -> None:
        """Point ``vector`` at ``address``: when it fires, the device writes the 32-bit
        ``data`` there. With a RAM address, an interrupt becomes a value the test can read."""
        entry = self._entry(vector)
        qemu = self.dev.qemu
        # Mask while changing the entry, as a driver must, so no half-written message fires.
        qemu.writel(entry + 12, _MSIX_VECTOR_MASKED)
        qemu.writel(entry + 0, address & 0xFFFF_FFFF)
        qemu.writel(entry + 4, address >> 32)
        qemu.writel(entry + 8, data)
        if not masked:
            qemu.writel(entry + 12, 0)

    def mask(self, vector: int) -> None:
        self.dev.qemu.writel(self._entry(vector) + 12, _MSIX_VECTOR_MASKED)

    def unmask(self, vector: int) -> None:
        """Unmask; QEMU delivers a message that became pending while masked at this moment."""
        self.dev.qemu.writel(self._entry(vector) + 12, 0)

    def masked(self, vector: int) -> bool:
        return bool(self.dev.qemu.readl(self._entry(vector) + 12) & _MSIX_VECTOR_MASKED)

    def pending(self, vector: int) -> bool:
        if not 0 <= vector < self.size:
            raise QemuError(f"vector {vector} is outside the MSI-X table of {self.size}")
        word = self.dev.qemu.readl(self.pba + (vector // 32) * 4)
        return bool(word >> (vector % 32) & 1)


# -- ivshmem ------------------------------------------------------------------------------

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
REG_INTRMASK = 0
REG_INTRSTATUS = 4
REG_IVPOSITION = 8
REG_DOORBELL = 12

#: The value an MSI of vector v writes: recognisable, and different per vector.
MSI_DATA_BASE = 0x1F5E_0000


class IvshmemDevice:
    """An ivshmem-plain or ivshmem-doorbell device of a paused QEMU, set up for use.

    BAR0 (registers) and, when present, BAR1 (MSI-X table and PBA) are placed below 4 GiB;
    BAR2 (the shared memory, 64-bit prefetchable) above 4 GiB; memory decoding and bus
    mastering are switched on. With ``msix=True`` (doorbell only) MSI-X is enabled and every
    vector is routed to its own word of guest RAM (:meth:`msi_address`)."""

    def __init__(self, dev: PciDevice, *, msix: bool = True) -> None:
        self.pci = dev
        self.qemu = dev.qemu
        self.bar0 = dev.map_bar(0)
        bar2 = dev.probe_bar(2)
        if bar2 is None:
            raise QemuError(f"{dev!r} has no BAR2 (shared memory)")
        self.bar2_info = bar2
        self.size = bar2.size
        self.bar2 = dev.map_bar(2)
        self.msix: MsixCapability | None = None
        if dev.probe_bar(1) is not None:
            dev.map_bar(1)
        dev.enable()
        if msix and dev.find_capability(PCI_CAP_ID_MSIX) is not None:
            self.msix = MsixCapability(dev)
            for vector in range(self.msix.size):
                self.clear_msi(vector)
                self.msix.route(vector, self.msi_address(vector), self.msi_data(vector))
            self.msix.enable()

    @classmethod
    def find(cls, qemu: Qemu, *, msix: bool = True) -> IvshmemDevice:
        """The only ivshmem device of ``qemu``, set up."""
        devices = find_pci_devices(qemu, IVSHMEM_VENDOR, IVSHMEM_DEVICE)
        if len(devices) != 1:
            raise QemuError(f"{qemu.name} has {len(devices)} ivshmem devices, expected 1")
        return cls(devices[0], msix=msix)

    # -- registers (BAR0) ------------------------------------------------------------------

    @property
    def ivposition(self) -> int:
        return self.qemu.readl(self.bar0 + REG_IVPOSITION)

    def ring(self, peer: int, vector: int = 0) -> None:
        """Write the doorbell: QEMU signals eventfd ``vector`` of ``peer``, if it knows it.

        QEMU drops a doorbell silently when it has not (yet) processed that peer's join."""
        self.qemu.writel(self.bar0 + REG_DOORBELL, (peer & 0xFFFF) << 16 | (vector & 0xFFFF))

    def read_register(self, offset: int) -> int:
        return self.qemu.readl(self.bar0 + offset)

    def write_register(self, offset: int, value: int) -> None:
        self.qemu.writel(self.bar0 + offset, value)

    # -- shared memory (BAR2) --------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self._check_range(offset, size)
        return self.qemu.read(self.bar2 + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        self.qemu.write(self.bar2 + offset, data)

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise QemuError(f"range {offset:#x}+{size:#x} is outside BAR2 of {self.size:#x}")

    # -- interrupts (MSI-X into guest RAM) --------------------------------------------------

    @property
    def vectors(self) -> int:
        return 0 if self.msix is None else self.msix.size

    def msi_address(self, vector: int) -> int:
        return Qemu.SCRATCH_RAM + 4 * vector

    @staticmethod
    def msi_data(vector: int) -> int:
        return MSI_DATA_BASE | vector

    def msi_arrived(self, vector: int) -> bool:
        return self.qemu.readl(self.msi_address(vector)) == self.msi_data(vector)

    def clear_msi(self, vector: int) -> None:
        self.qemu.writel(self.msi_address(vector), 0)

    def take_msi(self, vector: int, timeout: float = 10.0) -> bool:
        """Wait until vector's MSI lands in RAM, then clear it for the next one. False if it
        did not arrive within ``timeout`` (a hang catcher; assert on the result)."""
        if poll_until(lambda: self.msi_arrived(vector), timeout):
            self.clear_msi(vector)
            return True
        return False

    def arrived_vectors(self) -> set[int]:
        """Vectors whose MSI is currently in RAM (not yet cleared)."""
        return {v for v in range(self.vectors) if self.msi_arrived(v)}

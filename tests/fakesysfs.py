"""Fake ``/sys`` trees for the guest driver's tests (the psutil way: tests without hardware).

The layout follows the kernel's: devices live under ``devices/pci0000:00/`` and
``bus/pci/devices/<address>`` are symlinks to them; ``driver`` and ``iommu_group`` are
symlinks; ``resourceN`` are regular files here (mmap works on them as on the real ones, which
are regular files of exactly the BAR's size too).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

IVSHMEM = (0x1AF4, 0x1110)

# Flags as the kernel prints them in `resource` (IORESOURCE_MEM | SIZEALIGN [| PREFETCH | 64]).
MEM32 = 0x00040200
MEM64_PREFETCH = 0x0014220C


@dataclass
class FakeDevice:
    address: str
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def set_ivposition(self, value: int) -> None:
        with open(self.file("resource0"), "r+b") as f:
            f.seek(8)
            f.write(struct.pack("<I", value))

    def set_register(self, offset: int, value: int) -> None:
        """Write a BAR0 word (a file stands in for the registers: no read side effects)."""
        with open(self.file("resource0"), "r+b") as f:
            f.seek(offset)
            f.write(struct.pack("<I", value))

    def register(self, offset: int) -> int:
        with open(self.file("resource0"), "rb") as f:
            f.seek(offset)
            value: int = struct.unpack("<I", f.read(4))[0]
            return value

    def read_bar2(self, offset: int, n: int, wc: bool = False) -> bytes:
        with open(self.file("resource2_wc" if wc else "resource2"), "rb") as f:
            f.seek(offset)
            return f.read(n)


class FakeSysfs:
    """A fake sysfs root; ``str(fake.root)`` is what ``sysfs_root=`` takes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "bus" / "pci" / "devices").mkdir(parents=True)
        (root / "bus" / "pci" / "drivers").mkdir(parents=True)
        (root / "devices" / "pci0000:00").mkdir(parents=True)
        (root / "kernel" / "iommu_groups").mkdir(parents=True)
        (root / "bus" / "pci" / "drivers_probe").write_text("")

    def add_driver(self, name: str) -> Path:
        path = self.root / "bus" / "pci" / "drivers" / name
        path.mkdir(exist_ok=True)
        for f in ("bind", "unbind", "new_id"):
            (path / f).touch()
        return path

    def set_noiommu(self, enabled: bool) -> None:
        params = self.root / "module" / "vfio" / "parameters"
        params.mkdir(parents=True, exist_ok=True)
        (params / "enable_unsafe_noiommu_mode").write_text("Y\n" if enabled else "N\n")

    def add_device(
        self,
        address: str,
        *,
        kind: str = "doorbell",
        ids: tuple[int, int] = IVSHMEM,
        bar0: tuple[int, int] | None = (0xFEBFC000, 256),
        bar2: tuple[int, int] | None = (0xFE900000, 1 << 20),
        vectors: int = 2,
        config_readable: bool = True,
        driver: str | None = None,
        iommu_group: int | None = None,
        ivposition: int = 0,
        bar0_file_size: int | None = None,
        bar2_file_size: int | None = None,
        wc: bool = True,
        interrupt_pin: int = 0,
    ) -> FakeDevice:
        """One PCI device. ``kind`` "doorbell" gives BAR1 and an MSI-X capability with
        ``vectors`` entries; "plain" neither; "intx" an interrupt pin and neither (this
        project's device in legacy INTx mode). ``config_readable=False`` truncates config
        space to 64 bytes, as the kernel does for non-root readers."""
        path = self.root / "devices" / "pci0000:00" / address
        path.mkdir()
        os.symlink(
            os.path.relpath(path, self.root / "bus" / "pci" / "devices"),
            self.root / "bus" / "pci" / "devices" / address,
        )
        doorbell = kind == "doorbell"
        if kind == "intx":
            interrupt_pin = interrupt_pin or 1
        vendor, device = ids
        for name, value in (
            ("vendor", vendor),
            ("device", device),
            ("subsystem_vendor", 0x1AF4),
            ("subsystem_device", 0x1100),
            ("revision", 1),
        ):
            (path / name).write_text(f"0x{value:04x}\n")
        (path / "class").write_text("0x050000\n")
        (path / "driver_override").write_text("(null)\n")

        bars: list[tuple[int, int, int] | None] = [None] * 6
        if bar0 is not None:
            bars[0] = (bar0[0], bar0[1], MEM32)
        if doorbell:
            bars[1] = (0xFEBFD000, 4096, MEM32)
        if bar2 is not None:
            bars[2] = (bar2[0], bar2[1], MEM64_PREFETCH)
        lines = []
        for bar in bars + [None] * 7:  # 6 BARs, the ROM and bridge windows: 13 lines
            if bar is None:
                lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
            else:
                start, size, flags = bar
                lines.append(f"0x{start:016x} 0x{start + size - 1:016x} 0x{flags:016x}")
        (path / "resource").write_text("\n".join(lines) + "\n")

        if bar0 is not None:
            size = bar0[1] if bar0_file_size is None else bar0_file_size
            with open(path / "resource0", "wb") as f:
                f.truncate(size)
        if doorbell:
            with open(path / "resource1", "wb") as f:
                f.truncate(4096)
        if bar2 is not None:
            size = bar2[1] if bar2_file_size is None else bar2_file_size
            with open(path / "resource2", "wb") as f:
                f.truncate(size)
            if wc:
                # A separate file (the real one maps the same memory), so that tests can
                # tell which of the two was mapped.
                with open(path / "resource2_wc", "wb") as f:
                    f.truncate(size)

        config = bytearray(256)
        struct.pack_into("<HH", config, 0, vendor, device)
        struct.pack_into("<H", config, 4, 0x0003)  # I/O + memory decoding, no bus master
        config[8] = 1  # revision
        config[0x0B], config[0x0A] = 0x05, 0x00  # class: memory controller, RAM
        struct.pack_into("<HH", config, 0x2C, 0x1AF4, 0x1100)
        config[0x3D] = interrupt_pin
        if doorbell:
            struct.pack_into("<H", config, 6, 0x0010)  # status: capability list
            config[0x34] = 0x40
            config[0x40], config[0x41] = 0x11, 0x00  # MSI-X, last capability
            struct.pack_into("<HII", config, 0x42, vectors - 1, 0x1, 0x801)
        (path / "config").write_bytes(bytes(config if config_readable else config[:64]))

        if driver is not None:
            drv = self.add_driver(driver)
            os.symlink(os.path.relpath(drv, path), path / "driver")
        if iommu_group is not None:
            group = self.root / "kernel" / "iommu_groups" / str(iommu_group)
            (group / "devices").mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(group, path), path / "iommu_group")
            os.symlink(os.path.relpath(path, group / "devices"), group / "devices" / address)
        fake = FakeDevice(address, path)
        if bar0 is not None and (bar0_file_size is None or bar0_file_size >= 12):
            fake.set_ivposition(ivposition)
        return fake

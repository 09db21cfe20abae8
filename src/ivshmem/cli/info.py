"""``ivshmem info``: list the ivshmem PCI devices of this machine (inside a guest).

Shows, per device: index, PCI address, plain or doorbell, size of the shared memory (BAR2),
MSI-X vectors, bound driver, IOMMU group, and the peer id (IVPosition) where it can be read
(root, device not held by a VFIO user).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import IvshmemError
from ..memory import format_size
from ..pci import IvshmemDevice, find_devices, read_ivposition, select_device

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="list ivshmem PCI devices (inside a guest)",
        description="List the ivshmem PCI devices (1af4:1110) this machine sees: address, "
        "plain or doorbell, shared-memory size, MSI-X vectors, driver, IOMMU group and peer id.",
    )
    parser.add_argument(
        "device",
        nargs="?",
        help="show only this device (PCI address such as 0000:00:04.0, or index)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--sysfs-root", default="/sys", metavar="DIR", help="where sysfs is mounted (/sys)"
    )
    parser.set_defaults(func=run)


def _peer_id(dev: IvshmemDevice) -> int | None:
    if os.geteuid() != 0:
        return None  # resource files are root's; don't print a permission error per device
    try:
        return read_ivposition(dev)
    except IvshmemError:
        return None


def _record(index: int, dev: IvshmemDevice) -> dict[str, Any]:
    return {
        "index": index,
        "address": dev.address,
        "kind": dev.kind,
        "size": dev.shared_memory_size,
        "vectors": dev.msix_vectors,
        "driver": dev.driver,
        "iommu_group": dev.iommu_group,
        "id": _peer_id(dev) if dev.doorbell else None,
    }


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def run(args: argparse.Namespace) -> int:
    try:
        devices = find_devices(args.sysfs_root)
        indexed = list(enumerate(devices))
        if args.device is not None:
            chosen = select_device(devices, args.device, args.sysfs_root)
            indexed = [(i, d) for i, d in indexed if d.address == chosen.address]
    except IvshmemError as err:
        print(f"ivshmem info: {err}", file=sys.stderr)
        return 1
    records = [_record(i, d) for i, d in indexed]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(
            f"no ivshmem devices under {os.path.join(args.sysfs_root, 'bus/pci/devices')} "
            "(inside a VM started with -device ivshmem-plain or ivshmem-doorbell, they show "
            "up here)",
            file=sys.stderr,
        )
        return 0
    header = ("#", "ADDRESS", "KIND", "SIZE", "VECTORS", "DRIVER", "IOMMU", "ID")
    rows = [header] + [
        (
            str(r["index"]),
            r["address"],
            r["kind"],
            format_size(r["size"]),
            _cell(r["vectors"]),
            _cell(r["driver"]),
            _cell(r["iommu_group"]),
            _cell(r["id"]),
        )
        for r in records
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0

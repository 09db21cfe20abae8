"""``ivshmem info``: list the ivshmem PCI devices of this machine (inside a guest).

Shows, per device: index, PCI address, plain or doorbell, size of the shared memory (BAR2),
MSI-X vectors, interrupt kind (MSI-X or this project's device's legacy INTx), bound driver,
IOMMU group, and the peer id (IVPosition) where it can be read (root, device not held by a
VFIO user). On this project's device (``ivshmem-device``), also what its register extension
says: the other peers connected, the server connection's state, and its features (below the
table; all of it in ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import IvshmemError
from ..memory import format_size
from ..pci import (
    DeviceStatus,
    IvshmemDevice,
    feature_names,
    find_devices,
    read_device_status,
    read_ivposition,
    select_device,
)

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="list ivshmem PCI devices (inside a guest)",
        description="List the ivshmem PCI devices (1af4:1110) this machine sees: address, "
        "plain or doorbell, shared-memory size, MSI-X vectors or INTx, driver, IOMMU group, "
        "peer id and, on this project's device (ivshmem-device), its peers, server state and "
        "features.",
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


def _status(dev: IvshmemDevice) -> tuple[str | None, DeviceStatus | None]:
    """("ours", its status), ("qemu", None), or (None, None) when BAR0 cannot be read (its
    resource file is root's; a VFIO user holds the device)."""
    try:
        status = read_device_status(dev)
    except IvshmemError:
        return None, None
    return ("qemu" if status is None else "ours"), status


def _interrupts(dev: IvshmemDevice) -> str | None:
    if dev.intx:
        return "intx"
    return "msix" if dev.msix_vectors else None


def _extension(status: DeviceStatus | None) -> dict[str, Any] | None:
    if status is None:
        return None
    ext = status.extension
    return {
        "features": feature_names(ext.features),
        "event_vector": ext.event_vector,
        "peers": status.peer_count,
        "generation": status.generation,
        "server_state": status.server_state,
    }


def _record(index: int, dev: IvshmemDevice) -> dict[str, Any]:
    device, status = _status(dev)
    return {
        "index": index,
        "address": dev.address,
        "kind": dev.kind,
        "size": dev.shared_memory_size,
        "vectors": dev.msix_vectors,
        "interrupts": _interrupts(dev),
        "driver": dev.driver,
        "iommu_group": dev.iommu_group,
        "id": _peer_id(dev) if dev.doorbell else None,
        # "ours" (ivshmem-device), "qemu" (QEMU's own), None (BAR0 unreadable: not root...)
        "device": device,
        "extension": _extension(status),
    }


def _detail(record: dict[str, Any]) -> str | None:
    """The line below the table for this project's device."""
    ext = record["extension"]
    if ext is None:
        return None
    features = ", ".join(
        f"{name} on vector {ext['event_vector']}"
        if name == "membership-irq" and ext["event_vector"] is not None
        else name
        for name in ext["features"]
    )
    return (
        f"{record['address']}: ivshmem-device, features: {features or 'none'}; "
        f"generation {_cell(ext['generation'])}"
    )


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
            "(inside a VM started with -device ivshmem-plain, ivshmem-doorbell or a "
            "vfio-user-pci served by ivshmem-device, they show up here)",
            file=sys.stderr,
        )
        return 0
    header = (
        "#",
        "ADDRESS",
        "KIND",
        "SIZE",
        "VECTORS",
        "IRQ",
        "DRIVER",
        "IOMMU",
        "ID",
        "DEVICE",
        "PEERS",
        "SERVER",
    )
    rows = [header] + [
        (
            str(r["index"]),
            r["address"],
            r["kind"],
            format_size(r["size"]),
            _cell(r["vectors"]),
            _cell(r["interrupts"]),
            _cell(r["driver"]),
            _cell(r["iommu_group"]),
            _cell(r["id"]),
            _cell(r["device"]),
            _cell(r["extension"] and r["extension"]["peers"]),
            _cell(r["extension"] and r["extension"]["server_state"]),
        )
        for r in records
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    details = [line for line in map(_detail, records) if line is not None]
    if details:
        print()
        for line in details:
            print(line)
    return 0

"""The guest driver on real devices: QEMU's ivshmem-doorbell and ivshmem-plain inside lab
guests (Debian's kernel under TCG), next to a real server and a real host peer.

* With an emulated IOMMU the guest binds the doorbell device to vfio-pci, and MSI-X doorbells
  flow guest -> itself, guest -> host and host -> guest (sync and asyncio), over memory that
  both sides see.
* Without one, the same device is mapped through sysfs: ringing the host still works, waiting
  says why it cannot, and binding fails with the IOMMU error; the plain device's memory is the
  host's file.

Each test boots one guest (about 5-10 s under TCG).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess

from ivshmem.lab import Lab
from ivshmem.lab.kernel import IOMMU_MODULES
from ivshmem.peer import connect

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

GUEST_TIMEOUT = 150.0


def report(output: str, tag: str) -> dict[str, Any]:
    """The JSON the guest printed after ``tag``."""
    match = re.search(rf"^{tag} (\{{.*\}})$", output, re.MULTILINE)
    assert match is not None, f"no {tag} line in the guest's output:\n{output}"
    value: dict[str, Any] = json.loads(match.group(1))
    return value


VFIO_GUEST = r"""
import asyncio, json, os, sys
from ivshmem.cli.main import main as cli
from ivshmem.pci import DriverBoundError, find_devices, open_pci
from ivshmem.pci._mmio import FdRegisters
from ivshmem.pci._vfio import VFIO_PCI_BAR0_REGION_INDEX

(dev,) = find_devices()
before = {"kind": dev.kind, "driver": dev.driver, "group": dev.iommu_group,
          "msix": dev.msix_vectors, "bar2": dev.shared_memory_size}
ep = open_pci(interrupts=True, bind_vfio=True)
(bound,) = find_devices()
# The ring to ourselves goes out through BAR0, through QEMU and the server's eventfd, and comes
# back as an MSI-X message that vfio-pci turns into an eventfd count.
self_rings = []
for vector in (1, 0):
    ep.notify(ep.id, vector)
    self_rings.append(ep.wait(vector, timeout=60))
# BAR0 read through the VFIO fd (pread), as for a BAR0 vfio-pci will not mmap.
info = ep._vfio.region_info(VFIO_PCI_BAR0_REGION_INDEX, "BAR0")
pread_id = FdRegisters(ep._vfio.fd, info.offset).ivposition()
# While VFIO holds the BARs, sysfs refuses to map them (CONFIG_IO_STRICT_DEVMEM).
try:
    open_pci(interrupts=False)
    sysfs_while_open = "opened"
except DriverBoundError as err:
    sysfs_while_open = str(err)
text = f"guest {ep.id} was here".encode()
ep.memory[4096:4096 + len(text)] = text
print("READY " + json.dumps({
    "before": before, "driver": bound.driver, "id": ep.id, "size": ep.size,
    "vectors": ep.vectors, "self": self_rings, "pread_id": pread_id,
    "sysfs_while_open": sysfs_while_open,
    "fds": [ep.fileno(0), ep.fileno(1)], "repr": repr(ep),
}) + "\nREADY-END", flush=True)
ep.notify(0, 1)  # the host peer has id 0
got = ep.wait(timeout=60)
host_text = bytes(ep.memory[8192:8196])
async def second():
    return await ep.wait_async(timeout=60)
print("ASYNC-WAITING", flush=True)
got_async = asyncio.run(second())
print("INFO-START", flush=True)
cli(["info"])
ep.close()
command = open(f"{dev.path}/config", "rb").read()[4]
print("DONE " + json.dumps({"got": got, "host_text": host_text.decode(), "async": got_async,
      "bus_master_after_close": bool(command & 4), "closed": ep.closed}), flush=True)
"""


def test_vfio_doorbells_between_guest_and_host(qemu_binary: str, short_tmp: Path) -> None:
    with (
        ServerProcess(short_tmp, size="1M", vectors=2) as server,
        connect(server.socket_path, vectors=2) as host,
        Lab(iommu=True, qemu=qemu_binary) as lab,
    ):
        assert host.id == 0
        guest = lab.start(
            code=VFIO_GUEST, server_socket=server.socket_path, vectors=2, timeout=GUEST_TIMEOUT
        )
        ready = report(guest.wait_for_output("READY-END", GUEST_TIMEOUT), "READY")

        assert ready["before"] == {
            "kind": "doorbell",
            "driver": None,
            "group": ready["before"]["group"],
            "msix": 2,
            "bar2": 1 << 20,
        }
        assert ready["before"]["group"] is not None  # the emulated IOMMU gave it a group
        assert ready["driver"] == "vfio-pci"
        guest_id = ready["id"]
        assert guest_id == 1
        assert guest_id in host.peers
        assert ready["size"] == 1 << 20
        assert ready["vectors"] == 2
        assert ready["self"] == [1, 0]
        assert ready["pread_id"] == guest_id
        assert len(set(ready["fds"])) == 2
        assert "vfio vectors=2" in ready["repr"]
        assert (
            "a VFIO user (this process or another) has the device open"
            in (ready["sysfs_while_open"])
        )

        # guest -> host, and the guest's bytes are in the host's mapping.
        assert host.wait(1, timeout=60) == 1
        text = f"guest {guest_id} was here".encode()
        assert bytes(host.memory[4096 : 4096 + len(text)]) == text

        # host -> guest: memory first, then the doorbell (the guest reads after its wait).
        host.memory[8192:8196] = b"host"
        host.notify(guest_id, 0)
        guest.wait_for_output("ASYNC-WAITING", 60)
        host.notify(guest_id, 1)
        result = guest.wait(GUEST_TIMEOUT).check()

    done = report(result.output, "DONE")
    assert done == {
        "got": 0,
        "host_text": "host",
        "async": 1,
        "bus_master_after_close": False,
        "closed": True,
    }
    info = result.output.split("INFO-START", 1)[1].splitlines()
    assert info[1].split()[:2] == ["#", "ADDRESS"]
    row = info[2].split()
    assert row[2:7] == ["doorbell", "1M", "2", "msix", "vfio-pci"]
    assert row[7] == str(ready["before"]["group"])
    # VFIO holds BAR0: neither IVPosition nor which device it is can be read through sysfs.
    assert row[8:] == ["-", "-", "-", "-"]


SYSFS_GUEST = r"""
import json
from ivshmem.errors import DeviceError, DoorbellUnavailableError
from ivshmem.pci import NoIommuGroupError, NoSuchDeviceError, find_devices, open_pci

devices = find_devices()
out = {"devices": [(d.kind, d.iommu_group, d.msix_vectors) for d in devices]}
try:
    open_pci(0, interrupts=True, bind_vfio=True)
except NoIommuGroupError as err:
    out["iommu_error"] = str(err)
try:
    open_pci("00:1f.7")
except NoSuchDeviceError as err:
    out["no_such"] = str(err)
with open_pci(0) as ep:  # auto: no IOMMU, so sysfs
    out["id"] = ep.id
    out["interrupts"] = ep.interrupts
    try:
        ep.wait(timeout=0)
    except DoorbellUnavailableError as err:
        out["wait_error"] = str(err)
    ep.memory[0:6] = b"sysfs!"
    ep.notify(0, 0)  # rings the host through BAR0, no VFIO needed
with open_pci(1, id=7) as plain:
    out["plain_id"] = plain.id
    out["plain_seen"] = bytes(plain.memory[0:11]).decode()
    plain.memory[100:111] = b"from guest!"
    try:
        plain.notify(0)
    except DoorbellUnavailableError as err:
        out["plain_notify"] = str(err)
print("RESULT " + json.dumps(out), flush=True)
"""


def test_sysfs_mapping_without_iommu(qemu_binary: str, short_tmp: Path) -> None:
    region = short_tmp / "plain"
    with open(region, "wb") as f:
        f.truncate(1 << 20)
        f.seek(0)
        f.write(b"from host!!")
    with (
        ServerProcess(short_tmp, size="1M", vectors=1) as server,
        connect(server.socket_path, vectors=1) as host,
        # vfio-pci is loaded, but with no IOMMU the device has no group: the real error path.
        Lab(qemu=qemu_binary, modules=IOMMU_MODULES) as lab,
    ):
        guest = lab.start(
            code=SYSFS_GUEST,
            server_socket=server.socket_path,
            vectors=1,
            plain_path=region,
            timeout=GUEST_TIMEOUT,
        )
        assert host.wait(0, timeout=GUEST_TIMEOUT) == 0
        result = guest.wait(GUEST_TIMEOUT).check()
        assert bytes(host.memory[0:6]) == b"sysfs!"

    out = report(result.output, "RESULT")
    assert out["devices"] == [["doorbell", None, 1], ["plain", None, None]]
    assert "no IOMMU group" in out["iommu_error"] and "intel-iommu" in out["iommu_error"]
    assert "no PCI device 0000:00:1f.7" in out["no_such"]
    assert out["id"] == 1
    assert out["interrupts"] is False
    assert "because:" in out["wait_error"] and "no IOMMU group" in out["wait_error"]
    assert out["plain_id"] == 7
    assert out["plain_seen"] == "from host!!"
    assert "ivshmem-plain" in out["plain_notify"]
    with open(region, "rb") as f:
        f.seek(100)
        assert f.read(11) == b"from guest!"


RECIPE_GUEST = r"""
import json, subprocess
from ivshmem.pci import DriverBoundError, find_devices, open_pci
from ivshmem.pci._bind import bind_commands, unbind_command

out = {}
try:
    open_pci(interrupts=True)  # no driver yet, and bind_vfio not given
except DriverBoundError as err:
    out["hint"] = str(err)
commands = out["hint"].split("bind it yourself as root: ", 1)[1]
subprocess.run(["sh", "-ec", commands], check=True)
(dev,) = find_devices()
out["after_hint"] = dev.driver
with open_pci(interrupts=True) as ep:
    out["interrupts"] = ep.interrupts
# The recipe for a device that has a driver: unbind first, or drivers_probe ignores it.
out["bound_recipe"] = bind_commands(dev)
subprocess.run(["sh", "-ec", out["bound_recipe"]], check=True)
out["after_bound_recipe"] = find_devices()[0].driver
subprocess.run(["sh", "-ec", unbind_command(dev)], check=True)
out["after_unbind"] = find_devices()[0].driver
print("RECIPE " + json.dumps(out), flush=True)
"""


def test_the_binding_recipe_in_errors_works_on_a_real_kernel(
    qemu_binary: str, short_tmp: Path
) -> None:
    with (
        ServerProcess(short_tmp, size="1M", vectors=1) as server,
        Lab(iommu=True, qemu=qemu_binary) as lab,
    ):
        [result] = lab.run(
            code=RECIPE_GUEST, server_socket=server.socket_path, vectors=1, timeout=GUEST_TIMEOUT
        )
    result.check()
    out = report(result.output, "RECIPE")
    assert "bound to no driver" in out["hint"] and "unbind" not in out["hint"]
    assert out["hint"].endswith("> /sys/bus/pci/drivers_probe")
    assert out["after_hint"] == "vfio-pci"
    assert out["interrupts"] is True
    recipe = out["bound_recipe"].split("; ")
    assert len(recipe) == 3 and recipe[1].endswith("/driver/unbind")
    assert out["after_bound_recipe"] == "vfio-pci"
    assert out["after_unbind"] is None

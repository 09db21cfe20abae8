"""The VM lab: real QEMU guests (Debian's kernel under TCG) running Python programs from the host.

Boot tests take a few seconds each; the kernel is fetched into the lab cache once per machine
(the ``assets`` fixture), which on a fresh machine (CI) includes ``apt-get update``.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import qemu_path, require
from serverproc import ServerProcess

import ivshmem
from ivshmem.lab import (
    Assets,
    GuestError,
    GuestTimeoutError,
    Lab,
    LabError,
    LabSetupError,
    LabUsageError,
    PlainRegion,
    prepare,
    run_guests,
)
from ivshmem.lab.elf import extract_vmlinux, has_pvh_entry, is_static_executable, module_info
from ivshmem.lab.initramfs import CpioEntry, newc_archive
from ivshmem.lab.kernel import BASE_MODULES, IOMMU_MODULES
from ivshmem.peer import connect

GUEST_TIMEOUT = 120.0

# Shared by the guest programs below: find the ivshmem device and map a BAR through sysfs.
FIND_DEVICE = r"""
import glob, mmap, os
def find_ivshmem():
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        ids = [open(f"{dev}/{f}").read().strip() for f in ("vendor", "device")]
        if ids == ["0x1af4", "0x1110"]:
            return dev
    raise SystemExit("no ivshmem device in " + str(os.listdir("/sys/bus/pci/devices")))
def map_bar(dev, n):
    path = f"{dev}/resource{n}"
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    try:
        return mmap.mmap(fd, os.path.getsize(path))
    finally:
        os.close(fd)
"""


def report(output: str, tag: str) -> dict[str, Any]:
    match = re.search(rf"^{tag} (\{{.*\}})$", output, re.MULTILINE)
    assert match is not None, f"no {tag} line in the guest's output:\n{output}"
    value: dict[str, Any] = json.loads(match.group(1))
    return value


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def qemu_children(ppid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        if int(tail.split()[1]) == ppid and "qemu" in head:
            found.append(int(entry.name))
    return found


def lab_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"ivshmem-lab-{pid}-*"))


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The kernel, busybox and initramfs, fetched into the lab cache at most once."""
    require(qemu_path(), "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        return prepare()
    except LabSetupError as err:
        require(False, f"the lab cannot prepare its guest kernel: {err}")
        raise


@pytest.fixture
def lab(qemu_binary: str, assets: Assets) -> Iterator[Lab]:
    with Lab(qemu=qemu_binary) as lab:
        yield lab
    assert not lab_dirs(os.getpid()), "the lab left its temporary directory behind"


# -- building blocks, no guest booted ---------------------------------------------------------


def test_newc_archive_unpacks_with_a_real_cpio(short_tmp: Path) -> None:
    busybox = shutil.which("busybox")
    require(busybox, "busybox is not installed (apt-get install busybox-static)")
    assert busybox is not None
    payload = bytes(range(256)) * 3 + b"odd length"
    archive = newc_archive(
        [
            CpioEntry("dir", stat.S_IFDIR | 0o750),
            CpioEntry("dir/file", stat.S_IFREG | 0o640, payload),
            CpioEntry("link", stat.S_IFLNK | 0o777, b"dir/file"),
            CpioEntry("x" * 101, stat.S_IFREG | 0o600, b"a"),
        ]
    )
    assert len(archive) % 512 == 0
    assert newc_archive([CpioEntry("dir", stat.S_IFDIR | 0o755)]) == newc_archive(
        [CpioEntry("dir", stat.S_IFDIR | 0o755)]
    ), "equal inputs must give equal bytes (the initramfs is cached by hash)"
    out = short_tmp / "out"
    out.mkdir()
    done = subprocess.run(
        [busybox, "cpio", "-i", "-d"], input=archive, cwd=out, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (out / "dir" / "file").read_bytes() == payload
    assert stat.S_IMODE((out / "dir" / "file").stat().st_mode) == 0o640
    assert os.readlink(out / "link") == "dir/file"
    assert (out / ("x" * 101)).read_bytes() == b"a"


def test_elf_facts_of_real_binaries_and_the_cached_kernel(assets: Assets) -> None:
    assert is_static_executable(assets.busybox.read_bytes())
    assert not is_static_executable(Path(os.path.realpath(sys.executable)).read_bytes())
    kernel = assets.kernel
    info = dict(module_info(kernel.module_path("vfio_pci").read_bytes()))
    assert info["name"] == "vfio_pci"
    assert "vfio" in info["depends"].replace("-", "_").split(",")
    vmlinux = extract_vmlinux((kernel.directory / "vmlinuz").read_bytes())
    assert vmlinux is not None and vmlinux.startswith(b"\x7fELF")
    assert has_pvh_entry(vmlinux) == (kernel.image.name == "vmlinux")


def test_module_load_order_puts_dependencies_first(assets: Assets) -> None:
    kernel = assets.kernel
    order = kernel.load_order([*BASE_MODULES, *IOMMU_MODULES])
    assert len(order) == len(set(order))
    for name in order:
        for dep in kernel.modules[name]:
            assert order.index(dep) < order.index(name), f"{dep} must load before {name}"
    assert {"9p", "9pnet_virtio", "vfio_pci", "vfio_iommu_type1"} <= set(order)
    with pytest.raises(LabUsageError, match="no_such_module"):
        kernel.load_order(["no_such_module"])


def test_bad_requests_fail_before_booting(qemu_binary: str, short_tmp: Path) -> None:
    with pytest.raises(LabUsageError, match="at least 128M"):
        Lab(qemu=qemu_binary, memory="64M")
    with pytest.raises(LabUsageError, match="absolute path"):
        Lab(qemu=qemu_binary, python="python3")
    odd = short_tmp / "odd"
    odd.write_bytes(b"\0" * 3000)
    with Lab(qemu=qemu_binary, fetch=False) as lab:
        with pytest.raises(LabUsageError, match="power of two"):
            lab.start(code="pass", plain_path=odd)
        with pytest.raises(LabUsageError, match="does not exist"):
            lab.start(code="pass", plain_path=short_tmp / "missing")
        with pytest.raises(LabUsageError, match="no ivshmem server socket"):
            lab.start(code="pass", server_socket=short_tmp / "nobody.sock")
        with pytest.raises(LabUsageError, match="exactly one of"):
            lab.start()
        with pytest.raises(LabUsageError, match="exactly one of"):
            lab.start("x.py", code="pass")
        assert lab.guests == []
    with pytest.raises(LabUsageError, match="closed"):
        lab.start(code="pass")


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--memory", "12Q", "-c", "pass"], 1, "guest memory: cannot parse size '12Q'"),
        (["--plain", "/dev/null", "--plain-size", "3X", "-c", "pass"], 1, "cannot parse size '3X'"),
        (["-n", "0", "-c", "print(1)"], 2, "argument -n/--guests: must be at least 1, got 0"),
        (["-n", "many", "-c", "print(1)"], 2, "argument -n/--guests: 'many' is not a whole number"),
    ],
)
def test_cli_run_rejects_bad_options_in_one_line(
    qemu_binary: str, args: list[str], status: int, message: str
) -> None:
    done = lab_cli("run", *args)
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    assert message in done.stderr
    assert done.stdout == ""  # nothing ran
    if status == 1:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("ivshmem lab: ")


def test_a_working_directory_guests_cannot_see_is_refused_up_front(
    qemu_binary: str, short_tmp: Path
) -> None:
    into_shm = short_tmp / "shm"
    into_shm.symlink_to("/dev/shm")
    with Lab(qemu=qemu_binary, fetch=False) as lab:
        for cwd in ("/dev/shm", "/proc/self", "/sys", into_shm):
            with pytest.raises(LabUsageError, match=r"guests mount their own /dev, /proc and /sys"):
                lab.start(code="pass", cwd=cwd)
        with pytest.raises(LabUsageError, match=r"missing for the guest is not a directory"):
            lab.start(code="pass", cwd=short_tmp / "missing")
        assert lab.guests == []
    assert not lab_dirs(os.getpid())
    # The command line runs the guest where it was started: say so before booting anything.
    done = subprocess.run(
        [sys.executable, "-m", "ivshmem.cli.main", "lab", "run", "-c", "pass"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/dev/shm",
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "would run in /dev/shm" in done.stderr
    assert "cd to a directory elsewhere first" in done.stderr


def test_a_new_lab_removes_directories_of_dead_labs(qemu_binary: str) -> None:
    # A pid that is certainly dead: a child we started and reaped.
    child = subprocess.Popen(["true"])
    child.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"ivshmem-lab-{child.pid}-"))
    (stale / "g0").mkdir()
    mine = Path(tempfile.mkdtemp(prefix=f"ivshmem-lab-{os.getppid()}-"))  # a live pid
    try:
        Lab(qemu=qemu_binary, fetch=False).close()
        assert not stale.exists()
        assert mine.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


# -- guests ------------------------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_program_output_argv_env_and_exit_status(lab: Lab, short_tmp: Path) -> None:
    awkward = ["a b", "new\nline", "'quoted' \"double\"", "$HOME `x` \\", "", "-x"]
    program = short_tmp / "hello.py"
    program.write_text(
        "import json, os, sys\n"
        "import ivshmem\n"
        "print('hello from', os.environ['IVSHMEM_LAB_GUEST'])\n"
        "print('ARGS ' + json.dumps({'argv': sys.argv[1:], 'env': os.environ['LAB_TEST'],\n"
        "      'cwd': os.getcwd(), 'tty': sys.stdout.isatty(), 'file': __file__}))\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    echo = io.StringIO()
    guest = lab.start(
        program,
        awkward,
        env={"LAB_TEST": "x\ny 'z'"},
        cwd=short_tmp,
        echo=echo,
        prefix="[hello] ",
        timeout=GUEST_TIMEOUT,
    )
    result = guest.wait()
    assert result.returncode == 3, result.describe()
    assert not result.ok
    assert result.output.startswith("hello from g0\n")
    assert "to stderr\n" in result.output  # stdout and stderr share the program's terminal
    assert "\r" not in result.output
    args = report(result.output, "ARGS")
    assert args == {
        "argv": awkward,
        "env": "x\ny 'z'",
        "cwd": str(short_tmp),
        "tty": True,
        "file": str(program),
    }
    assert echo.getvalue() == "".join(f"[hello] {line}\n" for line in result.output.splitlines())
    assert result.boot_seconds is not None and 0 < result.boot_seconds < result.wall_seconds
    assert result.error is None and not result.timed_out
    assert "Power down" in result.console  # the kernel's noise went to the console only
    assert "Power down" not in result.output
    with pytest.raises(GuestError, match="status 3"):
        result.check()
    print(f"boot {result.boot_seconds:.2f} s, program {result.program_seconds:.2f} s")


IMPORT_GUEST = r"""
import json, os, sys
import ivshmem
from ivshmem.pci import find_devices
print("IMPORT " + json.dumps({
    "executable": sys.executable,
    "package": os.path.realpath(os.path.dirname(ivshmem.__file__)),
    "devices": len(find_devices()),
    "path": sys.path,
}))
"""


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_any_interpreter_can_import_the_package(
    qemu_binary: str, assets: Assets, short_tmp: Path
) -> None:
    system = "/usr/bin/python3"
    require(os.access(system, os.X_OK), f"{system} is not installed")
    plain = subprocess.run([system, "-c", "import ivshmem"], capture_output=True, check=False)
    assert plain.returncode != 0, f"{system} imports ivshmem by itself: this test proves nothing"
    with Lab(qemu=qemu_binary, python=system) as lab:
        [result] = lab.run(
            code=IMPORT_GUEST, env={"PYTHONPATH": str(short_tmp)}, timeout=GUEST_TIMEOUT
        )
    result.check()
    seen = report(result.output, "IMPORT")
    assert seen["executable"] == system
    assert seen["package"] == os.path.dirname(os.path.realpath(ivshmem.__file__))
    assert seen["devices"] == 0
    # The caller's PYTHONPATH comes first, so it still chooses which ivshmem is used.
    assert str(short_tmp) in seen["path"]
    [ours] = [
        i
        for i, entry in enumerate(seen["path"])
        if entry.startswith(tempfile.gettempdir() + "/ivshmem-lab-") and entry.endswith("/python")
    ]
    assert seen["path"].index(str(short_tmp)) < ours


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_wall_time_ends_when_qemu_exits_not_when_waited_for(lab: Lab) -> None:
    started = time.monotonic()
    guest = lab.start(code="pass", timeout=GUEST_TIMEOUT)
    while guest.running:
        assert time.monotonic() - started < GUEST_TIMEOUT
        time.sleep(0.02)
    exited = time.monotonic() - started
    time.sleep(LATE)
    result = guest.wait()
    assert result.ok, result.describe()
    assert result.boot_seconds is not None and result.boot_seconds < result.wall_seconds
    # The guest's clock starts inside lab.start (after `started`) and stops when its reader
    # threads see QEMU's pipes close, which on a loaded machine may be a while after this
    # thread saw it exit (and this thread may itself have been late to look): SLACK allows
    # for either, and is far below the LATE seconds a wall time taken at wait() would add.
    assert exited - SLACK < result.wall_seconds < exited + SLACK, (result.wall_seconds, exited)


LATE = 6.0  # seconds between QEMU's exit and guest.wait() above
SLACK = 2.0  # scheduling delays a loaded 2-core machine may add


PLAIN_GUEST = (
    FIND_DEVICE
    + r"""
import json, sys
import ivshmem
dev = find_ivshmem()
bar2 = map_bar(dev, 2)
host_said = bytes(bar2[:64]).rstrip(b"\0").decode()
reply = f"guest read {host_said!r}".encode()
bar2[4096:4096 + len(reply)] = reply
print("PLAIN " + json.dumps({"size": len(bar2), "host": host_said, "version": ivshmem.__version__}))
"""
)


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_plain_region_is_shared_between_host_and_guest(lab: Lab, short_tmp: Path) -> None:
    region = short_tmp / "region"
    with open(region, "wb") as f:
        f.truncate(1 << 20)
    with open(region, "r+b") as f:
        f.write(b"written by the host")
    [result] = lab.run(code=PLAIN_GUEST, devices=[PlainRegion(region)], timeout=GUEST_TIMEOUT)
    result.check()
    seen = report(result.output, "PLAIN")
    assert seen["size"] == 1 << 20
    assert seen["host"] == "written by the host"
    with open(region, "rb") as f:
        f.seek(4096)
        assert f.read(64).rstrip(b"\0") == b"guest read 'written by the host'"


DOORBELL_GUEST = (
    FIND_DEVICE
    + r"""
import json, sys
dev = find_ivshmem()
# 32-bit accesses only: BAR0 registers ignore other widths.
regs = memoryview(map_bar(dev, 0)).cast("I")
bar2 = map_bar(dev, 2)
my_id = regs[2]  # IVPosition
text = f"guest {my_id}".encode()
bar2[64 * my_id:64 * my_id + len(text)] = text
host_said = bytes(bar2[:32]).rstrip(b"\0").decode()
print("DOORBELL " + json.dumps({"id": my_id, "host": host_said, "bar2": len(bar2)}), flush=True)
host_id = int(sys.argv[1])
regs[3] = host_id << 16 | 1  # ring the host peer's vector 1
"""
)


@pytest.mark.lab
@pytest.mark.timeout(240)
def test_two_guests_and_a_host_peer_on_one_server(lab: Lab, short_tmp: Path) -> None:
    with (
        ServerProcess(short_tmp, size="1M", vectors=2) as server,
        connect(server.socket_path, vectors=2) as host,
    ):
        host.memory[0:14] = b"host was here\0"
        echo = io.StringIO()
        guests = [
            lab.start(
                code=DOORBELL_GUEST,
                args=[str(host.id)],
                server_socket=server.socket_path,
                vectors=2,
                echo=echo,
                prefix=f"[{i}] ",
                timeout=GUEST_TIMEOUT,
            )
            for i in range(2)
        ]
        # Each Guest knows its QEMU's pid and the id the server gave it, while it runs,
        # without the two guests being started one at a time.
        assigned = [guest.peer_id(timeout=GUEST_TIMEOUT) for guest in guests]
        assert guests[0].pid != guests[1].pid and all(alive(g.pid) for g in guests)
        assert {p["pid"]: p["id"] for p in server.status()["peers"]} == {
            **{g.pid: i for g, i in zip(guests, assigned, strict=True)},
            os.getpid(): host.id,
        }
        rings = [host.wait(timeout=GUEST_TIMEOUT) for _ in guests]
        results = [guest.wait() for guest in guests]
        for result in results:
            result.check()
            assert result.qemu_warnings == ()  # QEMU had nothing to say
        seen = [report(result.output, "DOORBELL") for result in results]
        # ...and it is the id each guest reads as its IVPosition.
        assert [s["id"] for s in seen] == assigned
        ids = sorted(s["id"] for s in seen)
        assert rings == [1, 1]
        assert len(set(ids)) == 2 and host.id not in ids
        for s in seen:
            assert s["host"] == "host was here" and s["bar2"] == 1 << 20
            expect = f"guest {s['id']}".encode()
            assert bytes(host.memory[64 * s["id"] : 64 * s["id"] + len(expect)]) == expect
        assert {line[:4] for line in echo.getvalue().splitlines()} == {"[0] ", "[1] "}
        # QEMU is gone, so the server told us the guests left.
        deadline = time.monotonic() + 30
        while host.peers & set(ids) and time.monotonic() < deadline:
            host.wait(timeout=0.2)
        assert not host.peers & set(ids)


def test_a_vector_count_other_than_the_servers_is_refused_before_booting(
    qemu_binary: str, short_tmp: Path
) -> None:
    with (
        ServerProcess(short_tmp, size="1M", vectors=2) as server,
        Lab(qemu=qemu_binary, fetch=False) as lab,
    ):
        with pytest.raises(
            LabUsageError,
            match=r"gives every peer 2 vector\(s\) \(-n 2\), but this guest's ivshmem-doorbell "
            r"asks for 1: QEMU would take only 1 and log 'Too many eventfd received'.*"
            r"--vectors 2",
        ):
            lab.start(code="pass", server_socket=server.socket_path, vectors=1)
        with pytest.raises(LabUsageError, match=r"no peer can ring vectors 2..2"):
            lab.start(code="pass", server_socket=server.socket_path, vectors=3)
        assert lab.guests == []
        # The command line says the same in one line, and boots nothing.
        done = lab_cli("run", "--socket", server.socket_path, "--vectors", "1", "-c", "pass")
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("ivshmem lab: the ivshmem server at ")
        assert "asks for 1" in done.stderr and done.stderr.count("\n") == 1


def test_the_vector_check_waits_for_a_server_slow_to_answer(
    qemu_binary: str, short_tmp: Path
) -> None:
    # A server that takes seconds to answer its status socket (here: stopped for 11 s, as a
    # loaded machine may leave it) is still asked, not skipped with a warning. (Lab.start
    # checks twice, so a wait of 5 s each, as before, gave up twice.)
    with (
        ServerProcess(short_tmp, size="1M", vectors=2) as server,
        Lab(qemu=qemu_binary, fetch=False) as lab,
    ):
        assert server.proc is not None
        pid = server.proc.pid
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(11.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            started = time.monotonic()
            with pytest.raises(LabUsageError, match=r"gives every peer 2 vector\(s\)"):
                lab.start(code="pass", server_socket=server.socket_path, vectors=1)
            assert time.monotonic() - started > 10.0  # it did wait for the answer
        finally:
            resume.join()
        assert lab.guests == []


@pytest.mark.lab
def test_peer_id_says_when_the_server_does_not_answer(lab: Lab, short_tmp: Path) -> None:
    with ServerProcess(short_tmp, size="1M", vectors=1) as server:
        guest = lab.start(code="pass", server_socket=server.socket_path, timeout=GUEST_TIMEOUT)
        assert guest.peer_id(timeout=GUEST_TIMEOUT) == 0
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(LabError, match=r"did not answer on its status socket .* 2 s"):
                guest.peer_id(timeout=2)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        guest.kill()


@pytest.mark.lab
def test_a_guest_without_a_doorbell_has_no_peer_id(lab: Lab, short_tmp: Path) -> None:
    region = short_tmp / "plain"
    region.write_bytes(b"\0" * 65536)
    guest = lab.start(code="pass", plain_path=region, timeout=GUEST_TIMEOUT)
    try:
        with pytest.raises(LabUsageError, match="no ivshmem-doorbell device"):
            guest.peer_id()
    finally:
        guest.kill()
        guest.close()


@pytest.mark.lab
@pytest.mark.timeout(240)
def test_qemus_warnings_reach_the_result_when_the_lab_cannot_check_vectors(
    lab: Lab, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server without a status socket (as QEMU's own) cannot be asked its -n: the lab says
    # so, and what QEMU then complains about is in the result, not only in a log file.
    with ServerProcess(
        short_tmp, size="1M", vectors=2, extra_args=["--status-socket", ""]
    ) as server:
        with caplog.at_level("WARNING", logger="ivshmem.lab.guest"):
            guest = lab.start(
                code="pass", server_socket=server.socket_path, vectors=1, timeout=GUEST_TIMEOUT
            )
        assert "cannot check the vector count" in caplog.text
        with pytest.raises(LabUsageError, match="has no status socket"):
            guest.peer_id(timeout=1)
        result = guest.wait().check()
    assert any("Too many eventfd received" in line for line in result.qemu_warnings), result


@pytest.mark.lab
@pytest.mark.timeout(240)
def test_cli_run_shows_qemus_warnings_of_a_guest_that_succeeded(
    assets: Assets, short_tmp: Path
) -> None:
    with ServerProcess(
        short_tmp, size="1M", vectors=2, extra_args=["--status-socket", ""]
    ) as server:
        done = lab_cli("run", "--socket", server.socket_path, "--vectors", "1", "-c", "pass")
    assert done.returncode == 0, done.stderr
    assert "cannot check the vector count" in done.stderr
    assert re.search(r"ivshmem lab: g0: QEMU: .*Too many eventfd received", done.stderr), (
        done.stderr
    )


VFIO_GUEST = (
    FIND_DEVICE
    + r"""
import fcntl, json, struct
dev = find_ivshmem()
bdf = os.path.basename(dev)
group = os.path.basename(os.readlink(f"{dev}/iommu_group"))
with open(f"{dev}/driver_override", "w") as f:
    f.write("vfio-pci")
with open("/sys/bus/pci/drivers_probe", "w") as f:
    f.write(bdf)
driver = os.path.basename(os.readlink(f"{dev}/driver"))
# linux/vfio.h: _IO(';', 100 + n)
container = os.open("/dev/vfio/vfio", os.O_RDWR)
api = fcntl.ioctl(container, 0x3B64)  # VFIO_GET_API_VERSION
grp = os.open(f"/dev/vfio/{group}", os.O_RDWR)
status = struct.unpack("II", fcntl.ioctl(grp, 0x3B67, struct.pack("II", 8, 0)))[1]
fcntl.ioctl(grp, 0x3B68, struct.pack("i", container))  # VFIO_GROUP_SET_CONTAINER
# VFIO_SET_IOMMU(VFIO_TYPE1_IOMMU): refused (EPERM) without interrupt remapping
fcntl.ioctl(container, 0x3B66, 1)
print("VFIO " + json.dumps({"driver": driver, "api": api, "viable": bool(status & 1),
      "cmdline": open("/proc/cmdline").read().split(), "iommus": os.listdir("/sys/class/iommu")}))
"""
)


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_iommu_lab_lets_a_guest_use_vfio(qemu_binary: str, assets: Assets, short_tmp: Path) -> None:
    region = short_tmp / "region"
    with open(region, "wb") as f:
        f.truncate(1 << 20)
    with Lab(qemu=qemu_binary, iommu=True) as lab:
        [result] = lab.run(code=VFIO_GUEST, plain_path=region, timeout=GUEST_TIMEOUT)
    result.check()
    seen = report(result.output, "VFIO")
    assert seen["driver"] == "vfio-pci"
    assert seen["api"] == 0 and seen["viable"]
    assert "intel_iommu=on" in seen["cmdline"]
    assert seen["iommus"]


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_a_hanging_guest_is_killed_at_its_timeout(lab: Lab) -> None:
    guest = lab.start(
        code="import time\nprint('sleeping', flush=True)\ntime.sleep(3600)\n",
        timeout=GUEST_TIMEOUT,
    )
    assert "sleeping" in guest.wait_for_output("sleeping", timeout=GUEST_TIMEOUT)
    assert guest.running
    with pytest.raises(GuestTimeoutError) as caught:
        guest.wait(timeout=0.5)
    result = caught.value.result
    assert result.timed_out and result.returncode is None
    assert result.output == "sleeping\n"
    assert not alive(guest.pid)
    assert isinstance(caught.value, TimeoutError)


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_leaving_the_lab_on_an_exception_kills_guests_and_removes_files(
    qemu_binary: str, assets: Assets
) -> None:
    with pytest.raises(RuntimeError, match="test failure"), Lab(qemu=qemu_binary) as lab:
        guest = lab.start(code="print('up', flush=True)\nimport time\ntime.sleep(3600)\n")
        guest.wait_for_output("up", timeout=GUEST_TIMEOUT)
        job_dir = guest.job_dir
        assert job_dir.exists() and alive(guest.pid)
        raise RuntimeError("test failure")
    assert not alive(guest.pid)
    assert not job_dir.exists() and not lab_dirs(os.getpid())
    assert qemu_children(os.getpid()) == []


def read_until(proc: subprocess.Popen[bytes], text: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    data = b""
    deadline = time.monotonic() + timeout
    while text not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {text!r} in time; got {data!r}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"EOF before {text!r}; got {data!r}"
            data += chunk
    return data


def first_qemu_child(ppid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = qemu_children(ppid)
        if found:
            return found[0]
        assert time.monotonic() < deadline, "no QEMU started in time"
        time.sleep(0.005)


@pytest.mark.lab
@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase", ["booting", "running"])
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_run_cleans_up_on_ctrl_c_and_sigterm(
    assets: Assets, signum: int, status: int, phase: str
) -> None:
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ivshmem.cli.main",
            "lab",
            "run",
            "-c",
            "print('ready', flush=True)\nimport time\ntime.sleep(3600)\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a shell job is
    )
    try:
        if phase == "running":
            read_until(cli, b"ready\n", GUEST_TIMEOUT)
            [qemu] = qemu_children(cli.pid)
        else:
            # As soon as QEMU exists: the CLI may still be inside Lab.start, the guest's
            # kernel is still booting, and nothing is there to be waited for yet.
            qemu = first_qemu_child(cli.pid, GUEST_TIMEOUT)
        assert lab_dirs(cli.pid)
        os.killpg(cli.pid, signum)  # what the terminal does on Ctrl-C: the whole group
        assert cli.wait(30) == status
        assert not alive(qemu)
        assert not lab_dirs(cli.pid)
        if phase == "booting":
            assert cli.stdout is not None
            assert b"ready" not in cli.stdout.read(), "the signal came too late to test booting"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for stream in (cli.stdout, cli.stderr):
            assert stream is not None
            stream.close()


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_ctrl_c_reaches_guest_wait_when_another_thread_takes_the_signal(assets: Assets) -> None:
    # The kernel may hand a signal sent to a process to any of its threads. Blocking SIGINT in
    # the main thread makes that certain here: a reader thread takes it, and the main thread
    # must still see KeyboardInterrupt in Guest.wait (a single blocking waitpid slept on).
    script = (
        "import signal, sys\n"
        "from ivshmem.lab import Lab\n"
        "with Lab() as lab:\n"
        "    guest = lab.start(code='import time\\ntime.sleep(3600)')\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "    try:\n"
        "        print('QEMU', guest.pid, flush=True)\n"
        "        guest.wait()\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
        "        sys.exit(130)\n"
    )
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        line = read_until(host, b"\n", GUEST_TIMEOUT).decode()
        qemu = int(line.split()[1])
        # Into guest.wait, a few bytecodes on. Were it slower, the signal would be acted on
        # before it and the test pass without testing the wait: never fail wrongly.
        time.sleep(0.5)
        host.send_signal(signal.SIGINT)
        assert host.wait(30) == 130
        assert host.stdout is not None
        assert b"interrupted" in host.stdout.read()
        assert not alive(qemu)
        assert not lab_dirs(host.pid)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        assert host.stdout is not None
        host.stdout.close()


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_guests_die_with_a_killed_host_process(assets: Assets) -> None:
    script = (
        "import sys\n"
        "from ivshmem.lab import Lab\n"
        "lab = Lab()\n"
        "guest = lab.start(code='print(1, flush=True)\\nimport time\\ntime.sleep(3600)')\n"
        "guest.wait_for_output('1', 120)\n"
        "print('QEMU', guest.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    host = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        line = read_until(host, b"\n", GUEST_TIMEOUT).decode()
        qemu = int(line.split()[1])
        assert alive(qemu)
        host.kill()  # SIGKILL: no atexit, no finally -- only the kernel can clean up
        host.wait()
        deadline = time.monotonic() + 20
        while alive(qemu) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(qemu), "QEMU outlived the process that started it"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        for stream in (host.stdin, host.stdout):
            assert stream is not None
            stream.close()
    # The next lab removes the dead one's directory.
    Lab(fetch=False).close()
    assert not lab_dirs(host.pid)


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_run_guests_and_a_guest_that_cannot_start(assets: Assets, short_tmp: Path) -> None:
    [result] = run_guests(
        code="import os, sys\nprint(os.environ['IVSHMEM_LAB_GUEST'])\nsys.exit(int(sys.argv[1]))",
        args=["5"],
        timeout=GUEST_TIMEOUT,
    )
    assert (result.name, result.returncode, result.output) == ("g0", 5, "g0\n")
    # A "server" that speaks the wrong protocol version: QEMU refuses to start and says why;
    # the lab reports that as a GuestError carrying QEMU's message.
    path = str(short_tmp / "wrong.sock")
    with socket.socket(socket.AF_UNIX) as wrong:
        wrong.bind(path)
        wrong.listen()
        with Lab() as lab:
            guest = lab.start(code="pass", server_socket=path, timeout=GUEST_TIMEOUT)
            conn, _ = wrong.accept()
            with conn:
                conn.sendall(struct.pack("<q", 1))
                with pytest.raises(GuestError) as caught:
                    guest.wait()
    result = caught.value.result
    assert result.returncode is None and not result.timed_out
    assert "server sent version 1, expecting 0" in result.qemu_log
    assert "QEMU exited with status 1" in str(caught.value)


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_cli_run_streams_prefixed_output_and_exits_with_the_guest_status(
    assets: Assets, short_tmp: Path
) -> None:
    region = short_tmp / "region"
    with open(region, "wb") as f:
        f.truncate(64 << 10)
    program = short_tmp / "prog.py"
    program.write_text(
        FIND_DEVICE
        + "import sys\n"
        + "size = len(map_bar(find_ivshmem(), 2))\n"
        + "print('guest', os.environ['IVSHMEM_LAB_GUEST'], sys.argv[1:], size)\n"
        + "sys.exit(4)\n"
    )
    done = lab_cli("run", "-n", "2", "--plain", str(region), str(program), "x", "--flag")
    assert done.returncode == 4, done.stderr
    assert sorted(done.stdout.splitlines()) == [
        "[g0] guest g0 ['x', '--flag'] 65536",
        "[g1] guest g1 ['x', '--flag'] 65536",
    ]
    assert re.search(r"g0 exited with status 4 \(boot [0-9.]+ s, program [0-9.]+ s\)", done.stderr)
    assert re.search(r"g1 exited with status 4 ", done.stderr)


def lab_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem.cli.main", "lab", *args],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        check=False,
    )


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_fetch_into_an_empty_cache_then_clean_it(assets: Assets, short_tmp: Path) -> None:
    # What CI's first run does through the `assets` fixture, here into a cache of our own.
    require(shutil.which("apt-get"), "apt-get is needed to fetch the guest kernel")
    cache = short_tmp / "cache"
    fetched = lab_cli("fetch", "--cache", str(cache))
    assert fetched.returncode == 0, fetched.stderr
    assert "downloading linux-image-" in fetched.stderr  # the progress message
    version = (cache / "kernels" / "current").read_text().strip()
    kernel = cache / "kernels" / version
    assert {p.name for p in kernel.iterdir()} >= {"vmlinuz", "config", "kernel.json", "modules"}
    modules = {p.stem for p in (kernel / "modules").iterdir()}
    assert {"9p", "9pnet_virtio", "overlay", "vfio_pci", "vfio_iommu_type1"} <= modules
    assert not list(cache.rglob("*.deb")) and not list(cache.rglob(".fetch-*"))
    used = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert used < 150 << 20, f"the cache keeps {used >> 20} MB; the package unpacks to 400 MB"

    # Found again through $IVSHMEM_LAB_CACHE, without downloading anything.
    again = lab_cli("fetch", env=dict(os.environ, IVSHMEM_LAB_CACHE=str(cache)))
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stderr and str(cache) in again.stdout

    cleaned = lab_cli("clean", "--cache", str(cache))
    assert cleaned.returncode == 0, cleaned.stderr
    assert not cache.exists()

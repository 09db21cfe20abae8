"""The :class:`Lab`: boots throw-away guests that run one Python program each.

A guest is QEMU under software emulation (TCG) booting Debian's kernel with the lab's busybox
initramfs. The initramfs mounts the host's ``/`` read-only over 9p, puts a RAM overlay on top
so the guest may write anywhere, chroots into it and runs the host's own Python interpreter
(``sys.executable`` by default). Whatever the interpreter, the guest's ``PYTHONPATH`` ends with
a directory of the lab's holding only this package, so ``import ivshmem`` gets the host's copy.
The program's output streams back over a serial port; when it ends the guest powers off.

Per guest the lab writes a job directory (inside the lab's temporary directory, visible to the
guest through the host-root share) holding ``run.sh``, the command to run with its argv, env and
working directory quoted for the shell, and ``modules``, extra kernel modules to load. Nothing
per-run is baked into the initramfs, so one cached initramfs serves every guest.

Inside the guest
    The program runs as root with the guest's own /proc, /sys, /dev (devpts, a tmpfs on
    /dev/shm); every other path shows the host's files, and writes stay in guest RAM.
    ``IVSHMEM_LAB_GUEST`` holds the guest's name (``g0``, ``g1`` …). A static busybox is at
    ``/run/ivshmem-lab/busybox`` (``busybox ip addr add …`` configures a NIC given with
    ``extra_args`` and ``modules=["virtio_net"]``, e.g. two guests joined by
    ``-netdev stream,id=n0,server=on|off,addr.type=unix,addr.path=SOCK`` and
    ``-device virtio-net-pci,netdev=n0,mac=…``).

This project's device
    A guest whose device is ``device="vfio-user"`` (or a :class:`VfioUser` socket) gets this
    project's ivshmem device: the lab starts an ``ivshmem-device`` process for it
    (:mod:`ivshmem.lab.devicehost`) before its QEMU, and runs that guest under QEMU >= 10.1
    (:mod:`ivshmem.lab.vmm`, :mod:`ivshmem.lab.qemu11`), with ``caching-mode=on`` on the
    IOMMU; the device processes stop when the lab closes.

Trust
    A guest can read every host file QEMU's user can read (never write them). The lab is for
    running your own programs in test VMs, not for confining untrusted code.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from ..errors import UsageError
from ..memory import parse_size
from .assets import Assets, prepare
from .debian import Progress
from .devicehost import DeviceHosts, check_device
from .errors import LabSetupError, LabUsageError
from .guest import (
    DEVICE_KINDS,
    Device,
    DeviceKind,
    Doorbell,
    Guest,
    GuestResult,
    PlainRegion,
    VfioUser,
    device_arguments,
    spawn_qemu,
)
from .kernel import BASE_MODULES, IOMMU_MODULES
from .vmm import QemuCommand, host_qemu, qemu11_command

__all__ = ["Lab", "run_guests"]

# The guest mounts its own /proc, /sys and /dev over the host's: files there are not visible.
_HIDDEN_IN_GUEST = ("/proc", "/sys", "/dev")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_ENV_KEY_RE = re.compile(r"^[^=\0-][^=\0]*$")
# Where the guest's init copies busybox inside the chroot (see initramfs.INIT_SCRIPT).
_GUEST_BUSYBOX = "/run/ivshmem-lab/busybox"
# Host variables a guest program inherits; everything else comes from ``env``.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ")

# This package's directory: guests import it from here whatever interpreter they run.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent

_LIVE_LABS: set[Lab] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_all_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE_LABS)
    for lab in labs:
        lab.close()


def _ours(device: Device) -> bool:
    """Whether ``device`` is this project's (served over vfio-user: needs QEMU >= 10.1)."""
    return not isinstance(device, (Doorbell, PlainRegion)) or device.device != "qemu"


def _visible_in_guest(path: str) -> bool:
    real = os.path.realpath(path)
    return not any(real == top or real.startswith(top + "/") for top in _HIDDEN_IN_GUEST)


def _check_workdir(cwd: str | os.PathLike[str] | None) -> str:
    """The guest program's working directory, absolute, or a LabUsageError saying why the
    guest could not enter it (its init would only report ``can't cd`` and status 125)."""
    if cwd is not None:
        workdir, how = os.path.abspath(os.fspath(cwd)), "pass cwd= a directory elsewhere"
    else:
        try:
            workdir = os.getcwd()
        except FileNotFoundError as err:
            raise LabUsageError(
                "this process's working directory was removed: the guest program runs in the "
                "same directory, so cd to an existing one (or pass cwd=)"
            ) from err
        how = "cd to a directory elsewhere first, e.g. /tmp (or, from Python, pass cwd=)"
    if not os.path.isdir(workdir):
        raise LabUsageError(f"working directory {workdir} for the guest is not a directory")
    if not _visible_in_guest(workdir):
        raise LabUsageError(
            f"the guest program would run in {workdir}, but guests mount their own /dev, /proc "
            f"and /sys, so they cannot see the host's directories there: {how}"
        )
    return workdir


def _sweep_stale_dirs(parent: Path) -> None:
    """Remove job directories left by lab processes that were killed (SIGKILL skips every
    cleanup). Their names carry the owner's pid; only our own user's are touched."""
    try:
        candidates = list(parent.glob("ivshmem-lab-*-*"))
    except OSError:
        return
    for path in candidates:
        pid_text = path.name.split("-")[2]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


class Lab:
    """Throw-away guests under QEMU, each running a Python program from the host.

    Use as a context manager; leaving it kills every guest still running and removes the
    lab's temporary files::

        with Lab() as lab:
            guest = lab.start("prog.py", ["arg"], plain_path="/dev/shm/region")
            ...                                  # host-side work while the guest runs
            result = guest.wait(timeout=60)
            print(result.returncode, result.output)

    Options that apply to every guest of the lab:

    ``cache_dir``   where the kernel, busybox and initramfs are cached (see ``assets``)
    ``iommu``       an emulated Intel IOMMU with interrupt remapping, ``intel_iommu=on`` and the
                    vfio modules loaded: the guest can bind the ivshmem device to vfio-pci
    ``memory``      guest RAM (the overlay that makes the root writable lives in it too)
    ``cpus``        virtual CPUs per guest (each is a host thread under TCG)
    ``qemu``        the qemu-system-x86_64 binary
    ``python``      the interpreter the guest runs, an absolute path on the host
    ``modules``     extra kernel modules to load (from ``kernel.OPTIONAL_MODULES``)
    ``extra_args``  extra QEMU arguments (e.g. a ``-netdev``/``-device`` pair)
    ``kernel_args`` extra kernel command-line words
    ``fetch``       allow downloading a missing kernel or busybox (with a progress message)
    """

    def __init__(
        self,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        iommu: bool = False,
        memory: int | str = "256M",
        cpus: int = 1,
        qemu: str | None = None,
        python: str | os.PathLike[str] | None = None,
        modules: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        kernel_args: Sequence[str] = (),
        fetch: bool = True,
        progress: Progress | None = None,
    ) -> None:
        self.iommu = iommu
        try:
            memory_bytes = parse_size(memory)
        except UsageError as err:
            raise LabUsageError(f"guest memory: {err}") from err
        if memory_bytes < 128 << 20:
            raise LabUsageError(f"guest memory {memory!r} is too small: give at least 128M")
        self.memory_mib = memory_bytes >> 20
        if isinstance(cpus, bool) or not 1 <= cpus <= 64:
            raise LabUsageError(f"cpus must be 1..64, got {cpus!r}")
        self.cpus = cpus
        qemu_path = shutil.which(qemu or "qemu-system-x86_64")
        if qemu_path is None:
            raise LabSetupError(
                f"{qemu or 'qemu-system-x86_64'} not found: install QEMU "
                "(apt-get install qemu-system-x86)"
            )
        self.qemu = qemu_path
        self._qemu11: QemuCommand | None = None  # found when a guest first needs it
        self._device_hosts: DeviceHosts | None = None  # ivshmem-device processes, when needed
        interpreter = os.fspath(python) if python is not None else sys.executable
        if not interpreter or not os.path.isabs(interpreter) or "=" in interpreter:
            raise LabUsageError(
                f"the guest's Python must be an absolute path without '=', got {interpreter!r}"
            )
        if not os.access(interpreter, os.X_OK):
            raise LabUsageError(f"the guest's Python {interpreter} is not an executable file")
        self.python = interpreter
        self.modules = tuple(modules)
        self.extra_args = tuple(extra_args)
        for word in kernel_args:
            if not word or any(c.isspace() for c in word):
                raise LabUsageError(f"kernel argument {word!r} must be one word")
        self.kernel_args = tuple(kernel_args)
        self._cache_dir = cache_dir
        self._fetch = fetch
        self._progress = progress
        self._assets: Assets | None = None
        self._tmp: Path | None = None
        self._guests: list[Guest] = []
        self._names: set[str] = set()
        self._spawner: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._closed = False
        _sweep_stale_dirs(Path(tempfile.gettempdir()))
        with _LIVE_LOCK:
            _LIVE_LABS.add(self)

    # -- setup -----------------------------------------------------------------------------

    def prepare(self) -> Assets:
        """Fetch and build what guests boot from (done by the first :meth:`start` anyway)."""
        with self._lock:
            if self._assets is None:
                self._assets = prepare(self._cache_dir, fetch=self._fetch, progress=self._progress)
            return self._assets

    def qemu11_command(self) -> QemuCommand:
        """The QEMU >= 10.1 guests with this project's device run under (found or prepared
        once per lab: see :mod:`ivshmem.lab.qemu11`)."""
        with self._lock:
            if self._qemu11 is None:
                from . import qemu11

                found = qemu11.prepare(self._cache_dir, fetch=self._fetch, progress=self._progress)
                self._qemu11 = qemu11_command(found)
            return self._qemu11

    def _serve(self, devices: Sequence[Device], name: str) -> list[Device]:
        """``devices`` with each of this project's replaced by the vfio-user socket of an
        ``ivshmem-device`` process the lab started for it."""
        hosts = self._hosts()
        served = [hosts.serve(d, f"{name}-{i}") if _ours(d) else d for i, d in enumerate(devices)]
        hosts.attach(name, served)
        return served

    def _hosts(self) -> DeviceHosts:
        if self._device_hosts is None:
            self._device_hosts = DeviceHosts(self._job_root() / "devices", self._in_spawner)
        return self._device_hosts

    def device_process(self, devices: Sequence[Doorbell], name: str = "shared") -> list[VfioUser]:
        """Start one ``ivshmem-device`` process serving several guests' devices (this
        project's, ``Doorbell(..., "vfio-user")``; of their options ``--intx`` and
        ``--event-vector N``): one socket per device, each for one guest, given to
        :meth:`start` as ``devices=[socket]``. Guests served by one process that share a
        server ring each other straight through it, without the server's eventfds. It stops
        when the last guest that used it has exited, or with the lab; its log is
        ``device_log_path(name)`` and ends the error messages of the guests it served."""
        if not _NAME_RE.match(name):
            raise LabUsageError(f"device process name {name!r} is not 1-32 letters, digits, ._-")
        with self._lock:
            if self._closed:
                raise LabUsageError("this lab is closed; create a new Lab")
            hosts = self._hosts()
        return hosts.serve_shared(list(devices), name)

    def device_log_path(self, name: str) -> Path:
        """The log of the device process ``name`` (:meth:`device_process`'s, or
        ``<guest>-<n>`` for the one the lab started for a guest's n-th device)."""
        return self._hosts().log_path(name)

    def _job_root(self) -> Path:
        if self._tmp is None:
            parent = Path(tempfile.gettempdir())
            self._tmp = Path(tempfile.mkdtemp(prefix=f"ivshmem-lab-{os.getpid()}-", dir=parent))
            text = str(self._tmp)
            if not text.isprintable() or any(c.isspace() for c in text):
                raise LabSetupError(
                    f"the lab's temporary directory {text!r} has spaces or unusual characters "
                    "and cannot go on the kernel command line: set TMPDIR to a plain path"
                )
            if not _visible_in_guest(text):
                raise LabSetupError(
                    f"the lab's temporary directory {text} is under /dev, /proc or /sys, "
                    "which guests do not see: set TMPDIR to a directory such as /tmp"
                )
        return self._tmp

    def _import_dir(self) -> Path | None:
        """A directory holding only this package (a symlink to it), for the guest's PYTHONPATH,
        so that any interpreter can import it. Not the package's parent directory: when that
        is a site-packages, it would also put the host environment's other packages (built
        for another Python, maybe) ahead of the interpreter's own."""
        package = _PACKAGE_DIR
        if not _visible_in_guest(str(package)):
            return None
        where = self._job_root() / "python"
        if not where.exists():
            where.mkdir()
            (where / package.name).symlink_to(package, target_is_directory=True)
        return where

    def _in_spawner(self, fn: Callable[[], object]) -> object:
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(1, thread_name_prefix="ivshmem-lab-spawn")
        return self._spawner.submit(fn).result()

    def _spawn(self, argv: Sequence[str], fds: Sequence[int]) -> subprocess.Popen[bytes]:
        # Forked from one thread that lives as long as the lab: QEMU's PR_SET_PDEATHSIG
        # fires when the forking *thread* ends, so it must not be a caller's short-lived one.
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(1, thread_name_prefix="ivshmem-lab-spawn")
        return self._spawner.submit(spawn_qemu, argv, fds).result()

    # -- guests ----------------------------------------------------------------------------

    def _next_name(self) -> str:
        with self._lock:
            index = len(self._guests)
            while f"g{index}" in self._names:
                index += 1
            return f"g{index}"

    @property
    def guests(self) -> list[Guest]:
        with self._lock:
            return list(self._guests)

    def start(
        self,
        program: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        *,
        code: str | None = None,
        module: str | None = None,
        name: str | None = None,
        devices: Sequence[Device] = (),
        server_socket: str | os.PathLike[str] | None = None,
        vectors: int = 1,
        plain_path: str | os.PathLike[str] | None = None,
        plain_size: int | str | None = None,
        device: DeviceKind = "qemu",
        qemu11: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        timeout: float | None = None,
        echo: IO[str] | None = None,
        prefix: str = "",
    ) -> Guest:
        """Boot one guest running a Python program; return at once with its :class:`Guest`.

        The program is exactly one of: ``program`` (a script path on the host), ``code``
        (source text) or ``module`` (run as ``python -m``); ``args`` become its ``sys.argv[1:]``.
        Devices: ``server_socket`` (+ ``vectors``) adds an ``ivshmem-doorbell`` connected to a
        server, ``plain_path`` (+ ``plain_size``) an ``ivshmem-plain`` over a shared file, and
        ``devices`` any list of :class:`Doorbell` / :class:`PlainRegion`, in PCI order. A
        doorbell's ``vectors`` must be its server's ``-n``: the server is asked (through its
        status socket) and a mismatch is refused before QEMU starts, since QEMU would run with
        it silently. The returned guest's :meth:`Guest.peer_id` is the id its server gave it.
        ``devices`` any list of :class:`Doorbell` / :class:`PlainRegion` / :class:`VfioUser`,
        in PCI order.

        ``device`` chooses the device of ``server_socket``/``plain_path``: ``"qemu"`` (QEMU's
        own) or ``"vfio-user"`` (this project's: the lab starts an ``ivshmem-device`` process
        serving the guest, stopped when the lab closes). A guest with this project's device
        runs under QEMU >= 10.1 (:mod:`ivshmem.lab.qemu11`: PATH's, or Debian trixie's,
        prepared in the lab cache once, as root); ``qemu11=True`` runs any guest under it (to
        compare QEMU's device and ours under the same QEMU), ``False`` refuses.

        The program runs as root in the guest, in ``cwd`` (default: this process's working
        directory), with stdin from /dev/null and an environment of PATH, HOME, locale and
        ``PYTHON*``/``IVSHMEM*`` variables of this process, ``IVSHMEM_LAB_GUEST`` (its name)
        and ``env``, plus this package's directory at the end of ``PYTHONPATH``. ``cwd`` cannot
        be under /dev, /proc or /sys, where the guest mounts its own. ``timeout`` kills the
        guest that many seconds after start. ``echo`` receives the program's output live, each
        line after ``prefix``.
        """
        chosen = [x for x in (program, code, module) if x is not None]
        if len(chosen) != 1:
            raise LabUsageError("give exactly one of program, code or module")
        if device not in DEVICE_KINDS:
            raise LabUsageError(f"device must be one of {', '.join(DEVICE_KINDS)}, not {device!r}")
        all_devices: list[Device] = list(devices)
        if server_socket is not None:
            all_devices.append(Doorbell(server_socket, vectors, device))
        if plain_path is not None:
            all_devices.append(PlainRegion(plain_path, plain_size, device))
        needs11 = any(_ours(d) for d in all_devices)
        if needs11 and qemu11 is False:
            raise LabUsageError(
                "this project's device (vfio-user) needs QEMU >= 10.1: leave qemu11 unset"
            )
        # Checked before anything starts: QEMU's devices fully, ours as far as their inputs go.
        device_arguments([d for d in all_devices if not _ours(d)])
        for ours in all_devices:
            check_device(ours)
        runner = self.qemu11_command() if (qemu11 or needs11) else host_qemu(self.qemu)
        if timeout is not None and timeout <= 0:
            raise LabUsageError(f"timeout must be positive, got {timeout!r}")
        script_path = None
        if program is not None:
            script_path = os.path.abspath(os.fspath(program))
            if not os.path.isfile(script_path):
                raise LabUsageError(f"program {script_path} is not a file")
            if not _visible_in_guest(script_path):
                raise LabUsageError(
                    f"program {script_path} is under /dev, /proc or /sys, which guests do not "
                    "see (they mount their own there): move it elsewhere, e.g. under /tmp"
                )
        workdir = _check_workdir(cwd)

        with self._lock:
            if self._closed:
                raise LabUsageError("this lab is closed; create a new Lab")
            assets = self.prepare()
            guest_name = name if name is not None else self._next_name()
            if not _NAME_RE.match(guest_name) or guest_name in self._names:
                raise LabUsageError(
                    f"guest name {guest_name!r} is taken or not 1-32 letters, digits, ._-"
                )
            job = self._job_root() / guest_name
            job.mkdir()
            self._names.add(guest_name)

            if code is not None:
                script = job / "program.py"
                script.write_text(code)
                argv = [self.python, str(script), *args]
            elif module is not None:
                argv = [self.python, "-m", module, *args]
            else:
                assert script_path is not None
                argv = [self.python, script_path, *args]
            (job / "run.sh").write_text(
                self._run_script(argv, workdir, guest_name, env, self._import_dir())
            )
            (job / "modules").write_text(self._module_list(assets))

            cmdline = self._kernel_cmdline(job)
            base = self._qemu_base(assets, guest_name, cmdline, job, runner)
            served = self._serve(all_devices, guest_name) if needs11 else all_devices
            device_args = device_arguments(served, runner.path)
            tail = [*device_args, *self.extra_args, *extra_args]

            def command(output_fd: int, control_fd: int) -> list[str]:
                return [
                    *base,
                    "-chardev",
                    f"file,id=output,path=/proc/self/fd/{output_fd}",
                    "-serial",
                    "chardev:output",
                    "-chardev",
                    f"file,id=control,path=/proc/self/fd/{control_fd}",
                    "-serial",
                    "chardev:control",
                    *tail,
                ]

            hosts = self._device_hosts if needs11 else None
            guest = Guest(
                guest_name,
                command,
                job,
                self._spawn,
                timeout=timeout,
                echo=echo,
                prefix=prefix,
                devices=all_devices,
                on_exit=None if hosts is None else lambda: hosts.stop(guest_name),
                device_log=None if hosts is None else lambda: hosts.log_of(guest_name),
            )
            self._guests.append(guest)
            return guest

    def run(
        self,
        program: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        *,
        n: int = 1,
        timeout: float | None = None,
        echo: IO[str] | None = None,
        **options: Any,
    ) -> list[GuestResult]:
        """Boot ``n`` guests running the same program, wait for all, return their results.

        ``options`` are :meth:`start`'s. With several guests echoed lines are prefixed with
        ``[name]``. Raises :class:`GuestTimeoutError` / :class:`GuestError` (after killing the
        other guests) if a guest times out or fails to run its program.
        """
        if isinstance(n, bool) or n < 1:
            raise LabUsageError(f"n must be at least 1, got {n!r}")
        guests: list[Guest] = []
        try:
            for _ in range(n):
                name = self._next_name()
                guests.append(
                    self.start(
                        program,
                        args,
                        name=name,
                        timeout=timeout,
                        echo=echo,
                        prefix=f"[{name}] " if n > 1 else "",
                        **options,
                    )
                )
            return [guest.wait() for guest in guests]
        except BaseException:
            for guest in guests:
                guest.kill()
            raise

    # -- command lines ---------------------------------------------------------------------

    def _run_script(
        self,
        argv: Sequence[str],
        cwd: str,
        name: str,
        env: Mapping[str, str] | None,
        import_dir: Path | None,
    ) -> str:
        variables = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        variables.update(
            (k, v) for k, v in os.environ.items() if k.startswith(("PYTHON", "IVSHMEM"))
        )
        variables.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        variables.setdefault("LANG", "C.UTF-8")
        variables["IVSHMEM_LAB_GUEST"] = name
        variables.update(env or {})
        if import_dir is not None:
            # Last, so that a PYTHONPATH of the caller's still decides which ivshmem is used.
            earlier = variables.get("PYTHONPATH")
            variables["PYTHONPATH"] = (
                f"{earlier}{os.pathsep}{import_dir}" if earlier else str(import_dir)
            )
        for key, value in variables.items():
            if not isinstance(value, str) or not _ENV_KEY_RE.match(key) or "\0" in value:
                raise LabUsageError(f"bad environment variable for the guest: {key!r}={value!r}")
        for word in argv:
            if "\0" in word:
                raise LabUsageError(f"argument {word!r} contains a NUL byte")
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in variables.items())
        command = " ".join(shlex.quote(word) for word in argv)
        # shlex.quote makes any string (newlines included) one word for busybox sh.
        return (
            "# written by ivshmem.lab for one guest; run by the guest's init in the chroot\n"
            f"cd {shlex.quote(cwd)} || exit 125\n"
            f"exec {_GUEST_BUSYBOX} env -i {assignments} {command}\n"
        )

    def _module_list(self, assets: Assets) -> str:
        wanted = [*(IOMMU_MODULES if self.iommu else ()), *self.modules]
        already = set(assets.kernel.load_order(BASE_MODULES))
        paths = []
        for name in assets.kernel.load_order(wanted):
            if name in already:
                continue
            path = str(assets.kernel.module_path(name).resolve())
            if not _visible_in_guest(path) or "\n" in path:
                raise LabSetupError(f"kernel module {path} is not visible to guests")
            paths.append(path + "\n")
        return "".join(paths)

    def _kernel_cmdline(self, job: Path) -> str:
        words = [
            "console=ttyS0",
            "panic=-1",  # a crashed guest resets, and -no-reboot turns that into QEMU exiting
            "quiet",
            "rdinit=/init",
            f"ivshmem_lab.job={job}",
        ]
        if self.iommu:
            words.append("intel_iommu=on")
            # At boot the kernel checks that the timer interrupt arrives through the IO-APIC
            # within a few busy-waited ticks; a TCG vCPU starved by a loaded host can miss
            # them, and with interrupt remapping on the kernel then panics ("timer doesn't
            # work through Interrupt-remapped IO-APIC") instead of trying another route.
            # The check is for broken chipsets; QEMU's timer works.
            words.append("no_timer_check")
        return " ".join([*words, *self.kernel_args])

    def _qemu_base(
        self, assets: Assets, name: str, cmdline: str, job: Path, runner: QemuCommand
    ) -> list[str]:
        at = runner.path
        argv = [
            *runner.prefix,
            "-name",
            f"ivshmem-lab-{name}",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            # "max" offers every feature TCG emulates: software built for x86-64-v2 and above
            # (numpy's wheels) runs.
            "-cpu",
            "max",
            "-smp",
            str(self.cpus),
            "-m",
            f"{self.memory_mib}M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        if self.iommu:
            # The IOMMU must exist before the devices it translates for. Without interrupt
            # remapping VFIO_SET_IOMMU fails with EPERM (vfio_iommu_type1 would need
            # allow_unsafe_interrupts). intremap=on is QEMU's default under TCG anyway; it is
            # spelled out so that it stays on, and needs no split irqchip (a KVM matter).
            iommu = "intel-iommu,intremap=on"
            if runner.vfio_user:
                # A VFIO device behind a vIOMMU (vfio-user-pci is one) needs caching mode, so
                # that QEMU hears of every mapping the guest makes and can pass it on (QEMU
                # aborts the VM otherwise: "device requires caching mode"). Set for every
                # guest of this QEMU, so that QEMU's device and ours run alike.
                iommu += ",caching-mode=on"
            argv += ["-device", iommu]
        argv += [
            "-kernel",
            at(str(assets.kernel.image)),
            "-initrd",
            at(str(assets.initramfs)),
            "-append",
            cmdline,
            "-chardev",
            f"file,id=console,path={at(str(job / 'console.log')).replace(',', ',,')}",
            "-serial",
            "chardev:console",
            "-virtfs",
            f"local,path={at('/').replace(',', ',,')},mount_tag=hostroot,security_model=none,"
            "readonly=on,multidevs=remap",
        ]
        return argv

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Kill and reap every guest, remove the lab's temporary files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            guests = list(self._guests)
        for guest in guests:
            guest.kill()
        for guest in guests:
            guest.close()
        if self._device_hosts is not None:
            self._device_hosts.close()  # after the guests: QEMU must not see its device vanish
        if self._spawner is not None:
            self._spawner.shutdown(wait=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        with _LIVE_LOCK:
            _LIVE_LABS.discard(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab guests={len(self._guests)} iommu={self.iommu} closed={self._closed}>"


def run_guests(
    program: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    *,
    n: int = 1,
    timeout: float | None = None,
    echo: IO[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    iommu: bool = False,
    memory: int | str = "256M",
    extra_args: Sequence[str] = (),
    **options: Any,
) -> list[GuestResult]:
    """One-shot: a :class:`Lab` that runs ``n`` guests and is gone afterwards.

    ``options`` are :meth:`Lab.start`'s (``code``, ``server_socket``, ``plain_path`` …).
    """
    with Lab(cache_dir=cache_dir, iommu=iommu, memory=memory, extra_args=extra_args) as lab:
        return lab.run(program, args, n=n, timeout=timeout, echo=echo, **options)

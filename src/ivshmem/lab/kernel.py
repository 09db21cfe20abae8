"""The guest kernel: Debian's ``linux-image-*-amd64``, unpacked once into the lab's cache.

Only what the lab uses is kept (a few MB instead of the package's 400 MB):

``kernels/<version>/``
    ``vmlinuz``       the bzImage as shipped
    ``vmlinux``       its uncompressed ELF, when it has a PVH entry (QEMU then boots it directly)
    ``config``        the kernel's build configuration, to tell built-in from modular features
    ``modules/*.ko``  :data:`WANTED_MODULES` and everything they depend on
    ``kernel.json``   package name, module dependencies (read from each module's ``.modinfo``)
                      and the list of built-in modules
``kernels/current``   the version to boot

Modules come without ``modules.dep`` and the guest has no ``modprobe``: :meth:`Kernel.load_order`
puts them in dependency order for ``insmod``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import debian
from .elf import ElfFormatError, extract_vmlinux, has_pvh_entry, module_info
from .errors import LabSetupError, LabUsageError

__all__ = [
    "BASE_MODULES",
    "IOMMU_MODULES",
    "WANTED_MODULES",
    "Kernel",
    "fetch_kernel",
    "find_kernel",
]

#: Loaded by the initramfs before anything else: the 9p share of the host's root (over
#: virtio-pci) and overlayfs, which makes that read-only share writable in guest RAM.
BASE_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Loaded when the lab runs with an emulated IOMMU, so a guest can bind the device to vfio-pci.
#: vfio's own softdep on vfio_iommu_type1 is not followed by insmod, hence named here.
IOMMU_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci")
#: Kept in the cache and loadable on request (``Lab(modules=...)``): networking for TCP
#: comparisons, vsock, virtio console.
OPTIONAL_MODULES = ("virtio_net", "vmw_vsock_virtio_transport", "virtio_console")
WANTED_MODULES = BASE_MODULES + IOMMU_MODULES + OPTIONAL_MODULES

METAPACKAGE = "linux-image-amd64"
_PACKAGE_PATTERN = r"linux-image-[0-9][0-9A-Za-z.+~-]*-amd64"


def _module_name(text: str) -> str:
    """Kernel module names treat ``-`` and ``_`` alike; use ``_``."""
    return text.strip().replace("-", "_")


@dataclass(frozen=True)
class Kernel:
    """One unpacked guest kernel in the cache."""

    version: str
    directory: Path
    package: str
    #: module name -> names of the modules it depends on
    modules: Mapping[str, tuple[str, ...]] = field(repr=False)
    builtin: frozenset[str] = field(repr=False)

    @property
    def image(self) -> Path:
        """What QEMU's ``-kernel`` gets: the PVH ELF when there is one, else the bzImage."""
        vmlinux = self.directory / "vmlinux"
        return vmlinux if vmlinux.exists() else self.directory / "vmlinuz"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    def module_path(self, name: str) -> Path:
        return self.directory / "modules" / f"{_module_name(name)}.ko"

    def load_order(self, names: Iterable[str]) -> list[str]:
        """``names`` and their dependencies, each once, dependencies first; built-in ones
        (nothing to load) are left out."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, wanted_by: str | None) -> None:
            if name in order or name in self.builtin:
                return
            if name not in self.modules:
                who = f" (needed by {wanted_by})" if wanted_by else ""
                raise LabUsageError(
                    f"kernel module {name}{who} is not in the lab's kernel cache "
                    f"({self.directory}); available: {', '.join(sorted(self.modules))}"
                )
            if name in visiting:
                raise LabSetupError(f"kernel modules depend on each other in a cycle at {name}")
            visiting.add(name)
            for dep in self.modules[name]:
                visit(dep, name)
            visiting.discard(name)
            order.append(name)

        for name in names:
            visit(_module_name(name), None)
        return order

    @classmethod
    def load(cls, directory: Path) -> Kernel:
        try:
            meta = json.loads((directory / "kernel.json").read_text())
            modules = {str(k): tuple(v) for k, v in meta["modules"].items()}
            return cls(
                version=str(meta["version"]),
                directory=directory,
                package=str(meta["package"]),
                modules=modules,
                builtin=frozenset(meta["builtin"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LabSetupError(
                f"the kernel cache {directory} is damaged ({err}): run `ivshmem lab clean` "
                "and `ivshmem lab fetch`"
            ) from err


def find_kernel(cache: Path) -> Kernel | None:
    """The cached kernel to boot, or None if the cache has none."""
    kernels = cache / "kernels"
    try:
        version = (kernels / "current").read_text().strip()
    except OSError:
        return None
    directory = kernels / version
    if not version or not (directory / "kernel.json").exists():
        return None
    return Kernel.load(directory)


def fetch_kernel(cache: Path, progress: debian.Progress, update: bool = False) -> Kernel:
    """Make sure a kernel is cached and return it.

    Without ``update`` any cached kernel will do (no network); with it, the kernel Debian's
    ``linux-image-amd64`` currently depends on is fetched unless it is already cached. The
    caller holds the cache lock.
    """
    if not update:
        found = find_kernel(cache)
        if found is not None:
            return found
    package = debian.metapackage_target(METAPACKAGE, _PACKAGE_PATTERN, progress)
    version = package.removeprefix("linux-image-")
    kernels = cache / "kernels"
    target = kernels / version
    if not (target / "kernel.json").exists():
        kernels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=kernels) as tmp:
            work = Path(tmp)
            deb = debian.download(package, work, progress, size_hint="about 70 MB")
            progress(f"ivshmem lab: unpacking {deb.name}")
            debian.unpack(deb, work / "root")
            deb.unlink()
            staged = work / "kernel"
            _stage(work / "root", staged, package, version)
            if target.exists():
                shutil.rmtree(target)
            # rename is atomic: a kernel directory either is complete or does not exist
            os.rename(staged, target)
        progress(f"ivshmem lab: kernel {version} ready in {target}")
    current = kernels / "current"
    tmp_current = kernels / f".current.{os.getpid()}"
    tmp_current.write_text(version + "\n")
    os.replace(tmp_current, current)
    return Kernel.load(target)


def _stage(root: Path, out: Path, package: str, version: str) -> None:
    """Copy what the lab needs out of the unpacked package ``root`` into ``out``."""
    boot = root / "boot"
    vmlinuz = boot / f"vmlinuz-{version}"
    config = boot / f"config-{version}"
    moddir = root / "lib" / "modules" / version
    if not moddir.is_dir():  # merged-/usr layouts put them under usr/lib
        moddir = root / "usr" / "lib" / "modules" / version
    if not vmlinuz.is_file() or not moddir.is_dir():
        raise LabSetupError(f"{package} does not contain boot/vmlinuz-{version} and its modules")

    # Index every module of the package by name: .modinfo has the name and dependencies.
    index: dict[str, tuple[Path, tuple[str, ...]]] = {}
    for path in moddir.rglob("*.ko"):
        try:
            info = module_info(path.read_bytes())
        except ElfFormatError:
            continue
        fields = dict(info)
        name = _module_name(fields.get("name") or path.stem)
        depends = tuple(_module_name(d) for d in fields.get("depends", "").split(",") if d)
        index[name] = (path, depends)
    builtin: set[str] = set()
    builtin_list = moddir / "modules.builtin"
    if builtin_list.exists():
        for line in builtin_list.read_text().splitlines():
            if line.strip():
                builtin.add(_module_name(Path(line.strip()).name.removesuffix(".ko")))

    keep: dict[str, tuple[str, ...]] = {}

    def visit(name: str) -> None:
        if name in keep or name in builtin:
            return
        if name not in index:
            raise LabSetupError(f"{package} has no kernel module {name}")
        keep[name] = index[name][1]
        for dep in index[name][1]:
            visit(dep)

    for name in WANTED_MODULES:
        visit(name)

    (out / "modules").mkdir(parents=True)
    for name in keep:
        shutil.copyfile(index[name][0], out / "modules" / f"{name}.ko")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    if config.exists():
        shutil.copyfile(config, out / "config")
    try:
        vmlinux = extract_vmlinux(vmlinuz.read_bytes())
    except ElfFormatError:
        vmlinux = None
    if vmlinux is not None and has_pvh_entry(vmlinux):
        (out / "vmlinux").write_bytes(vmlinux)
    meta = {
        "version": version,
        "package": package,
        "modules": {name: list(deps) for name, deps in sorted(keep.items())},
        "builtin": sorted(builtin),
    }
    (out / "kernel.json").write_text(json.dumps(meta, indent=1) + "\n")

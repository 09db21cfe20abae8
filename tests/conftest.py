"""Shared fixtures.

Tests that need something outside Python (QEMU, a guest kernel) ask for it through
:func:`require`: on a user's machine without it they skip with the reason; when ``CI`` is set
they fail instead, because CI must run every test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(condition: object, reason: str) -> None:
    """Skip (or, in CI, fail) the current test when ``condition`` is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def qemu_path() -> str | None:
    return shutil.which("qemu-system-x86_64")


@pytest.fixture
def qemu_binary() -> str:
    """Path of qemu-system-x86_64 (Debian's qemu-system-x86; scripts/setup.sh installs it)."""
    path = qemu_path()
    require(
        path,
        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86, "
        "or run scripts/test.sh as root)",
    )
    assert path is not None
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under 108 bytes, and pytest's
    tmp_path can be longer. Removed afterwards with everything in it."""
    path = Path(tempfile.mkdtemp(prefix="ivt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """pytest removes the temporary directories of passing tests (the retention policy in
    pyproject.toml) but leaves their parent, /tmp/pytest-of-USER, behind even when empty:
    remove that too, so a passing run leaves nothing in /tmp."""
    factory = getattr(config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)
    if base is None:
        return
    for directory in (base, base.parent):  # each only if empty (a failed test's is kept)
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue  # pytest removed it already
        except OSError:
            break


_qemu11_prepared: list[object] = []  # [argv list] or [Qemu11Unavailable], once per session


def _prepare_qemu11() -> object:
    if not _qemu11_prepared:
        from ivshmem.lab import qemu11 as q11

        try:
            _qemu11_prepared.append(q11.prepare().argv())
        except q11.Qemu11Unavailable as err:
            _qemu11_prepared.append(err)
    return _qemu11_prepared[0]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Build the QEMU 11 root (a minute or two, once per machine) before any test runs, so
    the first test that needs it is not charged for the build by its timeout."""
    if any("qemu11" in getattr(item, "fixturenames", ()) for item in items):
        _prepare_qemu11()


@pytest.fixture(scope="session")
def qemu11() -> list[str]:
    """The argv prefix of a QEMU >= 10.1 (vfio-user-pci, -accel qtest): PATH's, or Debian
    trixie's built once into the lab cache (needs root and the Debian mirror)."""
    prepared = _prepare_qemu11()
    if not isinstance(prepared, list):
        require(False, f"no QEMU >= 10.1: {prepared}")
        raise AssertionError("unreachable: require() skipped or failed")
    return [str(word) for word in prepared]

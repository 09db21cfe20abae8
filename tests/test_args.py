"""The argument rule of the public API (ivshmem._args), as a property.

Every public call is fed odd values (bools, floats, NaN, infinities, huge and negative ints,
strings, None, bytes) in one argument at a time, the others valid; the only outcomes allowed
are success or the errors the call documents (UsageError and its subclasses; for connect and
open_pci also what the environment can answer). A raw TypeError, ValueError, OSError,
OverflowError or AttributeError fails the test. The ring's two cores (C and Python) must give
the same outcome, error message included, for every value.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require
from fakesysfs import FakeSysfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringtwins import PyReceiver as _PyReceiver
from ringtwins import PySender as _PySender
from serverproc import ServerProcess

import ivshmem
import ivshmem.pci
from ivshmem._args import flag_arg, int_arg, peer_arg, seconds_arg, timeout_arg
from ivshmem.channel import Receiver, Sender, UnexpectedMessageError, format_region
from ivshmem.channel import ring as ringmod
from ivshmem.channel.ring import RingReceiver, RingSender, init_area
from ivshmem.endpoint import Endpoint, EventfdEndpoint
from ivshmem.errors import DeviceError, UsageError
from ivshmem.memory import MAX_SIZE
from ivshmem.pci import PciEndpoint
from ivshmem.peer import HandshakeTimeoutError, Peer, ServerUnavailableError

pytestmark = pytest.mark.timeout(300)

#: Odd values of every kind a caller can pass by mistake (and some valid ones among them: an
#: odd value that is valid must simply work).
ODD = st.one_of(
    st.booleans(),
    st.none(),
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            1.0,
            0.5,
            -0.0,
            -1.0,
            1e300,
            -1,
            0,
            1,
            2,
            2**31,
            2**63,
            2**64,
            2**70,
            -(2**63),
            "",
            "1",
            "x",
            "\0",
            b"",
            b"1",
            [],
            (1,),
            object(),
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=4),
    st.binary(max_size=4),
)

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def outcome(call: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> Any:
    """What ``call`` did: ("ok", result) or ("refused", error type, message). Any error not
    in ``allowed`` propagates and fails the test."""
    try:
        return ("ok", call())
    except allowed as err:
        return ("refused", type(err).__name__, str(err))


def _valid_timeout(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value < math.inf


def _valid_flag(value: Any) -> bool:
    return value is True or value is False


def check_rule(call: str, value: Any, result: Any) -> None:
    """A timeout or a flag outside the rule is refused even when the call would not need it
    (a message already there, no wait): never accepted silently."""
    if "(timeout)" in call and not _valid_timeout(value):
        assert result[0] == "refused", f"{call} accepted timeout={value!r}"
    if "(flush)" in call and not _valid_flag(value):
        assert result[0] == "refused", f"{call} accepted flush={value!r}"
    if "(spin)" in call and not (value is None or _valid_timeout(value)):
        assert result[0] == "refused", f"{call} accepted spin={value!r}"


# -- the rule itself --------------------------------------------------------------------------


def test_the_rule() -> None:
    assert int_arg(7, "n") == 7
    for bad in (True, 1.0, "1", None, b"1"):
        with pytest.raises(UsageError, match="n must be an int"):
            int_arg(bad, "n")
    with pytest.raises(UsageError, match=r"peer id 65536 is outside 0\.\.65535"):
        peer_arg(65536)
    assert seconds_arg(0, "t") == 0.0 and seconds_arg(2**2000, "t") == math.inf
    for bad in (-1, math.nan, True, "1", None):
        with pytest.raises(UsageError, match="t must be a number of seconds >= 0"):
            seconds_arg(bad, "t")
    with pytest.raises(UsageError, match="finite"):
        seconds_arg(math.inf, "spin", finite=True)
    assert timeout_arg(None) is None and timeout_arg(2.5) == 2.5
    with pytest.raises(UsageError, match="timeout must be a finite number of seconds, not inf"):
        timeout_arg(math.inf)
    assert flag_arg(False, "flush") is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(UsageError, match="flush must be True or False"):
            flag_arg(bad, "flush")


# -- fixtures shared by the examples ----------------------------------------------------------


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("args")


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with ServerProcess(module_tmp, size="64K", vectors=2) as proc:
        yield proc


@pytest.fixture(scope="module")
def region_path(module_tmp: Path) -> str:
    path = str(module_tmp / "region")
    with ivshmem.open_region(path, size="64K"):
        pass
    return path


@pytest.fixture(scope="module")
def fake_sys(module_tmp: Path) -> FakeSysfs:
    fake = FakeSysfs(module_tmp / "sys")
    fake.add_device("0000:00:04.0", ivposition=3)
    return fake


@pytest.fixture(scope="module")
def endpoints(
    server: ServerProcess, region_path: str, fake_sys: FakeSysfs
) -> Iterator[dict[str, Endpoint]]:
    peer = ivshmem.connect(server.socket_path, vectors=2)
    other = ivshmem.connect(server.socket_path, vectors=2)
    region = ivshmem.open_region(region_path, id=1)
    pci = ivshmem.open_pci(interrupts=False, sysfs_root=str(fake_sys.root))
    try:
        yield {"peer": peer, "region": region, "pci": pci}
    finally:
        for ep in (peer, other, region, pci):
            ep.close()


# -- connect, open_region, open_pci -----------------------------------------------------------


@PROPERTY
@given(param=st.sampled_from(["socket_path", "timeout", "vectors", "reconnect"]), value=ODD)
def test_connect_arguments(server: ServerProcess, param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"timeout": 0.3, "vectors": 2, "reconnect": False}
    path: Any = server.socket_path
    if param == "socket_path":
        path = value
    else:
        kwargs[param] = value
    result = outcome(
        lambda: ivshmem.connect(path, **kwargs),
        (UsageError, ServerUnavailableError, HandshakeTimeoutError),
    )
    if result[0] == "ok":
        result[1].close()
    async_result = outcome(
        lambda: asyncio.run(ivshmem.connect_async(path, **kwargs)),
        (UsageError, ServerUnavailableError, HandshakeTimeoutError),
    )
    if async_result[0] == "ok":
        async_result[1].close()
    if result[0] == "refused" and result[1] == "UsageError":
        assert async_result[:2] == result[:2]  # the same rule for both


def _not_a_big_valid_size(value: Any) -> bool:
    # A valid size above the file's would grow it (to up to MAX_SIZE): not an argument test.
    big = isinstance(value, int) and not isinstance(value, bool) and 65536 < value <= MAX_SIZE
    return not big


@PROPERTY
@given(
    param=st.sampled_from(["source", "id", "size"]),
    value=ODD.filter(_not_a_big_valid_size),
)
def test_open_region_arguments(region_path: str, module_tmp: Path, param: str, value: Any) -> None:
    args: dict[str, Any] = {"source": region_path, "id": 0, "size": None, param: value}
    empty = module_tmp / "empty-cwd"
    empty.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(empty)  # a str source is a path: relative ones must find nothing
    try:
        result = outcome(lambda: ivshmem.open_region(**args), (UsageError,))
    finally:
        os.chdir(cwd)
    if result[0] == "ok":
        result[1].close()
    assert not any(empty.iterdir()), "a bad argument created a file"


@PROPERTY
@given(
    param=st.sampled_from(
        ["device", "interrupts", "bind_vfio", "write_combining", "vectors", "id", "sysfs_root"]
    ),
    value=ODD,
)
def test_open_pci_arguments(fake_sys: FakeSysfs, param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"interrupts": False, "sysfs_root": str(fake_sys.root)}
    kwargs[param] = value
    result = outcome(lambda: ivshmem.open_pci(**kwargs), (UsageError, DeviceError))
    if result[0] == "ok":
        result[1].close()


PCI_CALLS: dict[str, Callable[[FakeSysfs, Any], Any]] = {
    "find_devices": lambda fake, v: ivshmem.pci.find_devices(v),
    "normalize_address": lambda fake, v: ivshmem.pci.normalize_address(v),
    "select_device": lambda fake, v: ivshmem.pci.select_device(
        ivshmem.pci.find_devices(str(fake.root)), v, str(fake.root)
    ),
    "read_ivposition": lambda fake, v: ivshmem.pci.read_ivposition(v),
    "bind_vfio_pci": lambda fake, v: ivshmem.pci.bind_vfio_pci(v),
    "unbind_vfio_pci": lambda fake, v: ivshmem.pci.unbind_vfio_pci(v),
    "parse_size": lambda fake, v: ivshmem.parse_size(v),
}


@PROPERTY
@given(call=st.sampled_from(sorted(PCI_CALLS)), value=ODD)
def test_pci_helper_arguments(fake_sys: FakeSysfs, call: str, value: Any) -> None:
    outcome(lambda: PCI_CALLS[call](fake_sys, value), (UsageError, DeviceError))


# -- the endpoint contract --------------------------------------------------------------------


def _ring_own(ep: Endpoint) -> None:
    """Make every own vector pending, so that no valid wait blocks."""
    for v in range(ep.vectors):
        ep.notify(ep.id, v)


def _drain(ep: Endpoint) -> None:
    if ep.vectors:
        while ep.wait(timeout=0) is not None:
            pass


ENDPOINT_CALLS: dict[str, Callable[[Endpoint, Any], Any]] = {
    "notify(peer)": lambda ep, v: ep.notify(v),
    "notify(vector)": lambda ep, v: ep.notify(ep.id, v),
    "wait(vector)": lambda ep, v: ep.wait(v, 0),
    "wait(timeout)": lambda ep, v: ep.wait(None, v),
    "wait(spin)": lambda ep, v: ep.wait(None, 0, spin=v),
    "wait_async(vector)": lambda ep, v: asyncio.run(ep.wait_async(v, 0)),
    "wait_async(timeout)": lambda ep, v: asyncio.run(ep.wait_async(None, v)),
    "fileno": lambda ep, v: ep.fileno(v),
    "numpy(dtype)": lambda ep, v: ep.numpy(dtype=v),
    "numpy(offset)": lambda ep, v: ep.numpy(offset=v),
    "numpy(count)": lambda ep, v: ep.numpy(count=v),
    "vectors_of": lambda ep, v: ep.vectors_of(v) if isinstance(ep, Peer) else None,
}


@PROPERTY
@given(
    which=st.sampled_from(["peer", "region", "pci"]),
    call=st.sampled_from(sorted(ENDPOINT_CALLS)),
    value=ODD,
)
def test_endpoint_arguments(
    endpoints: dict[str, Endpoint], which: str, call: str, value: Any
) -> None:
    ep = endpoints[which]
    _ring_own(ep)
    try:
        result = outcome(lambda: ENDPOINT_CALLS[call](ep, value), (UsageError,))
    finally:
        _drain(ep)
    check_rule(call, value, result)
    assert not ep.closed


@pytest.mark.parametrize("which", ["peer", "pci"])
def test_examples_from_the_issue(endpoints: dict[str, Endpoint], which: str) -> None:
    ep = endpoints[which]
    other = 1 if which == "pci" else min(ep.peers)
    odd: Any = "x"
    calls: list[Callable[[], object]] = [
        lambda: ep.notify(other, 1.0),  # type: ignore[arg-type]
        lambda: ep.notify(True),
        lambda: ep.wait(timeout=math.nan),
        lambda: ep.wait(timeout=-1),
        lambda: ep.wait(spin=odd),
        lambda: ep.fileno(1.0),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()
    if isinstance(ep, PciEndpoint):
        with pytest.raises(UsageError, match="a peers source is a callable"):
            ep.set_peers_source(odd)
    with pytest.raises(UsageError, match="fd -1"):
        ivshmem.open_region(-1)
    with pytest.raises(UsageError):
        ivshmem.open_region(True)


# -- channels ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(module_tmp: Path) -> Iterator[tuple[Sender, Receiver]]:
    path = str(module_tmp / "channels")
    with ivshmem.open_region(path, id=1, size="1M") as a, ivshmem.open_region(path, id=2) as b:
        format_region(a, max_peers=4, peers=[1, 2])
        with (
            Receiver(b, "args", sender=1, capacity=4096) as rx,
            Sender(a, "args", receiver=2, spin=0) as tx,
        ):
            yield tx, rx


def _reset(tx: Sender, rx: Receiver) -> None:
    with contextlib.suppress(UsageError):
        tx.cancel()
    tx.flush()
    rx.release()
    while True:
        try:
            if rx.try_recv() is None:
                break
        except UnexpectedMessageError:  # an array left by send_array
            rx.try_recv_view(ringmod.KIND_ARRAY)
            rx.release()
    rx.release()


def _array_then_recv(tx: Sender, rx: Receiver, timeout: Any) -> Any:
    tx.send_array(np.arange(3))
    return rx.recv_array(timeout)


CHANNEL_CALLS: dict[str, Callable[[Sender, Receiver, Any], Any]] = {
    "send(data)": lambda tx, rx, v: tx.send(v),
    "send(timeout)": lambda tx, rx, v: tx.send(b"x", v),
    "send(flush)": lambda tx, rx, v: tx.send(b"x", flush=v),
    "try_send(data)": lambda tx, rx, v: tx.try_send(v),
    "try_send(flush)": lambda tx, rx, v: tx.try_send(b"x", v),
    "send_many(messages)": lambda tx, rx, v: tx.send_many(v),
    "send_many(timeout)": lambda tx, rx, v: tx.send_many([b"x"], v),
    "try_send_many(messages)": lambda tx, rx, v: tx.try_send_many(v),
    "try_send_many(start)": lambda tx, rx, v: tx.try_send_many([b"a", b"b"], v),
    "reserve(n)": lambda tx, rx, v: tx.reserve(v),
    "reserve(timeout)": lambda tx, rx, v: tx.reserve(8, v),
    "try_reserve(n)": lambda tx, rx, v: tx.try_reserve(v),
    "try_reserve(kind)": lambda tx, rx, v: tx.try_reserve(8, v),
    "commit(n)": lambda tx, rx, v: (tx.reserve(8), tx.commit(v)),
    "commit(flush)": lambda tx, rx, v: (tx.reserve(8), tx.commit(None, flush=v)),
    "recv(timeout)": lambda tx, rx, v: (tx.send(b"m"), rx.recv(v)),
    "recv_view(timeout)": lambda tx, rx, v: (tx.send(b"m"), rx.recv_view(v)),
    "recv_many(max_messages)": lambda tx, rx, v: (tx.send(b"m"), rx.recv_many(v)),
    "recv_many(timeout)": lambda tx, rx, v: (tx.send(b"m"), rx.recv_many(1, v)),
    "try_recv_view(kind)": lambda tx, rx, v: rx.try_recv_view(v),
    "recv_async(timeout)": lambda tx, rx, v: (tx.send(b"m"), asyncio.run(rx.recv_async(v))),
    "recv_many_async(timeout)": lambda tx, rx, v: (
        tx.send(b"m"),
        asyncio.run(rx.recv_many_async(1, v)),
    ),
    "send_async(timeout)": lambda tx, rx, v: asyncio.run(tx.send_async(b"x", v)),
    "send_many_async(timeout)": lambda tx, rx, v: asyncio.run(tx.send_many_async([b"x"], v)),
    "reserve_async(timeout)": lambda tx, rx, v: asyncio.run(tx.reserve_async(8, v)),
    "send_array(timeout)": lambda tx, rx, v: tx.send_array(np.arange(3), v),
    "recv_array(timeout)": lambda tx, rx, v: _array_then_recv(tx, rx, v),
    "take_many(max_messages)": lambda tx, rx, v: (tx.send(b"m"), rx.take_many(v)),
}


@PROPERTY
@given(call=st.sampled_from(sorted(CHANNEL_CALLS)), value=ODD)
def test_channel_arguments(channel: tuple[Sender, Receiver], call: str, value: Any) -> None:
    tx, rx = channel
    _reset(tx, rx)
    try:
        result = outcome(lambda: CHANNEL_CALLS[call](tx, rx, value), (UsageError,))
    finally:
        _reset(tx, rx)
    check_rule(call, value, result)


# -- the ring's two cores ---------------------------------------------------------------------


RING_CALLS: dict[str, Callable[[RingSender, RingReceiver, Any], Any]] = {
    "try_send(data)": lambda tx, rx, v: tx.try_send(v),
    "try_send(flush)": lambda tx, rx, v: tx.try_send(b"x", v),
    "try_send_many(messages)": lambda tx, rx, v: tx.try_send_many(v),
    "try_send_many(start)": lambda tx, rx, v: tx.try_send_many([b"a", b"b"], v),
    "try_reserve(n)": lambda tx, rx, v: tx.try_reserve(v) is not None,
    "try_reserve(kind)": lambda tx, rx, v: tx.try_reserve(8, v) is not None,
    "commit(n)": lambda tx, rx, v: (tx.try_reserve(8) is not None, tx.commit(v)),
    "commit(flush)": lambda tx, rx, v: (tx.try_reserve(8) is not None, tx.commit(None, flush=v)),
    "take_many(max_messages)": lambda tx, rx, v: (tx.try_send(b"m"), rx.take_many(v)),
    "try_recv_view(kind)": lambda tx, rx, v: (
        tx.try_send(b"m"),
        None if (view := rx.try_recv_view(v)) is None else bytes(view),
    ),
}


def _ring(python: bool) -> tuple[mmap.mmap, RingSender, RingReceiver]:
    mm = mmap.mmap(-1, 4096 + ringmod.CTRL_SIZE)
    area = memoryview(mm)
    init_area(area)
    tx = (_PySender if python else RingSender)(area, "core")
    rx = (_PyReceiver if python else RingReceiver)(area, "core")
    return mm, tx, rx


def _need_c_core() -> None:
    if os.environ.get("IVSHMEM_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("the C core is switched off here (IVSHMEM_PURE_PYTHON)")
    require(
        ringmod.ACCELERATED,
        "the ring's C core did not build (pip install needs gcc and the Python headers)",
    )


def _ring_outcome(
    python: bool, call: Callable[[RingSender, RingReceiver, Any], Any], value: Any
) -> tuple[Any, ...]:
    """The outcome of ``call`` on a fresh ring of one core, with the bytes it left."""
    mm, tx, rx = _ring(python)
    try:
        # A kind that is valid but not the next record's is that documented error.
        result = outcome(lambda: call(tx, rx, value), (UsageError, UnexpectedMessageError))
        return (result, bytes(mm), tx._head, rx._tail)
    finally:
        rx.release()
        with contextlib.suppress(UsageError):
            tx.cancel()


@PROPERTY
@given(call=st.sampled_from(sorted(RING_CALLS)), value=ODD)
def test_both_ring_cores_apply_one_rule(call: str, value: Any) -> None:
    _need_c_core()
    seen = [_ring_outcome(python, RING_CALLS[call], value) for python in (False, True)]
    assert seen[0] == seen[1], f"C core: {seen[0][0]}; Python core: {seen[1][0]}"
    check_rule(call, value, seen[0][0])


@pytest.mark.parametrize(
    "call",
    [
        lambda tx: (tx.try_reserve(8), tx.commit(True)),
        lambda tx: tx.try_send_many([b"a"], 1.5),
        lambda tx: tx.try_send_many([b"a"], 2**70),
        lambda tx: tx.try_reserve(True),
        lambda tx: tx.try_send(b"a", "yes"),
    ],
)
@pytest.mark.parametrize("python", [False, True])
def test_ring_examples_from_the_issue_are_refused_by_both_cores(
    call: Callable[[RingSender], Any], python: bool
) -> None:
    if not python:
        _need_c_core()
    mm, tx, rx = _ring(python)
    with pytest.raises(UsageError):
        call(tx)
    with contextlib.suppress(UsageError):
        tx.cancel()
    del tx, rx
    mm.close()


@pytest.mark.parametrize("timeout", [1e300, 8.148130347374306e306, sys.float_info.max])
def test_a_huge_finite_timeout_is_a_long_wait_not_an_overflow(
    server: ServerProcess, timeout: float
) -> None:
    # poll() takes whole milliseconds: timeout x 1000 overflows to infinity first, and int()
    # of that raised OverflowError (found by test_connect_arguments above).
    peer = ivshmem.connect(server.socket_path, vectors=2, timeout=timeout)
    try:
        peer.notify(peer.id, 1)  # a ring already there: the waits below return at once
        assert peer.wait(1, timeout=timeout, spin=0) == 1
        peer.notify(peer.id, 0)
        assert EventfdEndpoint.wait(peer, 0, timeout=timeout, spin=0) == 0
    finally:
        peer.close()

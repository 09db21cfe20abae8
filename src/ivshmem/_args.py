"""The one argument rule of the public API.

Every public call checks its arguments with these helpers before it touches a socket, an fd or
shared memory, so that a wrong argument is always :class:`~ivshmem.errors.UsageError` (or one
of its documented subclasses) naming the argument and the value, never a raw TypeError,
ValueError, OSError or AttributeError from deep inside, and never silently accepted:

* **Integers** (peer ids, vectors, counts, sizes, indexes): an ``int`` or an integer type with
  ``__index__`` (numpy's). Bools are refused (``notify(peer=True)`` is a mistake, not peer 1),
  and so are floats, even integral ones (``notify(peer, 1.0)``): a float where a count or an id
  belongs is a bug to report, not a number to round. Out of range is refused too.
* **Seconds** (timeouts, spin budgets, intervals): a real number (``int``, ``float``,
  ``fractions``...), not a bool, not NaN, never negative, and finite where it bounds a wait
  (``timeout=None`` is "no limit").
* **Flags** (``flush``, ``reconnect``, ``interrupts``...): ``True`` or ``False`` only.

The C ring core takes only exact ``int`` and ``bool`` values itself and hands anything else to
its Python twin in ``ring.py``, which applies these helpers: both cores answer the same.
"""

from __future__ import annotations

import math
import numbers
import operator

from .errors import UsageError

__all__ = [
    "MAX_PEER_ID",
    "flag_arg",
    "int_arg",
    "peer_arg",
    "range_arg",
    "seconds_arg",
    "show",
    "timeout_arg",
]

#: Peer ids are 16 bits (the doorbell register's upper half).
MAX_PEER_ID = 0xFFFF


def show(value: object) -> str:
    """A short repr of a caller's argument for an error message."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


def int_arg(value: object, what: str) -> int:
    """``value`` as an int, for an argument that must be one. Ints and integer types with
    ``__index__`` (numpy's) pass; bools, floats, strings and the rest are refused, since a
    float or a bool where a count or an id belongs is a mistake, not a number to round."""
    if type(value) is int:
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise UsageError(f"{what} must be an int, not {type(value).__name__} ({show(value)})")


def range_arg(value: object, what: str, low: int, high: int) -> int:
    """``value`` as an int within ``low..high``; UsageError otherwise."""
    v = int_arg(value, what)
    if not low <= v <= high:
        raise UsageError(f"{what} {v} is outside {low}..{high}")
    return v


def peer_arg(value: object, what: str = "peer id") -> int:
    """``value`` as a peer id, an int within 0..65535; UsageError otherwise."""
    return range_arg(value, what, 0, MAX_PEER_ID)


def seconds_arg(value: object, what: str, *, finite: bool = False) -> float:
    """``value`` as a duration in seconds: a real number >= 0 (not a bool, not NaN; not
    ``inf`` either when ``finite``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except (OverflowError, ValueError):  # an int beyond a float's range
            seconds = math.inf
        if seconds >= 0:  # False for NaN too
            if finite and seconds == math.inf:
                raise UsageError(f"{what} must be a finite number of seconds, not {show(value)}")
            return seconds
    raise UsageError(f"{what} must be a number of seconds >= 0, not {show(value)}")


def timeout_arg(value: object, what: str = "timeout") -> float | None:
    """A timeout: None for no limit, else a finite number of seconds >= 0 (``inf`` is refused,
    as the channels and Python's own timeouts refuse it: None says "no limit")."""
    if value is None:
        return None
    return seconds_arg(value, what, finite=True)


def flag_arg(value: object, what: str) -> bool:
    """``value`` as a flag: True or False only (a string or a number is a mistake)."""
    if value is True or value is False:
        return value
    raise UsageError(f"{what} must be True or False, not {type(value).__name__} ({show(value)})")

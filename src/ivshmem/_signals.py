"""Turning SIGTERM and SIGHUP into :class:`SystemExit`, so that cleanup runs.

Their default action ends the process at once: no ``finally``, no ``with`` exit, no atexit
hook. Commands that leave things behind otherwise (lab guests and job directories, the demo's
server and temporary directory) install :func:`exit_on_termination` so that ``kill PID``,
systemd's stop and a closed terminal unwind the stack like Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["exit_on_termination"]

SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # Cleanup is about to run: a second SIGTERM (a supervisor repeating itself, a group kill
    # after a direct one) must not abort it halfway. SIGKILL stays the way to stop it hard.
    for other in SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def exit_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``SystemExit(128 + signum)`` (the status a
    shell reports for death by that signal); the previous handlers come back afterwards.

    Signal handlers belong to the main thread: from any other thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, _Handler] = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, _raise_exit)
        yield
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler if handler is not None else signal.SIG_DFL)

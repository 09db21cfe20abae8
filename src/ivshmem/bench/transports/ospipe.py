"""``os.pipe``: raw bytes through two kernel pipes (one per direction), no framing needed
because every message has the same size."""

from __future__ import annotations

import fcntl
import os

from ..harness import Link, Stamp, Transport

__all__ = ["OsPipe"]


def _pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


class _PipeLink(Link):
    def __init__(self, rfd: int | None, wfd: int | None, stamp: Stamp) -> None:
        self._rfd = rfd
        self._wfd = wfd
        self._stamp = stamp
        self._size = stamp.size
        self._out = stamp.template()
        self._outview = memoryview(self._out)
        self._in = bytearray(stamp.size)
        self._inview = memoryview(self._in)

    def send(self, seq: int) -> None:
        assert self._wfd is not None
        self._stamp.stamp(self._out, seq)
        done = os.write(self._wfd, self._out)
        while done < self._size:  # only if a signal interrupted a large write
            done += os.write(self._wfd, self._outview[done:])

    def recv(self) -> int:
        assert self._rfd is not None
        n = self._size
        if n <= 65536:
            data = os.read(self._rfd, n)
            if len(data) == n:
                return self._stamp.check(data)
            # A write larger than PIPE_BUF (4 KiB) may arrive in pieces: gather the rest.
            got = len(data)
            if got == 0:
                raise EOFError("the other side closed the pipe")
            self._in[:got] = data
        else:
            got = 0
        view = self._inview
        while got < n:
            k = os.readv(self._rfd, [view[got:]])
            if k == 0:
                raise EOFError("the other side closed the pipe")
            got += k
        return self._stamp.check(self._in)


class OsPipe(Transport):
    key = "pipe"
    label = "os.pipe"
    notes = (
        "one pipe per direction, capacity raised with F_SETPIPE_SZ towards the common queue "
        "budget (at most /proc/sys/fs/pipe-max-size); os.write / os.read (readv into a reused "
        "buffer for large messages)"
    )

    def prepare(self) -> None:
        self._fds: list[int] = []
        self._fwd = self._make()
        self._back = self._make() if self.kind == "rtt" else None

    def _make(self) -> tuple[int, int]:
        r, w = os.pipe()
        self._fds += [r, w]
        want = min(self.depth * self.payload, _pipe_max())
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
        except OSError:
            pass  # keep the default 64 KiB
        return r, w

    def open(self, side: int) -> _PipeLink:
        back = self._back
        if side == 0:
            return _PipeLink(back[0] if back else None, self._fwd[1], self.stamp)
        return _PipeLink(self._fwd[0], back[1] if back else None, self.stamp)

    def cleanup(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

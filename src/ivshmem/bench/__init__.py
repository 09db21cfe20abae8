"""Messaging benchmarks: this project's channels against the Python IPC field.

One run (:func:`run_suite`) measures, with a producer and a consumer process each, stream
throughput and round-trip latency for 64 B, 4 KiB and 1 MiB messages over this project's
channels (spinning and blocking), ``os.pipe``, ``multiprocessing`` Pipe and Queue,
``faster-fifo``, ``pyzmq`` over ``ipc://`` and ``iceoryx2``, next to the physical references
(memcpy, an eventfd ping-pong, a spin ping-pong on one shared byte). :mod:`.report` turns the
results into same-run ratios, target verdicts, Markdown and PNG charts.

Modules: ``harness`` (processes, the measurement loops, message checks), ``transports/`` (one
module per transport), ``suite`` (what one run measures), ``report``. The command is
``ivshmem bench`` (``ivshmem.cli.bench``).
"""

from .harness import BenchError, Link, MessageCheckError, Plan, SuiteContext, Transport, measure
from .report import evaluate_targets, render_markdown, write_charts, write_json
from .suite import SERIES, SuiteConfig, run_suite

__all__ = [
    "SERIES",
    "BenchError",
    "Link",
    "MessageCheckError",
    "Plan",
    "SuiteConfig",
    "SuiteContext",
    "Transport",
    "evaluate_targets",
    "measure",
    "render_markdown",
    "run_suite",
    "write_charts",
    "write_json",
]

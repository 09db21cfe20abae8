"""Run the messaging benchmarks from a source checkout: ``python benchmarks/ipc/run.py [...]``.

Same options as ``ivshmem bench`` (``--help``). The code lives in the package so that an
installed ``ivshmem`` can run it too:

* ``src/ivshmem/bench/harness.py``    processes, the two measurement loops, message checks
* ``src/ivshmem/bench/transports/``   one module per transport (channel, ospipe, mp_pipe,
                                      mp_queue, fifo, zmq_ipc, iceoryx, references)
* ``src/ivshmem/bench/suite.py``      what one run measures (series, repetitions)
* ``src/ivshmem/bench/report.py``     same-run ratios, target verdicts, Markdown, charts
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Prefer the checkout's package over an installed one.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
    from ivshmem.cli.bench import main

    sys.exit(main(sys.argv[1:]))

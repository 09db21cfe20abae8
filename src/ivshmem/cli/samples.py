"""``ivshmem sample pingpong|bandwidth|counter``: the sample programs of :mod:`ivshmem.samples`.

Each is also runnable as ``python -m ivshmem.samples.NAME`` (the form a lab guest uses), with
the same options.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..samples import bandwidth, counter, pingpong
from ..samples._common import report_errors

_SAMPLES = (pingpong, bandwidth, counter)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample programs: ping-pong latency, bandwidth, shared counter",
        description="Sample programs that run unchanged between host peers (--endpoint host), "
        "inside VM-lab guests (--endpoint pci), mixed, or on a plain shared file (--endpoint "
        "plain). Start the server with --format so that peers find each other in the region's "
        "membership table.",
    )
    sub = parser.add_subparsers(dest="sample", metavar="SAMPLE", required=True)
    for module in _SAMPLES:
        doc = (module.__doc__ or module.HELP).strip()
        sample = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=doc.split("\n\n")[0],
            epilog=f"Also: python -m ivshmem.samples.{module.NAME} (same options).",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(sample)
        sample.set_defaults(func=report_errors(f"ivshmem sample {module.NAME}", module.run))

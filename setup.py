"""Only the optional C extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The channel ring's hot paths in C. optional: a failed build (no compiler, no Python
        # headers) leaves the pure-Python ring, which behaves the same, only slower.
        Extension(
            "ivshmem.channel._ringcore",
            ["src/ivshmem/channel/_ringcore.c"],
            optional=True,
        ),
        # The server's fan-out (one call sends a join's or a leave's messages); optional
        # too: without it queues.py sends each message from Python, the same way.
        Extension(
            "ivshmem.server._fanout",
            ["src/ivshmem/server/_fanout.c"],
            optional=True,
        ),
        # The doorbell's non-blocking read (one preadv2 call); optional: without it
        # ivshmem._eventfd makes the same call through os.preadv, a little slower.
        Extension(
            "ivshmem._eventfdcore",
            ["src/ivshmem/_eventfdcore.c"],
            optional=True,
        ),
    ]
)

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
        )
    ]
)

"""One module per transport; each defines :class:`~ivshmem.bench.harness.Transport`
subclasses. Third-party libraries are imported only inside the child processes (and in
``prepare``), so a missing one makes its series "unavailable", never the whole run fail."""

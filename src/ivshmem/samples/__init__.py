"""Sample programs, in the spirit of the original ivshmem project's: ping-pong latency, bulk
bandwidth and a shared counter.

Each runs unchanged between host processes on an ivshmem server (``--endpoint host``),
inside VM-lab guests through the PCI device (``--endpoint pci``), mixed host and guest, or on a
plain shared file (``--endpoint plain``)::

    ivshmem sample pingpong pong            # or: python -m ivshmem.samples.pingpong pong
    ivshmem sample pingpong ping
    ivshmem sample bandwidth recv
    ivshmem sample bandwidth send --size 1M
    ivshmem sample counter --peers 3        # in three processes, guests or both

They are written against :class:`ivshmem.Endpoint` and :mod:`ivshmem.channel` only (see
``_common.py`` for the one place that opens an endpoint), so they double as examples.
"""

__all__ = ["bandwidth", "counter", "pingpong"]

# The server's fan-out in C (_fanout.c); queues.py falls back to its Python loop without it.
from typing import Any

PARTIAL: int

def send(
    sends: list[Any], socks: dict[int, list[int]]
) -> tuple[int, list[int], list[tuple[int, int]]]: ...

#!/usr/bin/env bash
# Run the whole test suite (sets up .venv and system packages first). Extra arguments go to
# pytest, e.g. scripts/test.sh -k protocol -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check --quiet src tests benchmarks
.venv/bin/mypy     # strict, over src, tests and benchmarks (pyproject.toml)
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
# The channel ring runs its hot paths in C when the extension built (it did, or the run above
# failed in CI), and so do the server's fan-out and the doorbell's read. Their pure-Python
# twins must stay correct too: run the channel, server and doorbell tests again with the C
# cores switched off.
echo "test.sh: the channel and server tests again, pure Python (IVSHMEM_PURE_PYTHON=1)" >&2
export IVSHMEM_PURE_PYTHON=1
# (tests/test_server_fanout.py runs its Python half in the first pass already, beside the C
# half it compares it with; here its C half could only skip.)
exec .venv/bin/python -m pytest -q tests/test_channel.py tests/test_channel_leave.py \
    tests/test_channel_hostile.py tests/test_channel_fuzz.py tests/test_layout.py \
    tests/test_channel_restart.py tests/test_channel_max_message.py tests/test_channel_crash.py \
    tests/test_ring_window.py tests/test_server.py tests/test_server_storm.py \
    tests/test_regionguard.py tests/test_doorbell_nonblock.py

#!/usr/bin/env bash
# Regenerate the benchmark documentation with one full run of the messaging benchmarks:
# docs/benchmarks.md, docs/bench/results.json and the PNG charts in docs/bench/.
# Takes about three minutes; extra arguments go to `ivshmem bench` (e.g. --quick, --pin never).
# Installs the `bench` extra (pyzmq, faster-fifo, iceoryx2, matplotlib, numpy) into .venv first
# if it is missing, so every transport is measured.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=.venv/bin/python
if [ ! -x "$py" ]; then
    echo "bench-docs: no .venv here; run scripts/setup.sh first" >&2
    exit 2
fi
if ! "$py" -c 'import zmq, faster_fifo, iceoryx2, matplotlib, numpy' 2>/dev/null; then
    "$py" -m pip install --quiet -e '.[bench]'
fi
exec "$py" -m ivshmem.cli.main bench --docs "$@"

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
exec .venv/bin/python -m pytest "$@"

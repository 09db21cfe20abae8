#!/usr/bin/env bash
# Run the demo: a server, host peers (and, where QEMU is available, two guest VMs) ringing
# each other and sharing bytes; then everything exits cleanly. Sets up .venv first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/ivshmem demo "$@"

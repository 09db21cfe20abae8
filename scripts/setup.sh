#!/usr/bin/env bash
# Prepare this checkout: system packages (QEMU, busybox) when running as root, and a virtual
# environment in .venv with the package and its test tools. Safe to run again; it only does
# what is missing. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Debian packages the QEMU tests, the lab and the demo use. Without root we cannot install
# them; the tests then skip with a reason (and fail in CI, where skipping is not allowed).
apt_packages=(qemu-system-x86 busybox-static)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]} with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    else
        echo "setup: not installing ${missing[*]} (needs root and apt-get); QEMU tests will skip" >&2
    fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $python" >&2
    "$python" -m venv .venv
fi
stamp=.venv/.ivshmem-installed
# Reinstall when the packaging or the C extension's source changed (the editable install
# builds src/ivshmem/channel/_ringcore*.so, src/ivshmem/server/_fanout*.so and
# src/ivshmem/_eventfdcore*.so in place, next to their sources).
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ src/ivshmem/channel/_ringcore.c -nt "$stamp" ] \
    || [ src/ivshmem/server/_fanout.c -nt "$stamp" ] \
    || [ src/ivshmem/_eventfdcore.c -nt "$stamp" ]; then
    echo "setup: installing ivshmem and its test tools into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e ".[test]" >&2
    touch "$stamp"
fi

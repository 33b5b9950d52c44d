#!/bin/bash
# Set up a fresh Debian 12 machine and run the whole test suite (as root).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PAGEFUSION_VENV:-/opt/pagefusion/venv}
"$root/scripts/setup.sh" --test
cd "$root"
exec "$venv/bin/python" -m pytest "$@"

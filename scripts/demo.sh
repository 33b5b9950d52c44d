#!/bin/bash
# Set up a fresh Debian 12 machine, install pagefusion on it, boot three small
# guests with page fusion on and one with it off, and show what is fused.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PAGEFUSION_VENV:-/opt/pagefusion/venv}
"$root/scripts/setup.sh"
exec "$venv/bin/pagefusion" demo

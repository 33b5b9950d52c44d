#!/bin/bash
# Set up everything pagefusion needs on a Debian 12 host, idempotently:
# Debian packages, a virtual environment with the package and its native
# build. Usage: scripts/setup.sh [--test]   (--test adds the test tools)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PAGEFUSION_VENV:-/opt/pagefusion/venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

packages=(
	libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 qemu-utils
	tini busybox-static linux-image-cloud-amd64
	python3 python3-venv python3-dev gcc pkg-config
	openssh-server openssh-client strace
)
missing=()
for package in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
		missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "pagefusion setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
	/usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip setuptools wheel cffi
# --no-build-isolation: build with the venv's setuptools and cffi, no second download.
"$venv/bin/pip" install -q --no-build-isolation "$root$extras"
echo "pagefusion setup: $("$venv/bin/pagefusion" --version) in $venv"

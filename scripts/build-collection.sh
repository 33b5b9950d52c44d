#!/bin/bash
# Build the Ansible collection pagefusion.libvirt into dist/ (or the folder
# given as $1).
#
# ansible-galaxy wants galaxy.yml in the same folder as plugins/ and roles/,
# while this repository keeps galaxy.yml at its root and the content in
# collection/. So the build runs in a temporary tree: galaxy.yml, the
# content of collection/, and the source archive of the pagefusion package
# that the host role installs on hosts (roles/host/files/pagefusion-src.tar.gz,
# made from this checkout, so deploying needs no network).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/dist}
venv=${PAGEFUSION_VENV:-/opt/pagefusion/venv}
galaxy=$(command -v ansible-galaxy || echo "$venv/bin/ansible-galaxy")

package_version=$(sed -n 's/^version *= *"\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)
collection_version=$(sed -n 's/^version: *//p' "$root/galaxy.yml")
if [ "$collection_version" != "$package_version" ]; then
	echo "build-collection: galaxy.yml has version '$collection_version', pyproject.toml" \
		"'$package_version'; make them equal" >&2
	exit 1
fi

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp "$root/galaxy.yml" "$build/"
cp -R "$root/collection/." "$build/"

# The package's sources as the checkout has them, tracked or new but not
# ignored. Fixed owner, order and gzip header: an unchanged checkout gives
# the same bytes, so the role sees nothing to reinstall.
mkdir -p "$build/roles/host/files"
(
	cd "$root"
	git ls-files -z --cached --others --exclude-standard -- \
		pyproject.toml setup.py README.md plugin hooks native |
		while IFS= read -r -d '' path; do
			[ -f "$path" ] && printf '%s\0' "$path"
		done |
		tar --create --null --files-from=- --sort=name --owner=0 --group=0 --numeric-owner \
			--transform "s,^,pagefusion-$package_version/," |
		gzip -n -9
) >"$build/roles/host/files/pagefusion-src.tar.gz"

mkdir -p "$out"
"$galaxy" collection build "$build" --output-path "$out" --force

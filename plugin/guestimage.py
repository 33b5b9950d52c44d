"""A tiny Linux guest for demonstrations and tests: a distribution kernel and a
busybox initramfs, booted directly by QEMU without a disk.

The initramfs carries a block of pseudo-random data generated from a fixed
seed, identical in every guest (the memory page fusion should fuse); at boot
each guest also fills some memory with its own random bytes (never fusible)
and keeps rewriting a little more (volatile). Sizes come from the kernel
command line, so one image serves every test.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pagefusion.errors import HostError

log = logging.getLogger(__name__)

IMAGE_DIR = Path(os.environ.get("PAGEFUSION_GUEST_DIR", "/var/lib/libvirt/images/pagefusion"))
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
READY_LINE = "pagefusion-guest: ready"
IMAGE_VERSION = 1

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
arg() { sed -n "s/.*pagefusion\\.$1=\\([0-9]*\\).*/\\1/p" /proc/cmdline; }
unique_mib=$(arg unique_mib); volatile_mib=$(arg volatile_mib)
mount -t tmpfs -o size=90% tmpfs /run
# The shared block came in the initramfs; keep a second copy in tmpfs so that
# guests also hold identical pages outside the page cache of the initramfs.
cp /shared.bin /run/shared.bin
[ -n "$unique_mib" ] && dd if=/dev/urandom of=/run/unique.bin bs=1M \\
    count="$unique_mib" 2>/dev/null
echo "@READY@"
if [ -n "$volatile_mib" ] && [ "$volatile_mib" -gt 0 ]; then
    while :; do
        dd if=/dev/urandom of=/run/volatile.bin bs=1M count="$volatile_mib" \\
            conv=notrunc 2>/dev/null
        sleep 1
    done &
fi
while :; do sleep 3600; done
""".replace("@READY@", READY_LINE)


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def _find_kernel() -> Path:
    candidates = sorted(Path("/boot").glob("vmlinuz-*"))
    cloud = [k for k in candidates if "cloud" in k.name]
    found = (cloud or candidates)[-1:] if candidates else []
    if not found:
        raise HostError(
            "no kernel in /boot for the demo guest; install Debian's linux-image-cloud-amd64"
        )
    return found[0]


def _find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.exists():
            return candidate
    raise HostError("busybox not found; install Debian's busybox-static")


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    """One entry of a "newc" cpio archive, the format the kernel unpacks."""
    encoded = name.encode() + b"\0"
    header = "070701" + "".join(
        f"{value:08x}" for value in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    )
    entry = header.encode() + encoded
    entry += b"\0" * (-len(entry) % 4)
    entry += data + b"\0" * (-len(data) % 4)
    return entry


def shared_block(size_mib: int, seed: bytes = b"pagefusion-demo") -> bytes:
    """Deterministic pseudo-random bytes: the same in every guest, no two pages alike."""
    out = bytearray()
    counter = 0
    while len(out) < size_mib << 20:
        out += hashlib.shake_256(seed + counter.to_bytes(8, "little")).digest(1 << 16)
        counter += 1
    return bytes(out)


def build_initramfs(busybox: Path, shared_mib: int) -> bytes:
    entries = [
        _cpio_entry(".", 0o040755),
        *(_cpio_entry(d, 0o040755) for d in ("bin", "proc", "sys", "dev", "run", "tmp")),
        _cpio_entry("bin/busybox", 0o100755, busybox.read_bytes()),
        _cpio_entry("init", 0o100755, INIT_SCRIPT.encode()),
        _cpio_entry("shared.bin", 0o100644, shared_block(shared_mib)),
        _cpio_entry("TRAILER!!!", 0),
    ]
    return b"".join(entries)


def ensure_image(shared_mib: int = 16) -> GuestImage:
    """Build the guest image once and reuse it; rebuild when its inputs change."""
    kernel = _find_kernel()
    busybox = _find_busybox()
    stamp = f"v{IMAGE_VERSION}-{kernel.name}-{busybox.stat().st_size}-{shared_mib}"
    IMAGE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    image = GuestImage(kernel=IMAGE_DIR / "vmlinuz", initrd=IMAGE_DIR / f"initrd-{stamp}.cpio")
    if image.initrd.exists() and image.kernel.exists():
        return image

    log.info("building the guest image in %s", IMAGE_DIR)
    shutil.copyfile(kernel, image.kernel)
    image.kernel.chmod(0o644)
    temporary = image.initrd.with_suffix(".tmp")
    temporary.write_bytes(build_initramfs(busybox, shared_mib))
    temporary.chmod(0o644)
    os.replace(temporary, image.initrd)
    for old in IMAGE_DIR.glob("initrd-*.cpio"):
        if old != image.initrd:
            old.unlink()
    return image

"""cffi (API mode) builder of ``pagefusion._native``, the fusion worker's C core.

setuptools loads ``ffibuilder`` from here (``cffi_modules`` in setup.py) and
runs from the repository root, so the paths below are relative to it.  Run as
a script, it builds the module into a directory (a new temporary one by
default) for a quick try, and prints where the module landed:

    python native/build.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import cffi

NATIVE_DIR = Path(__file__).resolve().parent
REPO_ROOT = NATIVE_DIR.parent

# Portable on x86_64 (SSE2 is baseline) and aarch64 (NEON is baseline): the
# hash picks its SIMD path from the compiler's predefined macros, so no
# -march flag is needed and the module runs on any CPU of the architecture.
COMPILE_ARGS = [
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-fvisibility=hidden",
]


def make_builder(root: str) -> cffi.FFI:
    """The builder, with source paths under ``root`` ("" means relative)."""
    builder = cffi.FFI()
    builder.cdef((NATIVE_DIR / "pfcore_cdef.h").read_text(encoding="utf-8"))
    builder.set_source(
        "pagefusion._native",
        '#include "pfcore.h"',
        sources=[os.path.join(root, "native", "pfcore.c")],
        include_dirs=[os.path.join(root, "native")],
        extra_compile_args=COMPILE_ARGS,
    )
    return builder


# setuptools runs from the repository root and wants relative paths.
ffibuilder = make_builder("")


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="pagefusion-"))
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # cffi compiles from inside out_dir, so here the paths must be absolute.
    library = make_builder(str(REPO_ROOT)).compile(tmpdir=str(out_dir), verbose=False)
    print(f"built {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

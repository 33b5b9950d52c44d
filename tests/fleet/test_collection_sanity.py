"""The built collection passes ``ansible-test sanity``, every test of it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import playbook
import pytest

pytestmark = pytest.mark.fleet

SANITY_TIMEOUT_S = 1200


def pip_bootstrap_cache() -> Path:
    """Where ansible-test looks for its pip bootstrap script before downloading it."""
    import ansible_test

    source = Path(ansible_test.__file__).with_name("_internal") / "python_requirements.py"
    version = re.search(r"pip='([0-9.]+)'", source.read_text()).group(1)
    return Path.home() / ".ansible" / "test" / "cache" / f"get_pip_{version.replace('.', '_')}.py"


def test_the_built_collection_passes_ansible_test_sanity(fleet):
    root = fleet.base / "collections" / "ansible_collections" / "pagefusion" / "libvirt"
    ansible_test = playbook.ANSIBLE_PLAYBOOK.with_name("ansible-test")
    cache = pip_bootstrap_cache()
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).with_name("get_pip_standin.py"), cache)

    def sanity(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ansible_test), "sanity", "--local", "--requirements",
             "--python", f"{sys.version_info.major}.{sys.version_info.minor}", *args],
            cwd=root, env=fleet.env, capture_output=True, text=True, timeout=SANITY_TIMEOUT_S,
        )  # fmt: skip

    done = sanity()
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ran = re.findall(r'Running sanity test "([\w-]+)"', done.stdout + done.stderr)
    assert {"validate-modules", "pylint", "yamllint", "ansible-doc", "import"} <= set(ran), ran

    # The ignored invalid-documentation entries hide the author's format, and nothing else.
    ignore = root / "tests" / "sanity" / "ignore-2.19.txt"
    kept = [line for line in ignore.read_text().splitlines() if "invalid-documentation" not in line]
    ignore.write_text("\n".join(kept) + "\n")
    unignored = sanity("--test", "validate-modules")
    output = unignored.stdout + unignored.stderr
    errors = [line for line in output.splitlines() if "invalid-documentation" in line]
    assert errors and all("DOCUMENTATION.author" in line for line in errors), output

"""Fixtures shared by the test suite.

``libvirt_conn`` and ``guest_factory`` give tests the real thing: libvirtd
with pagefusion's hook, booting TCG guests. Tests that use them carry the
``libvirt`` marker and skip only where libvirtd cannot run at all.
"""

from __future__ import annotations

import sys

import pytest
import testbed

from pagefusion import guestimage, install, paths


def pytest_collection_modifyitems(config, items):
    reason = testbed.libvirtd_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"libvirtd cannot run here: {reason}")
    for item in items:
        if "libvirt" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def libvirt_conn():
    conn = testbed.ensure_libvirtd_with_hook()
    testbed.remove_leftover_guests(conn)
    with testbed.ksm_settings_restored():
        yield conn
    testbed.remove_leftover_guests(conn)


@pytest.fixture(scope="session")
def guest_image():
    return guestimage.ensure_image()


@pytest.fixture
def guest_factory(libvirt_conn, guest_image):
    factory = testbed.GuestFactory(libvirt_conn, guest_image)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def private_paths(tmp_path, monkeypatch):
    """Point pagefusion's state and run directories at a temporary folder."""
    state, run = tmp_path / "state", tmp_path / "run"
    monkeypatch.setattr(paths, "STATE_DIR", state)
    monkeypatch.setattr(paths, "RUN_DIR", run)
    monkeypatch.setenv("PAGEFUSION_STATE_DIR", str(state))
    monkeypatch.setenv("PAGEFUSION_RUN_DIR", str(run))
    return tmp_path


@pytest.fixture
def hook_script(private_paths):
    """The hook script as ``pagefusion install`` writes it, for this interpreter."""
    if not install.hook_front().exists():
        pytest.fail(f"the hook front {install.hook_front()} was not built with the package")
    script = private_paths / "pagefusion-hook"
    script.write_text(install.hook_text(sys.executable))
    script.chmod(0o755)
    return script

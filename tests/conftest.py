"""Shared test set-up: CI never silently skips the real-VM tier, and libvirt storage pools left
behind by tests whose temporary directories are gone are removed at the end of the run."""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def qemu_system_unreachable_reason() -> str | None:
    """None when qemu:///system answers, else why not."""
    try:
        import libvirt

        libvirt.open("qemu:///system").close()
    except Exception as exc:  # any failure means: no real hypervisor here
        return f"qemu:///system is not reachable: {exc}"
    return None


def skip_or_fail_without_real_vms(reason: str) -> None:
    """Outside CI a developer may lack libvirt; in CI a missing real tier is a failure."""
    if IN_CI:
        pytest.fail(f"real-VM tier cannot run in CI: {reason}")
    pytest.skip(reason)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    try:
        import libvirt

        conn = libvirt.open("qemu:///system")
    except Exception:
        return
    tmp_root = tempfile.gettempdir()
    try:
        for pool in conn.listAllStoragePools(0):
            if not pool.name().startswith("deskpool-"):
                continue
            path = ET.fromstring(pool.XMLDesc(0)).findtext("./target/path") or ""
            # Only pools of temporary directories that are gone: another test session running
            # at the same time may still be using its own.
            if not path.startswith(f"{tmp_root}/") or Path(path).exists():
                continue
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    finally:
        conn.close()

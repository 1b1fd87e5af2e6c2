"""Shared test set-up: CI never silently skips the real-VM tier, and libvirt storage pools left
behind by tests whose temporary directories are gone are removed at the end of the run."""

from __future__ import annotations

import os
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.pg_server import PostgresServer

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


def kill_qemu_of(vm_name: str, timeout_s: float = 30.0) -> int:
    """SIGKILL the QEMU process of the qemu:///system domain ``vm_name`` (a real crash of
    that one VM), and wait until libvirt has noticed; returns the pid killed. The pid comes
    from libvirt's own pid file and is checked to be that domain's QEMU before the kill, so
    no other VM on the machine is touched."""
    import signal
    import time

    pid = int(Path(f"/run/libvirt/qemu/{vm_name}.pid").read_text().strip())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"qemu" in cmdline[0] and f"guest={vm_name},".encode() in b" ".join(cmdline), (
        f"pid {pid} is not the QEMU of {vm_name}: {cmdline[:3]}")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() or Path(f"/run/libvirt/qemu/{vm_name}.pid").exists():
        assert time.monotonic() < deadline, f"libvirt did not notice {vm_name}'s QEMU died"
        time.sleep(0.2)
    return pid


OTHER_LANE_NICE = 5
# The deployment id of VMs tests make straight through a driver (no database): none of any
# test's deployments, so no reconciler running beside them on qemu:///system takes them for
# its own orphans (a VM with no deployment id counts as a leftover of every deployment).
DRIVER_TEST_INSTALLATION = uuid.UUID("00000000-0000-4000-8000-0000deadbeef")


def is_real_vm_test(nodeid: str) -> bool:
    """Whether a test boots real guests, from its id alone (xdist's scheduler sees no
    markers): the tests/realvm tier and the contract suite's ``libvirt-qemu`` driver.
    ``pytest_collection_modifyitems`` checks this against the ``realvm`` marker."""
    return nodeid.startswith("tests/realvm/") or "libvirt-qemu" in nodeid


# The desktop-flavor modules run first in the real-VM lane: their Xfce sessions are the most
# CPU-hungry guests and the most timing-sensitive, so they run before any other guest shares
# the two CPUs with them.
REAL_VM_FIRST = ("tests/realvm/test_desktop_session.py", "tests/realvm/test_desktop_portal.py",
                 "tests/realvm/test_roaming_profile.py")
# Console-flavor modules that run safely beside any other real-VM module (VM names, storage
# pools and second daemons of their own; nothing global is killed): they go last, one unit of
# work each, so the lane of everything else takes them once its own files are done (about
# half-way) instead of sitting idle while the real-VM lane runs alone.
REAL_VM_EITHER_LANE = frozenset({
    "tests/realvm/test_multi_host.py", "tests/realvm/test_second_host.py",
    "tests/realvm/test_sigkill.py", "tests/realvm/test_storage_full.py",
    "tests/realvm/test_template_fault.py", "tests/realvm/test_vm_crash.py",
    "tests/realvm/test_ha_restart.py", "tests/realvm/test_offline_laptop.py",
})


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def real_vm_unit(nodeid: str) -> str | None:
    """The unit of work of a real-VM test: the one real-VM lane, or its own module when that
    module may run in either lane; None for every other test."""
    if not is_real_vm_test(nodeid):
        return None
    module = _module_of(nodeid)
    return f"real VMs: {module}" if module in REAL_VM_EITHER_LANE else "real VMs"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-VM tests first, in their order (the desktop flavor's at the head), and the
    real-VM modules of either lane last: ``./dev test`` runs ``-n 2 --dist loadfile
    --no-loadscope-reorder`` with the scheduler below, so one worker runs the real-VM lane
    (the images and booted guests of their session and module fixtures shared) while the
    other runs everything else, a file at a time, then the modules of either lane with it.
    TCG guests are CPU-bound on one vCPU, so two lanes on two CPUs cut the wall time."""
    marked = {item.nodeid for item in items if item.get_closest_marker("realvm") is not None}
    named = {item.nodeid for item in items if is_real_vm_test(item.nodeid)}
    if marked != named:
        raise pytest.UsageError(
            "realvm marker and is_real_vm_test() disagree on: "
            + ", ".join(sorted(marked ^ named)[:5]))
    unit = {item.nodeid: real_vm_unit(item.nodeid) for item in items}

    def rank(item: pytest.Item) -> int:
        if unit[item.nodeid] is None:
            return 2
        if unit[item.nodeid] != "real VMs":
            return 3
        return 0 if _module_of(item.nodeid) in REAL_VM_FIRST else 1

    items.sort(key=rank)  # stable: each group keeps its own order


def pytest_runtest_setup(item: pytest.Item) -> None:
    """In a two-lane run, the lane of everything else yields the CPU to the real-VM lane
    (its TCG guests are QEMU processes of libvirtd's, at nice 0): that lane is the longest,
    and the other has time to spare. Its children (brokers, PostgreSQL) inherit it."""
    if (os.environ.get("PYTEST_XDIST_WORKER") and not is_real_vm_test(item.nodeid)
            and os.getpriority(os.PRIO_PROCESS, 0) < OTHER_LANE_NICE):
        os.setpriority(os.PRIO_PROCESS, 0, OTHER_LANE_NICE)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadfile``, except that the real-VM lane is one unit of work (see
    ``real_vm_unit``)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RealVmLane(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return real_vm_unit(nodeid) or super()._split_scope(nodeid)

    return RealVmLane(config, log)  # type: ignore[arg-type]


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


# --- databases: every test that asks for ``database_url`` runs on SQLite and on PostgreSQL ----

_pg_databases = iter(range(1, 1_000_000))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    from tests.pg_server import PostgresServer, available

    reason = available()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL tier cannot run in CI: {reason}")
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'deskpool.db'}"
    server = request.getfixturevalue("postgres")
    return str(server.create_database(f"t{next(_pg_databases)}"))


# A configuration file on the machine running the tests (/etc/deskpool/deskpool.toml) must not
# change what the tests' own settings say: no file unless a test names one.
os.environ["DESKPOOL_CONFIG"] = ""

"""Where a layered desktop's rebase is decided (pure): a layered stateful pool's rollout
rebases its ready old-version desktops instead of retiring them (a failed one waits), its
logoff rebases an outdated desktop, and its VM's kernel command line names the version its
root is. Pools without user layers plan as before. The layer disk's files read back."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from deskpool.domain.models import Customization, PoolStatus
from deskpool.domain.pools import Assignment, OnLogout, PoolKind
from deskpool.domain.states import DesktopState, DesktopTask
from deskpool.drivers.base import layer_volume_name
from deskpool.images.user_layer_disk import build_layer_disk, read_layer_file
from deskpool.reconciler.planning import plan_pool
from deskpool.services.factory import boot_identity
from deskpool.services.layer_rebase_boot import ERROR_FILE, guest_rebase_error
from deskpool.services.pools import logout_outcome
from deskpool.store.models import Desktop, Pool, TemplateVersion
from tests.unit.test_pool_planning import NOW, V1, V2, desk, spec

LAYERED = {"kind": PoolKind.STATEFUL, "assignment": Assignment.DEDICATED,
           "on_logout": OnLogout.RECYCLE_AS_IS, "user_layer_mib": 256}


def test_a_layered_pools_ready_old_desktops_are_rebased_never_retired() -> None:
    free, waiting, busy, new = (desk(), desk(assigned=True), desk("in_use", assigned=True),
                                desk(version=V2))
    plan = plan_pool(spec(**LAYERED), V2, [free, waiting, busy, new], NOW)
    assert plan.retire == [] and sorted(plan.rebase) == sorted([free.id, waiting.id])
    failed = plan_pool(spec(**LAYERED), V2, [free, waiting, busy, new], NOW,
                       rebase_failed=frozenset({waiting.id}))
    assert failed.rebase == [free.id]


@pytest.mark.parametrize("fields", [
    {}, {**LAYERED, "user_layer_mib": 0}], ids=["stateless", "stateful-without-layer"])
def test_pools_without_layers_still_retire_free_old_desktops(fields: dict[str, object]
                                                             ) -> None:
    free, waiting = desk(), desk(assigned=True)
    plan = plan_pool(spec(**fields), V2, [free, waiting, desk(version=V2)], NOW)
    assert plan.rebase == [] and plan.retire == [free.id]


def pool_of(**fields: object) -> Pool:
    return Pool(current_version_id=V2, one_time=False, status=PoolStatus.ENABLED,
                revert_by="snapshot", **fields)


@pytest.mark.parametrize(("fields", "outcome"), [
    (LAYERED, (DesktopState.RECYCLING, DesktopTask.REBASE)),
    ({**LAYERED, "user_layer_mib": 0}, (DesktopState.RECYCLING, DesktopTask.KEEP)),
    ({"kind": PoolKind.STATELESS, "assignment": Assignment.FLOATING,
      "on_logout": OnLogout.RECYCLE_REVERT, "user_layer_mib": 0},
     (DesktopState.RETIRING, DesktopTask.RETIRE)),
])
def test_a_logoff_rebases_only_a_layered_outdated_desktop(
        fields: dict[str, object], outcome: tuple[DesktopState, DesktopTask]) -> None:
    pool = pool_of(**fields)
    assert logout_outcome(pool, Desktop(template_version_id=V1)) == outcome
    if fields.get("user_layer_mib"):  # on the pool's version: kept as it is
        assert logout_outcome(pool, Desktop(template_version_id=V2)) == (
            DesktopState.RECYCLING, DesktopTask.KEEP)


def test_a_layered_desktops_command_line_names_its_roots_version() -> None:
    desktop = Desktop(id=uuid.uuid4(), hostname="d", mac="52:54:00:00:00:01",
                      machine_id="a" * 32)
    tv = TemplateVersion(number=3, kernel_path="/k", kernel_cmdline="console=ttyS0",
                         customization=Customization.FWCFG)
    plain, identity = boot_identity(desktop, tv)
    layered, same = boot_identity(desktop, tv, layered=True)
    assert plain == f"console=ttyS0 systemd.machine_id={'a' * 32}"
    assert layered == f"{plain} deskpool.layer_version=3" and same == identity
    # A template booting from its disk has no command line to tell.
    assert boot_identity(desktop, TemplateVersion(number=3, kernel_path=None,
                                                  customization=Customization.FWCFG),
                         layered=True)[0] is None


@pytest.mark.skipif(shutil.which("debugfs") is None or shutil.which("mke2fs") is None,
                    reason="needs e2fsprogs")
def test_a_file_at_the_layer_disks_root_reads_back(tmp_path: Path) -> None:
    disk = build_layer_disk(tmp_path / "layer.qcow2", size_mib=16, version="1")
    assert read_layer_file(disk, "rebase-error.txt") is None
    assert read_layer_file(tmp_path / "missing.qcow2", "rebase-error.txt") is None
    raw, note = tmp_path / "layer.raw", tmp_path / "note"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    note.write_text("the new base has no /usr\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {note} rebase-error.txt", str(raw)],
                   check=True, capture_output=True)
    assert read_layer_file(raw, "rebase-error.txt") == "the new base has no /usr\n"
    with pytest.raises(Exception, match="not a file name"):
        read_layer_file(raw, "../etc/passwd")


@pytest.mark.skipif(shutil.which("debugfs") is None or shutil.which("mke2fs") is None,
                    reason="needs e2fsprogs")
def test_a_failed_rebase_tells_the_guests_reason_when_the_host_is_local(
        tmp_path: Path) -> None:
    desktop_id = uuid.uuid4()
    disk = build_layer_disk(tmp_path / "layer.qcow2", size_mib=16, version="1")
    local = SimpleNamespace(storage_dir=tmp_path)
    named = tmp_path / layer_volume_name(desktop_id)
    read = guest_rebase_error
    assert read(local, desktop_id) is None  # type: ignore[arg-type]  # no disk there
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(named)], check=True)
    assert read(local, desktop_id) is None  # type: ignore[arg-type]  # no error file
    note = tmp_path / "note"
    note.write_text("layer base_version 1 != 2 and no base disk\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {note} {ERROR_FILE}", str(named)],
                   check=True, capture_output=True)
    assert read(local, desktop_id) == (  # type: ignore[arg-type]
        "the guest's rebase failed: layer base_version 1 != 2 and no base disk")
    remote = SimpleNamespace(storage_dir=None)
    assert read(remote, desktop_id) is None  # type: ignore[arg-type]

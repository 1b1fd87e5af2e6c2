"""A user's second concurrent session, on real profile disks (the fake driver plugs them,
debugfs plays the guest writing files): the one that logs off last is merged file by file
into what the first committed, overlaps are kept as conflict copies and told to the user,
and a read-only session's changes are dropped. Zero files lost."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.domain.profile_merge import EntryKind, LayerMode
from deskpool.domain.profiles import LayerState
from deskpool.drivers.fake import FakeDriver
from deskpool.images.profile_disks import QCOW2_OPTIONS, backing_file
from deskpool.images.profile_merge import read_side
from deskpool.services.context import ServiceContext
from deskpool.services.events import messages_for
from deskpool.services.profiles import ProfileService
from tests.functional import test_profiles as profile_world
from tests.functional.test_profiles import QUOTA, committed_path, desktop

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.ext4", "qemu-img", "debugfs")),
    reason="needs e2fsprogs and qemu-utils")
UID = 2001
# The profile tests' fixtures (a context on SQLite and PostgreSQL, the service, a fake host).
ctx, service, fake = profile_world.ctx, profile_world.service, profile_world.fake


def guest_saves(layer: Path, files: dict[str, str | None]) -> None:
    """What the user's session does to their home: write (text) or delete (None) files,
    into the session layer the desktop has plugged in, as an overlay on the same backing."""
    scratch = layer.with_suffix(".edit")
    scratch.mkdir()
    raw = scratch / "home.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(layer), str(raw)], check=True)
    commands = []
    for rel, text in files.items():
        commands.append(f'rm "/{rel}"')
        if text is not None:
            source = scratch / f"src-{len(commands)}"
            source.write_text(text)
            os.chown(source, UID, UID)
            commands += [f'write "{source}" "/{rel}"', f'sif "/{rel}" uid {UID}',
                         f'sif "/{rel}" gid {UID}', f'sif "/{rel}" mode 0100644']
    (scratch / "cmds").write_text("\n".join(commands) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(scratch / "cmds"), str(raw)], check=True,
                   capture_output=True)
    backing = backing_file(layer)
    assert backing is not None
    edited = scratch / "edited.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-o", QCOW2_OPTIONS, "-B",
                    os.path.relpath(layer.parent / backing, scratch), "-F", "qcow2",
                    str(raw), str(edited)], check=True)
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", backing, str(edited)],
                   check=True)
    os.replace(edited, layer)
    shutil.rmtree(scratch)


def home_of(path: Path, tmp_path: Path) -> dict[str, str]:
    scratch = tmp_path / f"read-{path.stem}"
    scratch.mkdir()
    side = read_side(path, scratch, "home")
    return {rel: (side.files / rel).read_text() for rel, entry in side.tree.items()
            if entry.kind is EntryKind.FILE and not rel.startswith(".bash")}


def test_the_last_session_to_log_off_is_merged_and_nothing_is_lost(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        tmp_path: Path) -> None:
    service.ensure_profile("ann", owner=(UID, UID), quota_bytes=QUOTA)
    vm_a, vm_b = desktop(fake, "desk-a"), desktop(fake, "desk-b")
    first = service.start_session("ann", "desk-a", fake, vm_a)
    guest_saves(first.path, {"report.txt": "draft", "notes.txt": "n0", "old.txt": "old"})
    assert service.end_session(first.layer_id, fake, vm_a).generation == 2

    on_a = service.start_session("ann", "desk-a", fake, vm_a)
    on_b = service.start_session("ann", "desk-b", fake, vm_b, mode=LayerMode.MERGE)
    guest_saves(on_a.path, {"report.txt": "final by A", "a.txt": "from A"})
    guest_saves(on_b.path, {"report.txt": "final by B", "notes.txt": "n1 by B",
                            "b.txt": "from B", "old.txt": None})
    assert service.end_session(on_a.layer_id, fake, vm_a).generation == 3
    merged = service.end_session(on_b.layer_id, fake, vm_b)

    assert merged.committed and merged.generation == 4
    assert len(merged.conflicts) == 1 and "report.txt" in merged.conflicts[0]
    assert home_of(committed_path(service, "ann"), tmp_path) == {
        "report.txt": "final by A", "report.txt.conflict-desk-b": "final by B",
        "notes.txt": "n1 by B", "a.txt": "from A", "b.txt": "from B"}
    assert backing_file(committed_path(service, "ann")) == on_a.path.name
    with ctx.uow(read_only=True) as uow:
        assert uow.profiles.layer(on_b.layer_id).state is LayerState.MERGED
    (told,) = [m for m in messages_for(ctx, "ann") if m.kind == "profile-merged"]
    assert "report.txt" in told.message and "desk-b" in told.message
    assert on_b.path in service.sweep("ann", stray_age=timedelta(0))


def test_a_read_only_session_keeps_nothing_and_says_so(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        tmp_path: Path) -> None:
    service.ensure_profile("ann", owner=(UID, UID), quota_bytes=QUOTA)
    vm_a, vm_b = desktop(fake, "desk-a"), desktop(fake, "desk-b")
    on_a = service.start_session("ann", "desk-a", fake, vm_a)
    on_b = service.start_session("ann", "desk-b", fake, vm_b, mode=LayerMode.READ_ONLY)
    guest_saves(on_a.path, {"kept.txt": "A"})
    guest_saves(on_b.path, {"dropped.txt": "B"})

    dropped = service.end_session(on_b.layer_id, fake, vm_b)
    assert not dropped.committed and dropped.generation == 1
    assert not on_b.path.exists() and fake.attached_disks(vm_b) == {}
    assert service.end_session(on_a.layer_id, fake, vm_a).generation == 2
    assert home_of(committed_path(service, "ann"), tmp_path) == {"kept.txt": "A"}
    with ctx.uow(read_only=True) as uow:
        assert uow.profiles.layer(on_b.layer_id).state is LayerState.DISCARDED
    assert any(m.kind == "profile-read-only" and "desk-b" in m.message
               for m in messages_for(ctx, "ann"))

"""The merge engine on real ext4 profile disks (mkfs.ext4, qemu-img, debugfs; no mounts):
a second session's changes are merged into the generation committed meanwhile, the result
is an overlay on that generation holding only the changes, and every file is there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from deskpool.domain.profile_merge import EntryKind, plan_merge
from deskpool.images.profile_disks import (
    ProfileDiskError,
    backing_file,
    check_layer,
    make_base_disk,
)
from deskpool.images.profile_merge import apply_plan, read_side, remove_scratch

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.ext4", "qemu-img", "debugfs")),
    reason="needs e2fsprogs and qemu-utils")
UID = 4321


def disk(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    """A profile disk holding ``files`` (path -> text), owned by UID."""
    src = tmp_path / f"src-{name}"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory, dirs, names in os.walk(src):
        for entry in [directory, *(os.path.join(directory, n) for n in dirs + names)]:
            os.chown(entry, UID, UID)
    return make_base_disk(tmp_path / f"{name}.qcow2", 64 * 2**20, skeleton=src,
                          owner=(UID, UID))


BASE = {"Documents/report.txt": "draft", "Documents/notes.txt": "n0",
        ".config/xfce4/panel.xml": "<panel/>", "old.txt": "old"}


def test_a_second_session_is_merged_into_the_committed_generation(tmp_path: Path) -> None:
    base = disk(tmp_path, "base", BASE)
    ours = disk(tmp_path, "ours", {**BASE, "Documents/report.txt": "final by A",
                                   "from-a.txt": "a"})
    theirs_files = {**BASE, "Documents/report.txt": "final by B",
                    "Documents/notes.txt": "n1 by B", "Documents/new/deep.txt": "deep"}
    del theirs_files["old.txt"]
    theirs = disk(tmp_path, "theirs", theirs_files)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sides = [read_side(image, scratch, name)
             for image, name in ((base, "base"), (ours, "ours"), (theirs, "theirs"))]
    plan = plan_merge(sides[0].tree, sides[1].tree, sides[2].tree, desktop="desk-02")
    out = apply_plan(sides[1], sides[2], plan, ours, tmp_path / "merged.qcow2", scratch)
    remove_scratch(scratch)
    assert not scratch.exists()

    assert backing_file(out) == "ours.qcow2"  # an overlay on the committed layer
    assert check_layer(out).error is None
    again = tmp_path / "again"
    again.mkdir()
    merged = read_side(out, again, "merged")
    text = {rel: (merged.files / rel).read_text() for rel, e in merged.tree.items()
            if e.kind is EntryKind.FILE}
    assert text == {
        "Documents/report.txt": "final by A",
        "Documents/report.txt.conflict-desk-02": "final by B",
        "Documents/notes.txt": "n1 by B", "Documents/new/deep.txt": "deep",
        ".config/xfce4/panel.xml": "<panel/>", "from-a.txt": "a"}
    assert {(e.uid, e.gid) for e in merged.tree.values()} == {(UID, UID)}
    assert merged.tree["Documents/report.txt.conflict-desk-02"].mode == 0o100644
    assert [c for c in plan.conflicts if "report.txt" in c]


def test_a_name_debugfs_cannot_take_fails_and_publishes_nothing(tmp_path: Path) -> None:
    base = disk(tmp_path, "base", {"a.txt": "0"})
    ours = disk(tmp_path, "ours", {"a.txt": "1"})
    theirs = disk(tmp_path, "theirs", {"a.txt": "0", 'say "hi".txt': "x"})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sides = [read_side(image, scratch, name)
             for image, name in ((base, "base"), (ours, "ours"), (theirs, "theirs"))]
    plan = plan_merge(sides[0].tree, sides[1].tree, sides[2].tree, desktop="d")
    out = tmp_path / "merged.qcow2"
    with pytest.raises(ProfileDiskError, match="cannot be merged"):
        apply_plan(sides[1], sides[2], plan, ours, out, scratch)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()

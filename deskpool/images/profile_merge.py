"""The file-level merge of two profile sessions, on the host, without mounting anything.

Each side's chain is converted to a sparse raw file in a scratch directory and read with
``debugfs rdump`` (e2fsprogs reads ext4 itself: no loop device, no kernel mount). The
merge plan (``domain.profile_merge.plan_merge``) is applied to the committed side's raw
copy with ``debugfs -w``; the result is read back and must be exactly the planned tree
(every file's sha256, mode and owner) and pass ``e2fsck -fn``, or nothing is published.
It becomes a new qcow2 overlay on the committed layer with ``qemu-img convert -B``, which
writes only the clusters that differ from that layer, so the new generation carries the
merged-in changes, not a copy of the profile.

The scratch space is about the allocated size of three chains; it is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import InvalidInput
from deskpool.domain.profile_merge import Entry, EntryKind, MergePlan, Write, plan_merge
from deskpool.images.profile_disks import (
    QCOW2_OPTIONS,
    ProfileDiskError,
    partial_path,
    publish_file,
    run_tool,
    sha256_of,
)

# The filesystem's own directory, never part of a user's files.
_SKIPPED = frozenset({"lost+found"})


@dataclass(frozen=True, slots=True)
class ReadSide:
    """One side of a merge, read: its tree, the files dumped from it, its raw copy."""

    tree: dict[str, Entry]
    files: Path
    raw: Path


def read_side(image: Path, scratch: Path, name: str) -> ReadSide:
    """Convert ``image`` (a qcow2 chain's top) to raw under ``scratch`` and dump its files."""
    raw, files = scratch / f"{name}.raw", scratch / name
    run_tool(f"reading profile layer {image.name}",
         ["qemu-img", "convert", "-O", "raw", str(image), str(raw)])
    files.mkdir()
    _debugfs(f"dumping profile layer {image.name}", raw, [f"rdump / {_quoted(str(files))}"])
    return ReadSide(tree_of(files), files, raw)


def tree_of(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (a dumped filesystem) as the merge compares it. Links
    take their directory's owner: ``rdump`` does not keep a link's own."""
    tree: dict[str, Entry] = {}
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        if here == root:
            dirs[:] = [d for d in dirs if d not in _SKIPPED]
        parent = here.lstat()
        for name in sorted(dirs + files):
            path = here / name
            info = path.lstat()
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                tree[relative] = Entry(EntryKind.LINK, info.st_mode, parent.st_uid,
                                       parent.st_gid, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                tree[relative] = Entry(EntryKind.DIR, info.st_mode, info.st_uid, info.st_gid)
            elif stat.S_ISREG(info.st_mode):
                tree[relative] = Entry(EntryKind.FILE, info.st_mode, info.st_uid,
                                       info.st_gid, sha256_of(path))
            # Devices, sockets and fifos do not roam: a home has no use for them.
    return tree


def apply_plan(ours: ReadSide, theirs: ReadSide, plan: MergePlan, committed_layer: Path,
               out: Path, scratch: Path) -> Path:
    """Apply ``plan`` to ``ours``' raw copy, check it, and publish the result at ``out`` as
    an overlay on ``committed_layer`` (named relative to ``out``'s directory, like every
    layer). ``ProfileDiskError`` when any step fails or the result is not the planned
    tree; nothing is at ``out`` then."""
    present = set(ours.tree)
    commands: list[str] = []
    for write in plan.writes:
        commands += _write_commands(write, theirs.files, present)
    for path in plan.deletes:
        entry = ours.tree.get(path)
        commands.append(("rmdir " if entry is not None and entry.kind is EntryKind.DIR
                         else "rm ") + _quoted("/" + path))
    _debugfs("merging the profile", ours.raw, commands, write=True)
    run_tool("checking the merged profile", ["e2fsck", "-fn", str(ours.raw)])
    check = scratch / "merged"
    check.mkdir()
    _debugfs("reading the merged profile back", ours.raw, [f"rdump / {_quoted(str(check))}"])
    merged = tree_of(check)
    if merged != plan.result:
        wrong = sorted(set(merged.items()) ^ set(plan.result.items()))[:5]
        raise ProfileDiskError(f"the merged profile is not the planned one: {wrong}")
    partial = partial_path(out)
    try:
        run_tool("writing the merged generation",
             ["qemu-img", "convert", "-O", "qcow2", "-o", QCOW2_OPTIONS,
              "-B", os.path.relpath(committed_layer, out.parent), "-F", "qcow2",
              str(ours.raw), str(partial)])
        publish_file(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)


def merge_layers(base: Path, ours: Path, theirs: Path, out: Path, *, desktop: str
                 ) -> MergePlan:
    """Merge the session layer ``theirs`` (from ``desktop``) into the committed layer
    ``ours``, both started from ``base``, as a new overlay ``out`` on ``ours``. The plan
    says what was merged and every conflict. A scratch directory beside ``out`` is removed
    whatever happens. ``ProfileDiskError`` (nothing at ``out``) when it cannot be done."""
    scratch = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
    try:
        sides = [read_side(image, scratch, name) for image, name in
                 ((base, "base"), (ours, "ours"), (theirs, "theirs"))]
        try:
            plan = plan_merge(sides[0].tree, sides[1].tree, sides[2].tree, desktop=desktop)
        except InvalidInput as exc:
            raise ProfileDiskError(str(exc)) from exc
        apply_plan(sides[1], sides[2], plan, ours, out, scratch)
        return plan
    finally:
        remove_scratch(scratch)


def _write_commands(write: Write, theirs_files: Path, present: set[str]) -> list[str]:
    target, entry = "/" + write.target, write.entry
    quoted = _quoted(target)
    commands: list[str] = []
    if entry.kind is EntryKind.DIR:
        if write.target not in present:
            commands.append(f"mkdir {quoted}")
    else:
        if write.target in present:
            commands.append(f"rm {quoted}")
        if entry.kind is EntryKind.FILE:
            commands.append(f"write {_quoted(str(theirs_files / write.source))} {quoted}")
        else:
            commands.append(f"symlink {quoted} {_quoted(entry.content)}")
    present.add(write.target)
    if entry.kind is not EntryKind.LINK:
        commands.append(f"sif {quoted} mode 0{entry.mode:o}")
    commands += [f"sif {quoted} uid {entry.uid}", f"sif {quoted} gid {entry.gid}"]
    return commands


def _debugfs(step: str, raw: Path, commands: list[str], *, write: bool = False) -> None:
    """Run ``commands`` in one debugfs. It exits 0 whatever its commands did, so every
    line it prints that is not an echo of a command is an error."""
    script = raw.with_suffix(".debugfs")
    script.write_text("".join(f"{command}\n" for command in commands))
    proc = run_tool(step, ["debugfs", *(["-w"] if write else []), "-f", str(script), str(raw)])
    echoed = {f"debugfs: {command}" for command in commands}
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.strip() and line not in echoed and not line.startswith("debugfs 1.")
              and not line.startswith("Allocated inode")]
    if errors:
        raise ProfileDiskError(f"{step} failed: " + "; ".join(errors[:5]))


def _quoted(text: str) -> str:
    """A debugfs argument. Its parser takes double quotes; a name that has one, or a
    control character, cannot be passed, so such a profile is not merged (set aside)."""
    if '"' in text or any(ord(char) < 32 for char in text):
        raise ProfileDiskError(f"the name {text!r} cannot be merged by debugfs")
    return f'"{text}"'

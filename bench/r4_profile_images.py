"""R4's two profile generations and the writes that turn one into the other, with e2fsprogs
and qemu only (no mounts):

* generation A: an ext4 home made from a tree of random files (``mkfs.ext4 -d``, by deskpool);
* generation B: a raw copy of A changed with ``debugfs -w`` (files removed, rewritten, added,
  a directory made), as a guest's session would change it, so the two differ in a few
  hundred scattered blocks, metadata and journal included;
* the write-back: the extents where A and B differ, written by ``qemu-io`` into a session
  overlay in a random order, with short pauses, so a SIGKILL mid-way leaves the torn layer
  a QEMU killed during logoff leaves;
* a generation's identity: the sha256 of every file and directory ``debugfs rdump`` reads
  back, so "exactly A" and "exactly B" are about the user's files, not image bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
MAX_EXTENT = 4 * BLOCK  # one qemu-io write at most: a guest's writes are not one big copy


def run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def make_tree(root: Path, rng: random.Random, *, files: int = 120) -> None:
    """A home of ``files`` random files (1-48 KiB) in a few nested directories."""
    dirs = [root, root / "Documents", root / "Documents" / "notes", root / ".config" / "app",
            root / "Pictures"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for n in range(files):
        path = rng.choice(dirs) / f"file-{n:03}.dat"
        path.write_bytes(rng.randbytes(rng.randint(1, 48) * 1024))


def mutate(raw: Path, rng: random.Random, scratch: Path) -> None:
    """Change the filesystem in ``raw`` as a session would: remove, rewrite and add files."""
    listing = run(["debugfs", "-R", "ls -p /Documents", str(raw)]).stdout
    names = [line.split("/")[5] for line in listing.splitlines()
             if line.count("/") >= 6 and line.split("/")[5].startswith("file-")]
    rng.shuffle(names)
    cmds = ["cd /Documents"]
    for n, name in enumerate(names[:16]):
        cmds.append(f"rm {name}")
        if n % 3:  # two in three rewritten, one in three deleted
            src = scratch / f"new-{name}"
            src.write_bytes(rng.randbytes(rng.randint(2, 64) * 1024))
            cmds.append(f"write {src} {name}")
    cmds += ["mkdir /Documents/session", "cd /Documents/session"]
    for n in range(10):
        src = scratch / f"added-{n}"
        src.write_bytes(rng.randbytes(rng.randint(1, 32) * 1024))
        cmds.append(f"write {src} added-{n}.txt")
    script = scratch / "mutate.debugfs"
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", str(script), str(raw)])


def fsck_clean(raw: Path) -> str | None:
    """None when ``e2fsck -fn`` finds nothing, else its complaint."""
    proc = run(["e2fsck", "-fn", str(raw)], check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return None if proc.returncode == 0 else " / ".join(lines[1:6])[:400]


def tree_digest(raw: Path) -> str:
    """sha256 over every path (type and content) of the filesystem in ``raw``."""
    with tempfile.TemporaryDirectory(prefix="r4-rdump-") as out:
        run(["debugfs", "-R", f"rdump / {out}", str(raw)])
        digest = hashlib.sha256()
        for top, dirs, files in sorted(os.walk(out)):
            dirs.sort()
            rel = os.path.relpath(top, out)
            if rel.split(os.sep)[0] == "lost+found":
                continue
            digest.update(f"D {rel}\n".encode())
            for name in sorted(files):
                data = Path(top, name).read_bytes()
                digest.update(f"F {rel}/{name} {hashlib.sha256(data).hexdigest()}\n".encode())
        return digest.hexdigest()


def flatten_to_raw(qcow2: Path, raw: Path) -> None:
    """The guest's view of a whole chain as one raw file."""
    run(["qemu-img", "convert", "-U", "-O", "raw", str(qcow2), str(raw)])


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int


def differing_extents(a: Path, b: Path) -> list[Extent]:
    """The 4 KiB-aligned runs where ``a`` and ``b`` differ (at most MAX_EXTENT each)."""
    found: list[Extent] = []
    with a.open("rb") as fa, b.open("rb") as fb:
        offset = 0
        while block_a := fa.read(BLOCK):
            if block_a != fb.read(BLOCK):
                last = found[-1] if found else None
                if last and last.offset + last.length == offset and last.length < MAX_EXTENT:
                    found[-1] = Extent(last.offset, last.length + BLOCK)
                else:
                    found.append(Extent(offset, BLOCK))
            offset += BLOCK
    return found


def extent_files(raw: Path, extents: list[Extent], into: Path) -> list[Path]:
    """Each extent's bytes of ``raw`` in a file of its own (qemu-io ``write -s`` reads one)."""
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    with raw.open("rb") as handle:
        for n, extent in enumerate(extents):
            handle.seek(extent.offset)
            path = into / f"{n:05}.bin"
            path.write_bytes(handle.read(extent.length))
            paths.append(path)
    return paths


def writer_command(overlay: Path, extents: list[Extent], sources: list[Path],
                   rng: random.Random, *, spread_ms: int) -> list[str]:
    """``qemu-io`` writing every extent into ``overlay`` in a random order, paused so that the
    whole takes about ``spread_ms``: the guest's write-back at logoff."""
    order = list(range(len(extents)))
    rng.shuffle(order)
    pause = max(1, spread_ms // max(1, len(order)))
    cmd = ["qemu-io", "-f", "qcow2"]
    for n in order:
        cmd += ["-c", f"write -q -s {sources[n]} {extents[n].offset} {extents[n].length}",
                "-c", f"sleep {pause}"]
    # The guest's last act before unplug is a flush; qemu-io then closes the image.
    return [*cmd, "-c", "flush", str(overlay)]

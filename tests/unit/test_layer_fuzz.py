"""Random trees, random changes by the base and by a user working on a real overlayfs mount,
then the rebase's promises checked on what the kernel shows afterwards:

* no silent overwrite: wherever the user had changed something and the desktop now shows
  something else, that path or a directory above it was reported (conflict or note);
* no lost patch: wherever the user had not changed something and the desktop does not show the
  new base's version, it was reported the same way;
* no false report: each conflict and note is somewhere both sides changed;
* rebasing the result onto the same base again changes and reports nothing.

Fixed seeds, so a failure names a reproducible case (``DESKPOOL_LAYER_FUZZ_SEEDS=500`` runs
more of them). Skipped where overlay mounts are not
allowed."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from deskpool.domain.layers import LayerRules
from deskpool.images.layer_rebase import create_layer, rebase_layer
from tests.unit.layer_trees import put, view
from tests.unit.test_layer_overlayfs import mounted

TOPS = ("etc", "opt", "usr", "tmp")  # opt: the user's own area; tmp: excluded
CONTENTS = ("a\n", "b\n", "c\n")
SEEDS = int(os.environ.get("DESKPOOL_LAYER_FUZZ_SEEDS", "40"))  # more: a longer hunt


def grow(root: Path, rng: random.Random) -> None:
    for top in TOPS:
        for i in range(rng.randint(1, 4)):
            put(root, f"/{top}/f{i}", rng.choice(CONTENTS))
        for j in range(rng.randint(0, 2)):
            for i in range(rng.randint(0, 3)):
                put(root, f"/{top}/s{j}/f{i}", rng.choice(CONTENTS))
            (root / top / f"s{j}").mkdir(exist_ok=True)
        if rng.random() < 0.3:
            os.symlink("f0", root / top / "ln")


def _paths(root: Path) -> list[Path]:
    found = []
    for top in TOPS:
        for directory, dirs, files in os.walk(root / top):
            found.extend(Path(directory) / n for n in sorted(dirs + files))
    return sorted(found)


def mutate(root: Path, rng: random.Random, count: int, prefer: tuple[str, ...] = ()) -> None:
    """Random edits, deletions, additions, type changes, chmod/chown, symlink re-pointing;
    ``prefer``: paths to pick more often (where the other side changed something)."""
    for _ in range(count):
        paths = _paths(root)
        if not paths:
            return
        hot = [p for p in paths if "/" + str(p.relative_to(root)) in prefer]
        target = rng.choice(hot if hot and rng.random() < 0.7 else paths)
        op = rng.randrange(8)
        is_dir = target.is_dir() and not target.is_symlink()
        if op == 0 and not is_dir:  # edit
            if target.is_symlink():
                target.unlink()
            target.write_text(rng.choice(CONTENTS))
        elif op == 1:  # delete
            shutil.rmtree(target) if is_dir else target.unlink()
        elif op == 2:  # add a file beside or inside
            where = target if is_dir else target.parent
            (where / f"n{rng.randrange(3)}").unlink(missing_ok=True)
            (where / f"n{rng.randrange(3)}").write_text(rng.choice(CONTENTS))
        elif op == 3 and not is_dir:  # a file becomes a directory
            target.unlink()
            target.mkdir()
            (target / "inner").write_text(rng.choice(CONTENTS))
        elif op == 4 and is_dir:  # a directory becomes a file
            shutil.rmtree(target)
            target.write_text(rng.choice(CONTENTS))
        elif op == 5 and not target.is_symlink():
            os.chmod(target, rng.choice((0o600, 0o640, 0o755, 0o644)))
        elif op == 6 and not target.is_symlink():
            os.chown(target, rng.choice((0, 1000)), 0)
        elif op == 7 and is_dir:  # the directory replaced by a new one
            shutil.rmtree(target)
            target.mkdir()
            (target / "f0").write_text(rng.choice(CONTENTS))


def own(root: Path, paths: list[str]) -> None:
    put(root, "/var/lib/dpkg/info/pkg.list", "/.\n" + "\n".join(paths) + "\n")


def covered(path: str, reported: set[str]) -> bool:
    return any(path == r or path.startswith(r + "/") or r.startswith(path + "/")
               for r in reported)


def changed_below(path: str, one: dict[str, object], other: dict[str, object]) -> bool:
    return any(one.get(q) != other.get(q) for q in one.keys() | other.keys()
               if q == path or q.startswith(path + "/"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_layers_keep_every_promise(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    old, new, layer = tmp_path / "old", tmp_path / "new", tmp_path / "layer"
    grow(old, rng)
    shutil.copytree(old, new, symlinks=True)
    mutate(new, rng, rng.randint(2, 8))
    every = sorted({"/" + str(p.relative_to(r)) for r in (old, new) for p in _paths(r)})
    owned = [p for p in every if rng.random() < 0.5]
    own(old, owned)
    own(new, owned)
    create_layer(layer, "v1")
    ns = rng.choice(("trusted", "user"))
    old_view, new_view = view(None, old), view(None, new)
    hot = tuple(p for p in old_view.keys() | new_view.keys()
                if old_view.get(p) != new_view.get(p))
    with mounted(old, layer, tmp_path / "mnt", ns) as root:
        mutate(root, rng, rng.randint(2, 10), hot)
        user_view = view(None, root)
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1",
                          new_version="v2")
    with mounted(new, tmp_path / "out", tmp_path / "mnt2", ns) as root:
        final = view(None, root)
    assert final == view(tmp_path / "out" / "upper", new)
    rules = LayerRules()
    reported = {c.path for c in report.conflicts} | {n.path for n in report.notes}
    copies = {c.user_copy for c in report.conflicts if c.user_copy}
    for path in sorted(final.keys() | user_view.keys() | new_view.keys()):
        if rules.excluded(path) or any(path == c or path.startswith(c + "/") for c in copies):
            continue
        if user_view.get(path) != old_view.get(path):  # the user changed it
            if final.get(path) != user_view.get(path):
                assert covered(path, reported), f"seed {seed}: {path} overwritten silently"
        elif final.get(path) != new_view.get(path):
            assert covered(path, reported), f"seed {seed}: the patch to {path} was lost"
    for path in reported:
        assert changed_below(path, user_view, old_view), f"seed {seed}: {path} user unchanged"
        assert changed_below(path, new_view, old_view), f"seed {seed}: {path} base unchanged"
    for c in report.conflicts:
        if c.user_copy:
            assert final[c.user_copy] == user_view[c.path]
    again = rebase_layer(new, new, tmp_path / "out", tmp_path / "again", old_version="v2",
                         new_version="v2b")
    assert again.conflicts == [] and again.notes == []
    assert view(tmp_path / "again" / "upper", new) == final

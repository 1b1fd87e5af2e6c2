"""The rebase against the kernel's own overlayfs: a layer made by really using a mounted root
(so whiteouts and opaque directories are the kernel's, not the test's idea of them), rebased,
then mounted on the new base; what the kernel shows must be what the rebase promised and what
the test's independent overlay view computes. Skipped where overlay mounts are not allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deskpool.images.layer_rebase import create_layer, rebase_layer
from tests.unit.layer_trees import mkdirs, put, view

OPTIONS = {"trusted": "redirect_dir=off,metacopy=off", "user": "userxattr"}


@contextmanager
def mounted(lower: Path, layer: Path, target: Path, ns: str) -> Iterator[Path]:
    work = layer / "work"
    shutil.rmtree(work)
    work.mkdir()
    target.mkdir(exist_ok=True)
    opts = f"lowerdir={lower},upperdir={layer / 'upper'},workdir={work},{OPTIONS[ns]}"
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def owned(root: Path, pkg: str, paths: list[str]) -> None:
    put(root, f"/var/lib/dpkg/info/{pkg}.list", "\n".join(["/.", *paths]) + "\n")


def bases(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    for root, v in ((old, "1"), (new, "2")):
        mkdirs(root, "/tmp")
        put(root, "/etc/pkg/main.conf", f"main v{v}\n")  # owned, patched
        put(root, "/etc/site.conf", f"site v{v}\n")  # unowned, patched
        put(root, "/etc/quiet.conf", "quiet\n")  # owned, not patched
        put(root, "/etc/machine-id", f"id{v}\n")
        for i in range(3):
            put(root, f"/usr/share/doc/d{i}", "doc\n")
            put(root, f"/usr/share/theme/t{i}", f"theme v{v if i == 0 else 1}\n")
        owned(root, "pkg", ["/etc/pkg/main.conf", "/etc/quiet.conf", "/usr/share/theme/t0",
                            "/usr/share/theme/t1", "/usr/share/theme/t2"])
    put(new, "/usr/share/theme/added", "new\n")
    return old, new


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_kernel_made_layer_rebased_and_mounted_on_the_new_base(tmp_path: Path, ns: str) -> None:
    old, new = bases(tmp_path)
    layer = tmp_path / "layer"
    create_layer(layer, "v1")
    with mounted(old, layer, tmp_path / "mnt", ns) as root:  # the user at work
        (root / "etc/pkg/main.conf").write_text("main mine\n")
        (root / "etc/site.conf").write_text("site mine\n")
        os.chmod(root / "etc/quiet.conf", 0o600)
        (root / "etc/machine-id").write_text("stale\n")
        (root / "usr/share/doc/d0").unlink()
        shutil.rmtree(root / "usr/share/theme")
        (root / "usr/share/theme").mkdir()
        (root / "usr/share/theme/mine").write_text("my theme\n")
        (root / "opt/app").mkdir(parents=True)
        (root / "opt/app/run").write_text("#!/bin/sh\n")
        os.symlink("/opt/app/run", root / "usr/share/doc/d1.link")
        user_view = view(None, root)
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1",
                          new_version="v2")
    assert {c.path: c.user_copy for c in report.conflicts} == {
        "/etc/pkg/main.conf": "/etc/pkg/main.conf.deskpool-conflict",
        "/usr/share/theme/t0": None,  # deleted with the directory, patched by the base
    }
    assert [n.path for n in report.notes] == ["/etc/site.conf"]
    assert report.excluded == 1
    out = tmp_path / "out"
    with mounted(new, out, tmp_path / "mnt2", ns) as root:
        seen = view(None, root)
        assert (root / "etc/pkg/main.conf").read_text() == "main v2\n"
        assert (root / "etc/pkg/main.conf.deskpool-conflict").read_text() == "main mine\n"
        assert (root / "etc/site.conf").read_text() == "site mine\n"
        assert (root / "etc/quiet.conf").stat().st_mode & 0o777 == 0o600
        assert (root / "etc/machine-id").read_text() == "id2\n"
        assert not (root / "usr/share/doc/d0").exists()
        assert sorted(os.listdir(root / "usr/share/theme")) == ["added", "mine", "t0"]
        assert (root / "usr/share/theme/t0").read_text() == "theme v2\n"
        assert (root / "opt/app/run").read_text() == "#!/bin/sh\n"
        assert os.readlink(root / "usr/share/doc/d1.link") == "/opt/app/run"
    assert seen == view(out / "upper", new)  # the kernel agrees with the test's own view
    for path in ("/opt/app/run", "/etc/quiet.conf", "/usr/share/theme/mine"):
        assert seen[path] == user_view[path]

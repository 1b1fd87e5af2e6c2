"""The user layer's rebase as the guest runs it at boot: the engine's modules go into every
image flavor and import nothing else of deskpool (the guest has no more of it), and the
runner the initramfs calls (``usr/lib/deskpool/layer-rebase``) rebases a layer disk's tree,
leaving a report, or on failure the reason and the layer as it was."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deskpool.domain.layers import LayerError
from deskpool.images.layer_rebase import LayerDisk, read_manifest
from deskpool.images.recipe import (
    ENGINE_DIR,
    ENGINE_MODULES,
    GUEST_FILES_DIR,
    PACKAGE_DIR,
    Flavor,
    recipe_for,
)
from deskpool.images.user_layer_disk import build_layer_disk, read_layer_file
from tests.unit.layer_trees import put

RUNNER = GUEST_FILES_DIR / "usr/lib/deskpool/layer-rebase"
INITRAMFS = GUEST_FILES_DIR / "etc/initramfs-tools/scripts/local-bottom/deskpool-layer"


@pytest.mark.parametrize("flavor", list(Flavor))
def test_every_flavor_carries_the_engine_the_runner_and_python(flavor: Flavor) -> None:
    recipe = recipe_for(flavor)
    files = dict(recipe.guest_files())
    for module in ENGINE_MODULES:
        assert files[f"{ENGINE_DIR}/{module}"] == PACKAGE_DIR / module
    assert "usr/lib/deskpool/layer-rebase" in files
    assert "etc/initramfs-tools/scripts/local-bottom/deskpool-layer" in files
    assert "python3-minimal" in recipe.packages and "libpython3.11-stdlib" in recipe.packages


def test_the_engine_imports_no_deskpool_module_it_does_not_ship() -> None:
    shipped = {"deskpool." + m.removesuffix(".py").replace("/", ".") for m in ENGINE_MODULES}
    for module in ENGINE_MODULES:
        tree = ast.parse((PACKAGE_DIR / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deskpool"):
                assert node.module in shipped, f"{module} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("deskpool") for a in node.names), module


def test_the_initramfs_script_is_valid_shell_and_calls_the_runner_as_it_expects() -> None:
    subprocess.run(["sh", "-n", str(INITRAMFS)], check=True)
    text = INITRAMFS.read_text()
    assert "/usr/lib/deskpool/layer-rebase /run/layer /run/old / " in text
    assert "deskpool.layer_version=" in text and "deskpool-layer-base" in text


def _world(tmp_path: Path) -> tuple[Path, Path, Path]:
    old, new, disk = tmp_path / "old", tmp_path / "new", tmp_path / "disk"
    put(old, "/etc/issue", "v1\n")
    put(new, "/etc/issue", "v2\n")
    put(old, "/etc/kept.conf", "base\n")
    put(new, "/etc/kept.conf", "base\n")
    layer = LayerDisk.create(disk, "1")
    put(layer.current() / "upper", "/etc/kept.conf", "mine\n")
    put(layer.current() / "upper", "/opt/tool/run", "tool\n")
    return old, new, disk


def _run(disk: Path, old: Path, new: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RUNNER), str(disk), str(old), str(new), version],
                          capture_output=True, text=True, check=False)


def test_the_runner_rebases_the_disk_and_leaves_its_report(tmp_path: Path) -> None:
    old, new, disk = _world(tmp_path)
    done = _run(disk, old, new, "2")
    assert done.returncode == 0, done.stderr
    assert "rebased from version 1 to 2" in done.stderr
    current = LayerDisk(disk).current()
    assert current.name == "2" and read_manifest(current).base_version == "2"
    assert (current / "upper/etc/kept.conf").read_text() == "mine\n"
    assert (current / "upper/opt/tool/run").read_text() == "tool\n"
    report = json.loads((disk / "rebase-report.json").read_text())
    assert (report["old_version"], report["new_version"]) == ("1", "2")
    assert "/etc/kept.conf" in report["kept"] and not (disk / "rebase-error.txt").exists()
    assert _run(disk, old, new, "2").returncode == 0  # a re-run (a crash after the switch)
    assert LayerDisk(disk).current().name == "2"


def test_a_failed_rebase_leaves_the_reason_and_the_layer_as_it_was(tmp_path: Path) -> None:
    old, new, disk = _world(tmp_path)
    manifest = LayerDisk(disk).current() / ".deskpool/manifest.json"
    manifest.write_text("{ not json")
    done = _run(disk, old, new, "2")
    assert done.returncode == 1
    reason = (disk / "rebase-error.txt").read_text()
    assert "rebasing the user layer onto version 2 failed" in reason and "manifest" in reason
    assert LayerDisk(disk).current().name == "1"  # still the layer the user had
    assert (LayerDisk(disk).current() / "upper/etc/kept.conf").read_text() == "mine\n"
    assert _run(disk, old, new, "2").returncode == 1  # and it says so again, changing nothing


def test_the_host_reads_a_failed_rebase_s_reason_from_the_layer_disk(tmp_path: Path) -> None:
    disk = build_layer_disk(tmp_path / "layer.qcow2", size_mib=64, version="1")
    assert read_layer_file(disk, "rebase-error.txt") is None  # a fresh layer: no failure
    tree = tmp_path / "tree"
    LayerDisk.create(tree, "1")
    (tree / "rebase-error.txt").write_text("rebasing the user layer onto version 2 failed\n")
    raw = tmp_path / "written.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raw), "64M"],
                   check=True, capture_output=True)
    assert read_layer_file(raw, "rebase-error.txt") == (
        "rebasing the user layer onto version 2 failed\n")
    with pytest.raises(LayerError, match="not a file name"):
        read_layer_file(disk, "../etc/passwd")

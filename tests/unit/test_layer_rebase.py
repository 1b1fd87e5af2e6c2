"""The user layer's rebase around the merge itself: the manifest, crashes at every step,
re-runs, generations on a layer disk, rules, and unsupported layers."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from deskpool.domain.layer_manifest import Manifest, ManifestEntry, parse_manifest
from deskpool.domain.layers import (
    DEFAULT_EXCLUSIONS,
    LayerError,
    LayerRules,
    ManifestError,
    conflict_name,
)
from deskpool.images import layer_tree
from deskpool.images.layer_rebase import (
    MANIFEST,
    LayerDisk,
    create_layer,
    read_manifest,
    rebase_layer,
    record_changes,
    write_manifest,
)
from tests.unit.layer_trees import put, snapshot, view, whiteout
from tests.unit.test_layer_planted import build


class Crash(Exception):
    pass


def crash_at(name: str):  # type: ignore[no-untyped-def]
    def hook(step: str) -> None:
        if step == name:
            raise Crash(step)
    return hook


def small_world(tmp_path: Path) -> tuple[Path, Path, Path]:
    old, new, layer = tmp_path / "old", tmp_path / "new", tmp_path / "layer"
    put(old, "/etc/a.conf", "a1\n")
    put(new, "/etc/a.conf", "a2\n")
    put(old, "/etc/b.conf", "b\n")
    put(new, "/etc/b.conf", "b\n")
    create_layer(layer, "v1")
    put(layer / "upper", "/etc/b.conf", "mine\n")
    put(layer / "upper", "/opt/x/y", "new\n")
    return old, new, layer


# --- manifest -------------------------------------------------------------------------------


def test_manifest_round_trip_and_checksum() -> None:
    manifest = Manifest("v3", {"/etc/x": ManifestEntry("v3", "a" * 64),
                               "/opt/y": ManifestEntry("v2", None)}, 4, "f" * 64)
    assert parse_manifest(manifest.dumps()) == manifest
    data = json.loads(manifest.dumps())
    data["files"]["/etc/x"]["base_version"] = "v1"  # edited without fixing the checksum
    with pytest.raises(ManifestError, match="fails its checksum"):
        parse_manifest(json.dumps(data))


@pytest.mark.parametrize(("text", "message"), [
    ("", "not valid JSON"),
    ('{"format": 1, "base_vers', "not valid JSON"),
    ("[]", "not a JSON object"),
    ('{"format": 2}', "has format 2"),
    ('{"format": 1, "base_version": "", "generation": 1, "files": {}}', "names no base"),
    ('{"format": 1, "base_version": "v1", "generation": 0, "files": {}}', "bad generation"),
    ('{"format": 1, "base_version": "v1", "generation": 1}', "no file table"),
    ('{"format": 1, "base_version": "v1", "generation": 1, "files": {"etc/x": {}}}',
     "bad path 'etc/x'"),
    ('{"format": 1, "base_version": "v1", "generation": 1, "files": {"/a/../b": {}}}',
     "bad path"),
    ('{"format": 1, "base_version": "v1", "generation": 1, "files": '
     '{"/a": {"base_version": "v1", "base": "xyz"}}}', "malformed entry for /a"),
])
def test_bad_manifests_are_named(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_corrupt_or_missing_manifest_leaves_the_layer_untouched(tmp_path: Path,
                                                                damage: str) -> None:
    old, new, layer = small_world(tmp_path)
    path = layer / MANIFEST
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    else:
        path.write_bytes(b"\xff\xfe not json")
    before = snapshot(layer)
    with pytest.raises(ManifestError) as err:
        rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    assert str(path) in str(err.value) or str(layer) in str(err.value)
    assert snapshot(layer) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_layer_on_another_version_is_refused(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    with pytest.raises(LayerError, match="sits on version v1, not v0"):
        rebase_layer(old, new, layer, tmp_path / "out", old_version="v0", new_version="v2")


def test_manifest_ancestor_is_what_the_user_saw(tmp_path: Path) -> None:
    """A file the manifest says was made against the new base's content is no conflict even if
    the old root differs there (it was carried over a rebase already)."""
    old, new, layer = small_world(tmp_path)
    put(layer / "upper", "/etc/a.conf", "mine\n")
    m = read_manifest(layer)
    a2 = layer_tree.read_entry(new / "etc/a.conf", in_layer=False)
    assert a2 is not None
    write_manifest(layer, Manifest("v1", {"/etc/a.conf": ManifestEntry("v1", a2.fingerprint())},
                                   m.generation))
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    assert "/etc/a.conf" in report.kept and not report.conflicts and not report.notes


def test_manifest_write_is_atomic(tmp_path: Path) -> None:
    create_layer(tmp_path / "l", "v1")
    write_manifest(tmp_path / "l", Manifest("v2"))
    assert read_manifest(tmp_path / "l").base_version == "v2"
    assert sorted(p.name for p in (tmp_path / "l/.deskpool").iterdir()) == ["manifest.json"]


# --- crash safety and re-runs ---------------------------------------------------------------


def _clean_result(tmp_path: Path) -> dict[str, tuple[object, ...]]:
    p = build(tmp_path / "clean", "trusted")
    rebase_layer(p.old, p.new, tmp_path / "clean/layer", tmp_path / "clean/out",
                 old_version="v1", new_version="v2")
    return snapshot(tmp_path / "clean/out")


@pytest.mark.parametrize("step", ["started", "mid-write", "tree-written", "manifest-written",
                                  "renamed"])
def test_crash_at_any_step_then_rerun_gives_the_same_layer(tmp_path: Path, step: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    expected = _clean_result(tmp_path)
    p = build(tmp_path / "w", "trusted")
    layer, out = tmp_path / "w/layer", tmp_path / "w/out"
    before = snapshot(layer)
    with monkeypatch.context() as patch:
        hook = None
        if step == "mid-write":
            real, calls = layer_tree.LayerWriter.entry, []

            def dying(self, path, entry, source):  # type: ignore[no-untyped-def]
                calls.append(path)
                if len(calls) == 40:
                    raise Crash(path)
                real(self, path, entry, source)
            patch.setattr(layer_tree.LayerWriter, "entry", dying)
        else:
            hook = crash_at(step)
        with pytest.raises(Crash):
            rebase_layer(p.old, p.new, layer, out, old_version="v1", new_version="v2",
                         on_step=hook)
    assert snapshot(layer) == before  # the old layer is never modified
    assert out.exists() == (step == "renamed")  # the new one exists whole or not at all
    report = rebase_layer(p.old, p.new, layer, out, old_version="v1", new_version="v2")
    assert snapshot(out) == expected
    assert not (tmp_path / "w/out.partial").exists()
    again = rebase_layer(p.old, p.new, layer, out, old_version="v1", new_version="v2")
    assert again == report and snapshot(out) == expected and snapshot(layer) == before


def test_an_existing_output_that_is_another_layer_is_refused(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(LayerError, match="already exists and is not a finished rebase"):
        rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    shutil.rmtree(tmp_path / "out")
    rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    with pytest.raises(LayerError, match="already holds another layer"):
        rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v3")


def test_rebasing_the_result_again_changes_nothing(tmp_path: Path) -> None:
    """Idempotence: the rebased layer onto the same base again is the same view, no reports."""
    p = build(tmp_path, "user")
    out, again = tmp_path / "out", tmp_path / "again"
    rebase_layer(p.old, p.new, tmp_path / "layer", out, old_version="v1", new_version="v2")
    second = rebase_layer(p.new, p.new, out, again, old_version="v2", new_version="v2b")
    assert second.conflicts == [] and second.notes == [] and second.dropped == []
    assert view(again / "upper", p.new) == view(out / "upper", p.new)
    assert read_manifest(again).generation == 3


def test_opaque_marks_follow_the_layers_namespace(tmp_path: Path) -> None:
    for ns in ("trusted", "user"):
        p = build(tmp_path / ns, ns)
        out = tmp_path / ns / "out"
        rebase_layer(p.old, p.new, tmp_path / ns / "layer", out, old_version="v1",
                     new_version="v2")
        tools = out / "upper/opt/tools"  # a directory the user made: opaque in the new layer
        assert os.getxattr(tools, f"{ns}.overlay.opaque") == b"y"


# --- the layer disk: generations and the atomic switch -----------------------------------------


@pytest.mark.parametrize("step", ["renamed", "switched"])
def test_layer_disk_switches_once_even_after_a_crash(tmp_path: Path, step: str) -> None:
    old, new, _ = small_world(tmp_path)
    disk = LayerDisk.create(tmp_path / "disk", "v1")
    put(disk.current() / "upper", "/etc/b.conf", "mine\n")
    whiteout(disk.current() / "upper", "/etc/a.conf")
    first = disk.current()
    with pytest.raises(Crash):
        disk.rebase(old, new, old_version="v1", new_version="v2", on_step=crash_at(step))
    assert (disk.current() == first) == (step == "renamed")
    report = disk.rebase(old, new, old_version="v1", new_version="v2")
    assert disk.current().name == "2" and read_manifest(disk.current()).base_version == "v2"
    assert report.conflicts == [] and report.kept == ["/etc/a.conf", "/etc/b.conf"]
    assert [n.path for n in report.notes] == ["/etc/a.conf"]  # deleted by user, changed by base
    assert disk.rebase(old, new, old_version="v1", new_version="v2") == report
    assert sorted(p.name for p in (disk.root / "generations").iterdir()) == ["1", "2"]
    assert [p.name for p in disk.prune()] == ["1"]
    assert view(disk.current() / "upper", new)["/etc/b.conf"][4] == \
        view(first.parent / "2/upper", new)["/etc/b.conf"][4]


def test_layer_disk_refuses_to_be_created_twice(tmp_path: Path) -> None:
    LayerDisk.create(tmp_path / "d", "v1")
    with pytest.raises(LayerError, match="already holds a user layer"):
        LayerDisk.create(tmp_path / "d", "v1")
    with pytest.raises(LayerError, match="holds no user layer"):
        LayerDisk(tmp_path / "empty").current()


# --- rules and unsupported layers --------------------------------------------------------------


def test_exclusion_globs() -> None:
    rules = LayerRules()
    assert rules.excluded("/tmp/x") and rules.excluded("/tmp/a/b/c")
    assert not rules.excluded("/tmp")  # the directory itself stays as the base has it
    assert rules.excluded("/etc/ssh/ssh_host_rsa_key.pub")
    assert not rules.excluded("/etc/ssh/sshd_config")
    assert rules.excluded("/home/bob/.cache/x/y") and not rules.excluded("/home/bob/.config/x")
    assert rules.excluded("/etc/machine-id") and not rules.excluded("/etc/machine-id2")
    assert rules.in_user_area("/opt/x") and not rules.in_user_area("/optional")
    custom = LayerRules(exclusions=("/srv/[ab]?/*.log",))
    assert custom.excluded("/srv/a1/x.log") and not custom.excluded("/srv/c1/x.log")
    assert not custom.excluded("/etc/machine-id")
    assert "/etc/machine-id" in DEFAULT_EXCLUSIONS
    with pytest.raises(LayerError, match="'var/log' is not an absolute"):
        LayerRules(exclusions=("var/log",))
    with pytest.raises(LayerError, match="user area '/home/' is not"):
        LayerRules(user_areas=("/home/",))


def test_custom_exclusions_are_dropped_unreported(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2",
                          rules=LayerRules(exclusions=("/opt/**",)))
    assert report.excluded == 2 and report.kept == ["/etc/b.conf", "/opt"]  # /opt/x, /opt/x/y
    assert not (tmp_path / "out/upper/opt/x/y").exists()


def test_conflict_names_avoid_taken_paths() -> None:
    taken = {"/etc/x.deskpool-conflict", "/etc/x.deskpool-conflict.2"}
    assert conflict_name("/etc/x", taken.__contains__) == "/etc/x.deskpool-conflict.3"
    assert conflict_name("/var/lib/dpkg/status", lambda _: False) == \
        "/var/lib/deskpool/conflicts/var/lib/dpkg/status.deskpool-conflict"


@pytest.mark.parametrize("attr", ["trusted.overlay.metacopy", "user.overlay.redirect"])
def test_metacopy_and_redirect_layers_are_refused(tmp_path: Path, attr: str) -> None:
    old, new, layer = small_world(tmp_path)
    os.setxattr(layer / "upper/etc/b.conf", attr, b"")
    with pytest.raises(LayerError, match=r"/etc/b\.conf uses overlayfs"):
        rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    assert not (tmp_path / "out").exists()


def test_missing_roots_are_named(tmp_path: Path) -> None:
    old, _new, layer = small_world(tmp_path)
    with pytest.raises(LayerError, match=r"new base root .* is not a directory"):
        rebase_layer(old, tmp_path / "nope", layer, tmp_path / "out", old_version="v1",
                     new_version="v2")


def test_paths_below_a_symlink_in_a_base_are_not_followed(tmp_path: Path) -> None:
    """A base whose /data is an absolute symlink: the layer's /data directory replaces it and
    nothing on the host behind that link is read."""
    old, new, layer = small_world(tmp_path)
    outside = tmp_path / "host-secret"
    put(outside, "/file", "secret\n")
    for root in (old, new):
        os.symlink(outside, root / "data")
    put(layer / "upper", "/data/file", "user's\n")
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    assert "/data/file" in report.kept and not report.conflicts
    assert (tmp_path / "out/upper/data/file").read_text() == "user's\n"


def test_output_inside_the_old_layer_is_refused(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    before = snapshot(layer)
    for out in (layer, layer / "upper" / "new"):
        with pytest.raises(LayerError, match="cannot be inside the old one"):
            rebase_layer(old, new, layer, out, old_version="v1", new_version="v2")
    assert snapshot(layer) == before


def test_hard_links_in_the_layer_stay_links(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    put(layer / "upper", "/usr/lib/git-core/git", "ELF big")
    for name in ("git-add", "git-commit"):
        os.link(layer / "upper/usr/lib/git-core/git", layer / f"upper/usr/lib/git-core/{name}")
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    copies = [tmp_path / f"out/upper/usr/lib/git-core/{n}" for n in ("git", "git-add",
                                                                      "git-commit")]
    assert len({p.stat().st_ino for p in copies}) == 1 and copies[0].stat().st_nlink == 3
    assert report.bytes == len("ELF big") + len("mine\n") + len("new\n")
    assert {"/usr/lib/git-core/git-add", "/usr/lib/git-core/git"} <= set(report.kept)


def test_a_layer_that_no_longer_fits_leaves_everything_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = build(tmp_path, "trusted")
    layer, out = tmp_path / "layer", tmp_path / "out"
    before = snapshot(layer)
    real, calls = shutil.copyfile, []

    def full_disk(src, dst, **kw):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(layer_tree.shutil, "copyfile", full_disk)
        with pytest.raises(LayerError, match=r"does not fit in .* MiB free, the user layer "
                                             r"holds .* the layer on v1 is untouched"):
            rebase_layer(p.old, p.new, layer, out, old_version="v1", new_version="v2")
    assert snapshot(layer) == before
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    rebase_layer(p.old, p.new, layer, out, old_version="v1", new_version="v2")
    assert read_manifest(out).base_version == "v2"


def test_record_changes_pins_each_path_to_the_base_it_was_made_on(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    recorded = record_changes(layer, old)
    b_conf = layer_tree.read_entry(old / "etc/b.conf", in_layer=False)
    assert b_conf is not None
    assert recorded.files["/etc/b.conf"] == ManifestEntry("v1", b_conf.fingerprint())
    assert recorded.files["/opt/x/y"] == ManifestEntry("v1", None)  # the base had nothing
    assert read_manifest(layer) == recorded
    (layer / "upper/opt/x/y").unlink()
    put(layer / "upper", "/etc/b.conf", "edited again\n")
    again = record_changes(layer, new)  # a later record keeps the first ancestor
    assert "/opt/x/y" not in again.files
    assert again.files["/etc/b.conf"] == recorded.files["/etc/b.conf"]
    stamp = (layer / MANIFEST).stat().st_mtime_ns
    assert record_changes(layer, new) == again and (layer / MANIFEST).stat().st_mtime_ns == stamp


def test_three_versions_in_a_row_report_each_conflict_once(tmp_path: Path) -> None:
    """v1 -> v2 -> v3 on one layer disk: a file the user won at v2 is not reported again at v3
    unless v3 changes it; a file kept since v1 is judged against v2 when v3 patches it."""
    roots = {v: tmp_path / v for v in ("v1", "v2", "v3")}
    site = {"v1": "s1\n", "v2": "s2\n", "v3": "s2\n"}  # v3 leaves site.conf alone
    tool = {"v1": "t1\n", "v2": "t1\n", "v3": "t3\n"}  # only v3 patches tool.conf
    for v, root in roots.items():
        put(root, "/etc/site.conf", site[v])
        put(root, "/etc/tool.conf", tool[v])
        put(root, "/var/lib/dpkg/info/tool.list", "/.\n/etc/tool.conf\n")
    disk = LayerDisk.create(tmp_path / "disk", "v1")
    put(disk.current() / "upper", "/etc/site.conf", "mine\n")
    put(disk.current() / "upper", "/etc/tool.conf", "my tool\n")
    record_changes(disk.current(), roots["v1"])
    first = disk.rebase(roots["v1"], roots["v2"], old_version="v1", new_version="v2")
    assert [n.path for n in first.notes] == ["/etc/site.conf"] and first.conflicts == []
    assert first.kept == ["/etc/site.conf", "/etc/tool.conf"]
    record_changes(disk.current(), roots["v2"])
    second = disk.rebase(roots["v2"], roots["v3"], old_version="v2", new_version="v3")
    assert second.notes == []
    assert [(c.path, c.user_copy) for c in second.conflicts] == [
        ("/etc/tool.conf", "/etc/tool.conf.deskpool-conflict")]
    final = view(disk.current() / "upper", roots["v3"])
    assert final["/etc/site.conf"] == view(None, tmp_path / "disk/generations/1/upper")[
        "/etc/site.conf"]
    assert (disk.current() / "upper/etc/tool.conf.deskpool-conflict").read_text() == "my tool\n"
    assert not (disk.current() / "upper/etc/tool.conf").exists()  # v3's shows through
    assert read_manifest(disk.current()).generation == 3


def test_a_crashed_rebase_to_one_version_does_not_block_another(tmp_path: Path) -> None:
    old, new, _ = small_world(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(new, other)
    put(other, "/etc/b.conf", "b3\n")
    disk = LayerDisk.create(tmp_path / "disk", "v1")
    put(disk.current() / "upper", "/etc/b.conf", "mine\n")
    with pytest.raises(Crash):
        disk.rebase(old, new, old_version="v1", new_version="v2", on_step=crash_at("renamed"))
    report = disk.rebase(old, other, old_version="v1", new_version="v3")
    assert read_manifest(disk.current()).base_version == "v3" and disk.current().name == "2"
    assert [n.path for n in report.notes] == ["/etc/b.conf"]  # v3 changed it, v2 had not


def test_xattr_whiteouts_count_as_deletions(tmp_path: Path) -> None:
    old, new, layer = small_world(tmp_path)
    put(layer / "upper", "/etc/a.conf", "")
    os.setxattr(layer / "upper/etc/a.conf", "trusted.overlay.whiteout", b"")
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1", new_version="v2")
    assert [n.path for n in report.notes] == ["/etc/a.conf"]  # deleted; the base changed it
    assert "/etc/a.conf" not in view(tmp_path / "out/upper", new)

"""The planted set the issue asks for: hundreds of files in every class a rebase knows, each with
its expected outcome written down before the rebase runs, then checked exactly: every file
changed by both sides reported, no user change overwritten without a report, no conflict
where only one side changed a file. The result is also checked through an overlay view
computed independently of the rebase code."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deskpool.domain.layers import CONFLICT_SUFFIX, LayerRules
from deskpool.images.layer_rebase import create_layer, read_manifest, rebase_layer
from tests.unit.layer_trees import link, mkdirs, opaque, put, view, whiteout


@dataclass
class Plant:
    old: Path
    new: Path
    upper: Path
    kept: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    conflicts: set[str] = field(default_factory=set)
    notes: set[str] = field(default_factory=set)
    excluded: int = 0
    owned_old: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    owned_new: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    conffiles: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    both_changed: set[str] = field(default_factory=set)

    def base(self, path: str, data: str, *, pkg: str | None = None, new: str | None = None,
             conffile: bool = False) -> None:
        """A file in the old base, and in the new one (``new``: changed there)."""
        put(self.old, path, data)
        put(self.new, path, data if new is None else new)
        if pkg:
            self.owned_old[pkg].append(path)
            self.owned_new[pkg].append(path)
            if conffile:
                self.conffiles[pkg].append(path)

    def write_dpkg(self) -> None:
        for root, owned in ((self.old, self.owned_old), (self.new, self.owned_new)):
            for pkg, paths in owned.items():
                dirs = sorted({p.rsplit("/", 1)[0] for p in paths})
                put(root, f"/var/lib/dpkg/info/{pkg}.list", "\n".join(["/.", *dirs, *paths]))
                if self.conffiles.get(pkg):
                    put(root, f"/var/lib/dpkg/info/{pkg}.conffiles",
                        "\n".join(self.conffiles[pkg]) + "\n")


def stanza(pkg: str, version: str, status: str = "install ok installed") -> str:
    return (f"Package: {pkg}\nStatus: {status}\nPriority: optional\nArchitecture: amd64\n"
            f"Version: {version}\nDescription: {pkg} for tests\n")


def plant(p: Plant) -> None:
    # 1. changed by the user only: kept --------------------------------------------------
    for i in range(15):  # owned files the base did not touch, edited by the user
        p.base(f"/etc/app/app{i}.conf", f"default {i}\n", pkg="appd", conffile=True)
        put(p.upper, f"/etc/app/app{i}.conf", f"user setting {i}\n")
        p.kept.add(f"/etc/app/app{i}.conf")
    mkdirs(p.upper, "/opt/tools")  # a directory the user made, with files
    p.kept.add("/opt/tools")
    for i in range(15):
        put(p.upper, f"/opt/tools/tool{i}", f"#!/bin/sh\necho {i}\n", mode=0o755)
        p.kept.add(f"/opt/tools/tool{i}")
    for i in range(15):  # new files in an existing home
        p.base(f"/home/alice/skel{i}", "skeleton\n")
        put(p.upper, f"/home/alice/notes{i}.txt", f"note {i}\n", uid=1000, gid=1000)
        p.kept.add(f"/home/alice/notes{i}.txt")
    for i in range(10):  # metadata only: chmod / chown of files the base left alone
        p.base(f"/usr/share/data/d{i}", f"data {i}\n", pkg="datapkg")
        put(p.upper, f"/usr/share/data/d{i}", f"data {i}\n",
            mode=0o600 if i % 2 else 0o644, uid=0 if i % 2 else 1000)
        p.kept.add(f"/usr/share/data/d{i}")
    for i in range(10):  # deletions of files the base left alone
        p.base(f"/usr/share/doc/old{i}", "old doc\n", pkg="docs")
        whiteout(p.upper, f"/usr/share/doc/old{i}")
        p.kept.add(f"/usr/share/doc/old{i}")
    for i in range(5):  # symlinks the user re-pointed, the base left alone
        p.base(f"/etc/alt/target{i}", "t\n")
        link(p.old, f"/etc/alt/link{i}", f"target{i}")
        link(p.new, f"/etc/alt/link{i}", f"target{i}")
        link(p.upper, f"/etc/alt/link{i}", f"/etc/alt/target{(i + 1) % 5}")
        p.kept.add(f"/etc/alt/link{i}")
    for i in range(3):  # new symlinks
        link(p.upper, f"/usr/local/bin/mine{i}", "/opt/tools/tool0")
        p.kept.add(f"/usr/local/bin/mine{i}")

    # 2. equal to the new base, or changed by the base alone: dropped, never a conflict --------
    for i in range(15):  # the user made the same change the new base ships
        p.base(f"/etc/same/s{i}", "old\n", pkg="samepkg", new=f"fixed {i}\n")
        put(p.upper, f"/etc/same/s{i}", f"fixed {i}\n")
        p.dropped.add(f"/etc/same/s{i}")
    for i in range(15):  # copied up but unchanged (a touch), base unchanged
        p.base(f"/usr/lib/touched/t{i}", f"lib {i}\n", pkg="libs")
        put(p.upper, f"/usr/lib/touched/t{i}", f"lib {i}\n")
        p.dropped.add(f"/usr/lib/touched/t{i}")
    for i in range(10):  # copied up unchanged, and the base changed it: take the base
        p.base(f"/etc/baseonly/b{i}", "v1\n", pkg="baseonly", new=f"v2 {i}\n")
        put(p.upper, f"/etc/baseonly/b{i}", "v1\n")
        p.dropped.add(f"/etc/baseonly/b{i}")
    for i in range(5):  # deleted by the user and by the new base
        p.base(f"/usr/share/gone/g{i}", "gone\n")
        os.unlink(p.new / f"usr/share/gone/g{i}")
        whiteout(p.upper, f"/usr/share/gone/g{i}")
        p.dropped.add(f"/usr/share/gone/g{i}")

    # 3. changed by both, owned by a package: the new base wins, conflict reported -------------
    for i in range(20):  # configuration files
        path = f"/etc/pkgconf/conf{i}"
        p.base(path, f"setting={i}\n", pkg="pkgconf", new=f"setting={i}\nnew=1\n", conffile=True)
        put(p.upper, path, f"setting={i}-mine\n")
        p.conflicts.add(path)
        p.dropped.add(path)
    for i in range(10):  # programs
        path = f"/usr/bin/tool{i}"
        p.base(path, f"ELF v1 {i}", pkg="tools", new=f"ELF v2 {i}")
        put(p.upper, path, f"ELF patched {i}", mode=0o755)
        p.conflicts.add(path)
        p.dropped.add(path)
    for i in range(5):  # deleted by the user, patched by the base: restored, reported
        path = f"/usr/lib/pkg/removed{i}"
        p.base(path, "v1", pkg="libpkg", new="v2")
        whiteout(p.upper, path)
        p.conflicts.add(path)
        p.dropped.add(path)
    for i in range(5):  # the user's chmod against the base's new content
        path = f"/usr/lib/pkg/mod{i}"
        p.base(path, "v1", pkg="libpkg", new="v2")
        put(p.upper, path, "v1", mode=0o600)
        p.conflicts.add(path)
        p.dropped.add(path)
    for i in range(3):  # symlinks re-pointed by both
        path = f"/etc/pkgalt/link{i}"
        link(p.old, path, "a")
        link(p.new, path, "b")
        p.owned_old["altpkg"].append(path)
        p.owned_new["altpkg"].append(path)
        link(p.upper, path, "c")
        p.conflicts.add(path)
        p.dropped.add(path)

    # 4. changed by both, the user's own file: the user's wins, noted --------------------------
    for i in range(10):
        for area in ("/opt/vendor", "/usr/local/etc"):
            p.base(f"{area}/f{i}", "v1\n", pkg="vendorpkg", new="v2\n")
            put(p.upper, f"{area}/f{i}", "mine\n")
            p.notes.add(f"{area}/f{i}")
            p.kept.add(f"{area}/f{i}")
    for i in range(10):
        p.base(f"/home/alice/.config/c{i}", "v1\n", new="v2\n")
        put(p.upper, f"/home/alice/.config/c{i}", "mine\n", uid=1000, gid=1000)
        p.notes.add(f"/home/alice/.config/c{i}")
        p.kept.add(f"/home/alice/.config/c{i}")
    for i in range(10):  # no package owns them
        p.base(f"/etc/site/s{i}", "v1\n", new="v2\n")
        put(p.upper, f"/etc/site/s{i}", "mine\n")
        p.notes.add(f"/etc/site/s{i}")
        p.kept.add(f"/etc/site/s{i}")

    # 5. excluded: dropped, never reported ---------------------------------------------------
    for path in ("/etc/machine-id", "/etc/hostname", "/var/lib/dbus/machine-id",
                 "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ed25519_key"):
        p.base(path, "base identity\n", new="new identity\n")
        put(p.upper, path, "my identity\n")
        p.excluded += 1
    for i in range(5):
        put(p.upper, f"/var/log/app{i}.log", "log\n")
        put(p.upper, f"/var/cache/apt/c{i}.bin", "cache\n")
        put(p.upper, f"/tmp/scratch{i}", "tmp\n")
        put(p.upper, f"/home/alice/.cache/thumb{i}", "png\n")
        p.excluded += 4
    p.excluded += 1  # the directory /var/cache/apt is below /var/cache/** too
    p.kept.add("/home/alice/.cache")  # a directory the user made; only what is in it is cache


def build(tmp_path: Path, ns: str) -> Plant:
    p = Plant(tmp_path / "old", tmp_path / "new", tmp_path / "layer" / "upper")
    for root in (p.old, p.new):
        for directory in ("/var/lib/dpkg/info", "/tmp", "/var/log", "/var/cache",
                          "/usr/local/bin"):
            mkdirs(root, directory)
    create_layer(tmp_path / "layer", "v1")
    plant(p)
    # 6. an opaque directory: the user replaced a theme directory -------------------------------
    for i in range(5):
        p.base(f"/usr/share/themes/blue/t{i}", f"theme {i}\n", pkg="themes",
               new=f"theme {i} v2\n" if i == 0 else None)
    put(p.new, "/usr/share/themes/blue/added", "new in v2\n")
    opaque(p.upper, "/usr/share/themes/blue", ns)
    for i in range(3):
        put(p.upper, f"/usr/share/themes/blue/mine{i}", "user theme\n")
        p.kept.add(f"/usr/share/themes/blue/mine{i}")
    p.conflicts.add("/usr/share/themes/blue/t0")  # hidden by the user, patched by the base
    # 7. a file that became a directory in the new base ---------------------------------------
    p.base("/etc/kind/conf", "file\n", pkg="kindpkg")
    os.unlink(p.new / "etc/kind/conf")
    put(p.new, "/etc/kind/conf/main", "now a directory\n")
    p.owned_new["kindpkg"].append("/etc/kind/conf/main")
    put(p.upper, "/etc/kind/conf", "user's file\n")
    p.conflicts.add("/etc/kind/conf")
    p.dropped.add("/etc/kind/conf")
    p.base("/opt/kind/thing", "file\n")
    os.unlink(p.new / "opt/kind/thing")
    put(p.new, "/opt/kind/thing/inside", "dir\n")
    put(p.upper, "/opt/kind/thing", "user's file\n")
    p.notes.add("/opt/kind/thing")
    p.kept.add("/opt/kind/thing")
    # 8. a directory the user deleted: kept deleted, unless the base patched files in it ---------
    for i in range(3):
        p.base(f"/usr/share/removed/r{i}", "r\n", pkg="remover")
        p.base(f"/usr/share/removed2/r{i}", "r\n", pkg="remover",
               new="r v2\n" if i == 1 else None)
    whiteout(p.upper, "/usr/share/removed")
    whiteout(p.upper, "/usr/share/removed2")
    p.kept.add("/usr/share/removed")
    p.dropped.add("/usr/share/removed2")
    p.conflicts.add("/usr/share/removed2")
    # 9. dpkg: the user installed a package, the base upgraded one, both changed a third --------
    ancestor = stanza("basepkg", "1.0") + "\n" + stanza("bothpkg", "1.0")
    put(p.old, "/var/lib/dpkg/status", ancestor)
    put(p.new, "/var/lib/dpkg/status", stanza("basepkg", "2.0") + "\n" + stanza("bothpkg", "2.0"))
    put(p.upper, "/var/lib/dpkg/status", stanza("basepkg", "1.0") + "\n"
        + stanza("bothpkg", "1.5") + "\n" + stanza("userpkg", "0.1"))
    put(p.upper, "/var/lib/dpkg/info/userpkg.list", "/.\n/usr/bin/userpkg\n")
    put(p.upper, "/usr/bin/userpkg", "ELF user")
    p.kept.update({"/var/lib/dpkg/status", "/var/lib/dpkg/info/userpkg.list",
                   "/usr/bin/userpkg"})
    p.conflicts.add("/var/lib/dpkg/status")
    p.write_dpkg()
    return p


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_planted_layer_every_class_exactly(tmp_path: Path, ns: str) -> None:
    p = build(tmp_path, ns)
    user_view = view(p.upper, p.old)
    old_view, new_view = view(None, p.old), view(None, p.new)
    out = tmp_path / "out"
    report = rebase_layer(p.old, p.new, tmp_path / "layer", out, old_version="v1",
                          new_version="v2")
    planted = len(p.kept | p.dropped | p.conflicts | p.notes) + p.excluded
    assert planted >= 200

    conflict_paths = {c.path for c in report.conflicts}
    assert conflict_paths == p.conflicts
    assert {n.path for n in report.notes} == p.notes | {"/var/lib/dpkg/status"}
    assert set(report.kept) == p.kept
    assert set(report.dropped) == p.dropped
    assert report.excluded == p.excluded
    # The status file's one conflict is its one package both sides changed.
    status = [c for c in report.conflicts if c.path == "/var/lib/dpkg/status"]
    assert len(status) == 1 and "bothpkg" in status[0].reason

    final = view(out / "upper", p.new)
    rules = LayerRules()
    reported = conflict_paths | {n.path for n in report.notes}

    def under_reported(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in reported)

    # 0 silent overwrites: wherever the user had changed something and the desktop now shows
    # something else, that path (or the directory decided as a whole) was reported.
    for path in sorted(set(user_view) | set(old_view)):
        user_changed = user_view.get(path) != old_view.get(path)
        if user_changed and final.get(path) != user_view.get(path) and not rules.excluded(path):
            assert under_reported(path), f"{path}: the user's change was lost silently"
    # 0 false conflicts: each conflict's path was changed by the user and by the new base.
    for path in conflict_paths - {"/var/lib/dpkg/status"}:
        base_changed = any(new_view.get(q) != old_view.get(q) for q in new_view.keys()
                           | old_view.keys() if q == path or q.startswith(path + "/"))
        assert base_changed and user_view.get(path) != old_view.get(path), path
    # Every conflict's user copy holds what the user had.
    for c in report.conflicts:
        if c.user_copy is not None and c.path != "/var/lib/dpkg/status":
            assert c.user_copy == c.path + CONFLICT_SUFFIX
            assert final[c.user_copy] == user_view[c.path]
        elif c.path != "/var/lib/dpkg/status":
            assert c.path not in user_view  # the user had deleted it
    # What each side's winners look like through the new overlay.
    for path in p.kept - {"/var/lib/dpkg/status"}:  # merged, checked below
        assert final.get(path) == user_view.get(path), path
    for path in p.conflicts - {"/var/lib/dpkg/status"}:
        assert final.get(path) == new_view.get(path), path
    assert final["/usr/share/themes/blue/added"] == new_view["/usr/share/themes/blue/added"]
    assert "/usr/share/themes/blue/t1" not in final  # the user's replacement stands
    assert "/usr/share/removed" not in final
    assert final["/usr/share/removed2/r1"] == new_view["/usr/share/removed2/r1"]
    for path in ("/etc/machine-id", "/etc/hostname", "/var/lib/dbus/machine-id"):
        assert final[path] == new_view[path]
    assert not any(q.startswith(("/var/log/app", "/tmp/scratch")) for q in final)
    # The package database: the user's package still there, the upgrade at its new version.
    merged = (out / "upper/var/lib/dpkg/status").read_text()
    assert "Package: userpkg" in merged and "Version: 0.1" in merged
    assert "Package: basepkg" in merged and "Version: 2.0" in merged
    assert merged.count("Package: bothpkg") == 1 and "Version: 1.5" not in merged
    assert report.bytes > 0
    manifest = read_manifest(out)
    assert manifest.base_version == "v2" and manifest.generation == 2
    assert "/opt/tools/tool0" in manifest.files and "/etc/app/app0.conf" in manifest.files

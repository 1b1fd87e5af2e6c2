"""dpkg itself reads the rebased package database: a package the user installed and one the
new base upgraded, plus one both changed, merged by the rebase and mounted on the new base;
``dpkg --audit`` finds nothing and ``dpkg --verify`` finds every file as its package shipped
it. Skipped without dpkg or overlay mounts."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from deskpool.images.layer_rebase import create_layer, rebase_layer
from tests.unit.layer_trees import mkdirs, put
from tests.unit.test_layer_overlayfs import mounted

pytestmark = pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg")


def stanza(pkg: str, version: str) -> str:
    return (f"Package: {pkg}\nStatus: install ok installed\nPriority: optional\n"
            f"Section: misc\nInstalled-Size: 1\nMaintainer: Tests <t@example.org>\n"
            f"Architecture: all\nVersion: {version}\nDescription: {pkg} for tests\n")


def install(root: Path, pkg: str, version: str, files: dict[str, str]) -> str:
    """Put a package's files and info/ entries in a root; return its status stanza."""
    for path, text in files.items():
        put(root, path, text)
    dirs = sorted({p.rsplit("/", 1)[0] for p in files})
    put(root, f"/var/lib/dpkg/info/{pkg}.list", "\n".join(["/.", *dirs, *files]) + "\n")
    put(root, f"/var/lib/dpkg/info/{pkg}.md5sums", "".join(
        f"{hashlib.md5(t.encode()).hexdigest()}  {p[1:]}\n" for p, t in files.items()))
    return stanza(pkg, version)


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", f"--root={root}", *args], capture_output=True, text=True,
                          check=False)


def test_dpkg_finds_the_merged_database_consistent(tmp_path: Path) -> None:
    old, new, layer = tmp_path / "old", tmp_path / "new", tmp_path / "layer"
    for root in (old, new):
        for d in ("/var/lib/dpkg/info", "/var/lib/dpkg/updates", "/var/lib/dpkg/triggers"):
            mkdirs(root, d)
        put(root, "/var/lib/dpkg/info/format", "1\n")
        put(root, "/var/lib/dpkg/available", "")
    ancestor = (install(old, "basepkg", "1.0", {"/usr/share/basepkg/data": "base 1\n"})
                + "\n" + install(old, "bothpkg", "1.0", {"/usr/share/bothpkg/data": "both 1\n"}))
    put(old, "/var/lib/dpkg/status", ancestor + "\n")
    put(new, "/var/lib/dpkg/status",
        install(new, "basepkg", "2.0", {"/usr/share/basepkg/data": "base 2\n"}) + "\n"
        + install(new, "bothpkg", "2.0", {"/usr/share/bothpkg/data": "both 2\n"}) + "\n")
    assert dpkg(old, "--audit").stdout == ""  # the fixture itself is a sane database
    create_layer(layer, "v1")
    with mounted(old, layer, tmp_path / "mnt", "trusted") as root:  # the user's apt runs
        user = (stanza("basepkg", "1.0") + "\n"
                + install(root, "bothpkg", "1.5", {"/usr/share/bothpkg/data": "both 1.5\n"})
                + "\n" + install(root, "userpkg", "0.1", {"/usr/bin/userpkg": "#!/bin/sh\n"}))
        (root / "var/lib/dpkg/status").write_text(user + "\n")
        assert dpkg(root, "--audit").stdout == ""
    report = rebase_layer(old, new, layer, tmp_path / "out", old_version="v1",
                          new_version="v2")
    assert [c.path for c in report.conflicts] == ["/usr/share/bothpkg/data",
                                                  "/var/lib/dpkg/status"]
    assert "bothpkg" in report.conflicts[1].reason
    with mounted(new, tmp_path / "out", tmp_path / "mnt2", "trusted") as root:
        audit = dpkg(root, "--audit")
        assert (audit.returncode, audit.stdout, audit.stderr) == (0, "", "")
        verify = dpkg(root, "--verify")
        assert (verify.returncode, verify.stdout) == (0, ""), verify.stdout
        listed = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                                 "-f", "${Package} ${Version} ${db:Status-Abbrev}\n"],
                                capture_output=True, text=True, check=True).stdout
        assert listed.splitlines() == ["basepkg 2.0 ii ", "bothpkg 2.0 ii ",
                                       "userpkg 0.1 ii "]
        assert (root / "usr/bin/userpkg").read_text() == "#!/bin/sh\n"
        # The check is a real one: a package without its file list is what --audit reports.
        (root / "var/lib/dpkg/info/userpkg.list").unlink()
        assert "userpkg" in dpkg(root, "--audit").stdout

"""What the user layer's real-VM tests need besides VMs: a patched template version made from
the built image on the host (``debugfs -w`` on a raw copy: no mount), and a small ``.deb`` a
user installs in their desktop.

The patch is what an administrator's update does to a template: one package upgraded (its
version in dpkg's status bumped, a new file of it written and listed), a package-owned
configuration file changed (``/etc/issue``, base-files'), and a new file of the base.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PATCHED_PACKAGE = "zstd"
PATCHED_SUFFIX = "+deskpool.patch1"
PATCHED_ISSUE = "deskpool desktop, patched \\n (\\l)\n"
USER_PACKAGE = "deskpool-user-tool"


def _run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=cwd)
    return done.stdout


def _debugfs_read(raw: Path, path: str) -> str:
    return _run("debugfs", "-R", f"cat {path}", str(raw))


def bump_version(status: str, package: str, suffix: str) -> tuple[str, str]:
    """dpkg's status with ``package``'s version given ``suffix``; returns it and the new
    version."""
    stanzas = status.strip("\n").split("\n\n")
    new_version = None
    for i, stanza in enumerate(stanzas):
        lines = stanza.split("\n")
        if f"Package: {package}" not in lines:
            continue
        for j, line in enumerate(lines):
            if line.startswith("Version: "):
                new_version = line.removeprefix("Version: ") + suffix
                lines[j] = f"Version: {new_version}"
        stanzas[i] = "\n".join(lines)
    assert new_version is not None, f"{package} is not installed in the image"
    return "\n\n".join(stanzas) + "\n", new_version


def patched_image(image: Path, work: Path) -> tuple[Path, str]:
    """A patched copy of the qcow2 ``image`` in ``work``; returns it and the patched
    package's new version."""
    raw = work / "patched.raw"
    _run("qemu-img", "convert", "-O", "raw", str(image), str(raw))
    status, version = bump_version(_debugfs_read(raw, "/var/lib/dpkg/status"),
                                   PATCHED_PACKAGE, PATCHED_SUFFIX)
    listed = _debugfs_read(raw, f"/var/lib/dpkg/info/{PATCHED_PACKAGE}.list")
    files = {"status": status, "issue": PATCHED_ISSUE,
             "list": listed.rstrip("\n") + f"\n/usr/share/doc/{PATCHED_PACKAGE}/PATCHED\n",
             "patched": f"{PATCHED_PACKAGE} {version}\n",
             "release": "deskpool template, version 2\n"}
    for name, text in files.items():
        (work / name).write_text(text)
    requests = [
        "cd /var/lib/dpkg", "rm status", f"write {work / 'status'} status",
        "cd /var/lib/dpkg/info", f"rm {PATCHED_PACKAGE}.list",
        f"write {work / 'list'} {PATCHED_PACKAGE}.list",
        f"cd /usr/share/doc/{PATCHED_PACKAGE}", f"write {work / 'patched'} PATCHED",
        "cd /etc", "rm issue", f"write {work / 'issue'} issue",
        f"write {work / 'release'} deskpool-release",
    ]
    (work / "requests").write_text("\n".join(requests) + "\n")
    _run("debugfs", "-w", "-f", str(work / "requests"), str(raw))
    out = work / "patched.qcow2"
    _run("qemu-img", "convert", "-O", "qcow2", str(raw), str(out))
    raw.unlink()
    return out, version


def user_deb(work: Path) -> Path:
    """A one-file package a user installs with ``dpkg -i``."""
    root = work / USER_PACKAGE
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {USER_PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: deskpool tests <tests@example.invalid>\n"
        "Description: a tool a user installed in their desktop\n")
    tool = root / "usr/bin" / USER_PACKAGE
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho user-tool-works\n")
    tool.chmod(0o755)
    out = work / f"{USER_PACKAGE}_1.0_all.deb"
    _run("dpkg-deb", "--root-owner-group", "--build", str(root), str(out))
    return out

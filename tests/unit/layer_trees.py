"""Building base roots and overlay upper directories for the user-layer tests, and reading them
back: a snapshot of a tree, and an overlay view computed independently of the code under test
(the oracle the rebase's result is checked against)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

Desc = tuple[str, int, int, int, str, tuple[tuple[str, bytes], ...]]
OVERLAY_NS = ("trusted.overlay.", "user.overlay.")


def at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def mkdirs(root: Path, path: str, mode: int = 0o755) -> Path:
    """Create ``path`` and its parents (parents as plain 0755 root directories)."""
    target = at(root, path)
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, mode)
    return target


def put(root: Path, path: str, data: str | bytes, *, mode: int = 0o644, uid: int = 0,
        gid: int = 0) -> Path:
    target = at(root, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(target, uid, gid)
    os.chmod(target, mode)
    return target


def link(root: Path, path: str, target: str) -> None:
    where = at(root, path)
    where.parent.mkdir(parents=True, exist_ok=True)
    if where.is_symlink() or where.exists():
        where.unlink()
    os.symlink(target, where)


def whiteout(upper: Path, path: str) -> None:
    where = at(upper, path)
    where.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(where, stat.S_IFCHR, os.makedev(0, 0))


def opaque(upper: Path, path: str, ns: str = "trusted") -> None:
    where = mkdirs(upper, path)
    os.setxattr(where, f"{ns}.overlay.opaque", b"y")


def _describe(path: Path) -> Desc:
    st = os.lstat(path)
    xattrs = tuple(sorted(
        (n, os.getxattr(path, n, follow_symlinks=False))
        for n in os.listxattr(path, follow_symlinks=False) if not n.startswith(OVERLAY_NS)))
    if stat.S_ISREG(st.st_mode):
        content = hashlib.sha256(path.read_bytes()).hexdigest()
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        content, kind = os.readlink(path), "symlink"
    elif stat.S_ISDIR(st.st_mode):
        content, kind = "", "dir"
    else:
        content, kind = f"{st.st_rdev}", f"dev{stat.S_IFMT(st.st_mode):o}"
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, xattrs)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything in a tree, overlayfs' attributes included (for "left untouched")."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            rel = "/" + str(path.relative_to(root))
            attrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                 for n in os.listxattr(path, follow_symlinks=False)))
            found[rel] = (*_describe(path), attrs)
    return found


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    return any(os.getxattr(path, f"{ns}opaque", follow_symlinks=False) == b"y"
               for ns in OVERLAY_NS
               if f"{ns}opaque" in os.listxattr(path, follow_symlinks=False))


def view(upper: Path | None, lower: Path) -> dict[str, Desc]:
    """What a guest sees through an overlay of ``upper`` on ``lower`` (``None``: lower alone)."""
    result: dict[str, Desc] = {}

    def walk(rel: str, up: Path | None, low: Path | None) -> None:
        names: set[str] = set()
        up_opaque = up is not None and _is_opaque(up)
        if up is not None:
            names.update(os.listdir(up))
        if low is not None and not up_opaque:
            names.update(os.listdir(low))
        for name in sorted(names):
            u = up / name if up is not None and os.path.lexists(up / name) else None
            lo = (low / name if low is not None and not up_opaque
                  and os.path.lexists(low / name) else None)
            if u is not None and _is_whiteout(u):
                continue
            top = u if u is not None else lo
            assert top is not None
            path = f"{rel}/{name}"
            result[path] = _describe(top)
            if stat.S_ISDIR(os.lstat(top).st_mode):
                merges = (lo is not None and stat.S_ISDIR(os.lstat(lo).st_mode)
                          and (u is None or not _is_opaque(u)))
                walk(path, u, lo if merges else None)

    walk("", upper, lower)
    return result

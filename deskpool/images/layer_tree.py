"""Reading and writing the trees a user-layer rebase works on: base roots and overlay layers.

An overlayfs upper directory records a deletion as a *whiteout* (a character device 0/0) and a
replaced directory as an *opaque* one (xattr ``trusted.overlay.opaque=y``, or
``user.overlay.opaque=y`` when mounted with ``userxattr``). Both are read and written here.
Layers made with ``metacopy`` or ``redirect_dir`` (data or names living in the lower layer)
are refused: their upper files alone do not say what the user sees.

Base roots are read without ever following a symlink out of them: a path below a symlink
does not exist in that tree (overlayfs looks paths up one component at a time, too).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.layers import (
    DPKG_INFO,
    Entry,
    Kind,
    LayerError,
    Ownership,
    owned_aliases,
)

OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")
_UNSUPPORTED = ("metacopy", "redirect")


def host_path(root: Path, path: str) -> Path:
    """``/etc/hosts`` below ``root``."""
    return root / path.lstrip("/") if path != "/" else root


def _xattrs(path: Path) -> tuple[list[tuple[str, bytes]], dict[str, bytes]]:
    """(the file's own attributes, overlayfs' attributes by short name)."""
    own: list[tuple[str, bytes]] = []
    overlay: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return own, overlay
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        prefix = next((p for p in OVERLAY_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            own.append((name, value))
        else:
            overlay[name[len(prefix):]] = value
    return own, overlay


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_entry(path: Path, *, in_layer: bool, name: str = "") -> Entry | None:
    """What is at ``path`` (not following a symlink), or ``None``; ``name`` for errors."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    own, overlay = _xattrs(path)
    if in_layer:
        for key in _UNSUPPORTED:
            if key in overlay:
                raise LayerError(f"{name or path} uses overlayfs {key} (mount the layer with "
                                 f"metacopy=off,redirect_dir=off): the rebase cannot read it")
    if in_layer and ((stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or "whiteout" in overlay):
        return Entry(Kind.WHITEOUT)  # a 0/0 device, or the newer kernels' xattr whiteout
    mode, uid, gid, xattrs = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, tuple(own)
    if stat.S_ISREG(st.st_mode):
        return Entry(Kind.FILE, mode, uid, gid, sha256_of(path), xattrs)
    if stat.S_ISDIR(st.st_mode):
        opaque = in_layer and overlay.get("opaque") == b"y"
        return Entry(Kind.DIR, mode, uid, gid, xattrs=xattrs, opaque=opaque)
    if stat.S_ISLNK(st.st_mode):
        return Entry(Kind.SYMLINK, mode, uid, gid, "->" + os.readlink(path), xattrs=xattrs)
    device = f"{stat.S_IFMT(st.st_mode):o}:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return Entry(Kind.DEVICE, mode, uid, gid, device, xattrs=xattrs)


class BaseTree:
    """A template version's root filesystem, read on demand and remembered."""

    def __init__(self, root: Path, label: str) -> None:
        if not root.is_dir():
            raise LayerError(f"the {label} root {root} is not a directory")
        self.root, self.label = root, label
        self._entries: dict[str, Entry | None] = {}
        self._owners: dict[str, Ownership] | None = None

    def entry(self, path: str) -> Entry | None:
        if path not in self._entries:
            parent = path.rsplit("/", 1)[0]
            up = self.entry(parent) if parent else None
            if parent and (up is None or not up.is_dir):
                self._entries[path] = None  # below a file, a symlink or nothing
            else:
                self._entries[path] = read_entry(host_path(self.root, path), in_layer=False)
        return self._entries[path]

    def descendants(self, path: str) -> Iterator[str]:
        """Every path below ``path`` (nothing when it is not a directory), parents first."""
        found = self.entry(path)
        if found is None or not found.is_dir:
            return
        try:
            names = sorted(os.listdir(host_path(self.root, path)))
        except OSError as exc:
            raise LayerError(f"cannot list {path} in the {self.label} ({exc})") from exc
        for name in names:
            child = f"{path}/{name}"
            yield child
            yield from self.descendants(child)

    def owners(self) -> dict[str, Ownership]:
        """Every path a package of this base ships, from dpkg's ``*.list`` and ``*.conffiles``."""
        if self._owners is None:
            self._owners = {}
            info = host_path(self.root, DPKG_INFO)
            if info.is_dir():
                for item in sorted(info.iterdir()):
                    package = item.name.rsplit(".", 1)[0].split(":")[0]
                    if item.suffix in (".list", ".conffiles"):
                        conffile = item.suffix == ".conffiles"
                        for line in item.read_text(errors="replace").splitlines():
                            line = line.strip()
                            if line.startswith("/") and line != "/.":
                                for alias in owned_aliases(line.rstrip("/")):
                                    if conffile or alias not in self._owners:
                                        self._owners[alias] = Ownership(package, conffile)
        return self._owners


def scan_layer(upper: Path) -> tuple[dict[str, Entry], bool]:
    """Every entry of an overlay upper directory by guest path, parents first, and whether it
    carries overlayfs' attributes in the ``user.`` namespace (mounted with ``userxattr``)."""
    if not upper.is_dir():
        raise LayerError(f"the layer's upper directory {upper} is missing")
    entries: dict[str, Entry] = {}
    userxattr = False

    def walk(directory: Path, prefix: str) -> None:
        nonlocal userxattr
        for name in sorted(os.listdir(directory)):
            path, host = f"{prefix}/{name}", directory / name
            found = read_entry(host, in_layer=True, name=path)
            if found is None:
                raise LayerError(f"{path} vanished from the layer while it was read")
            entries[path] = found
            if found.opaque and any(n.startswith("user.overlay.")
                                    for n in os.listxattr(host, follow_symlinks=False)):
                userxattr = True
            if found.is_dir:
                walk(host, path)

    walk(upper, "")
    return entries, userxattr


@dataclass(frozen=True)
class Source:
    """Where a chosen entry's bytes and metadata come from (a host path), or literal bytes."""

    path: Path | None
    data: bytes | None = None


class LayerWriter:
    """Writes a new upper directory: entries copied with their owner, mode and attributes."""

    def __init__(self, upper: Path, *, userxattr: bool) -> None:
        self.upper = upper
        self.opaque_xattr = ("user" if userxattr else "trusted") + ".overlay.opaque"
        self.bytes = 0
        self.written: list[str] = []
        self._links: dict[tuple[int, int], Path] = {}  # source inode -> its first copy
        upper.mkdir(parents=True)

    def _meta(self, dst: Path, entry: Entry, *, symlink: bool = False) -> None:
        os.chown(dst, entry.uid, entry.gid, follow_symlinks=False)
        if not symlink:
            os.chmod(dst, entry.mode)
        for name, value in entry.xattrs:
            os.setxattr(dst, name, value, follow_symlinks=False)

    def _link(self, source: Path, dst: Path) -> bool:
        """Hard links stay hard links (a package dpkg unpacked into the layer may have many):
        a file whose source inode was copied already becomes a link to that copy."""
        st = os.lstat(source)
        if st.st_nlink < 2:
            return False
        first = self._links.setdefault((st.st_dev, st.st_ino), dst)
        if first == dst:
            return False
        os.link(first, dst)
        return True

    def has(self, path: str) -> bool:
        return os.path.lexists(host_path(self.upper, path))

    def directory(self, path: str, entry: Entry, *, opaque: bool = False) -> None:
        dst = host_path(self.upper, path)
        if not dst.is_dir():
            dst.mkdir()
            self.written.append(path)
        self._meta(dst, entry)
        if opaque:
            os.setxattr(dst, self.opaque_xattr, b"y")

    def whiteout(self, path: str) -> None:
        os.mknod(host_path(self.upper, path), stat.S_IFCHR, os.makedev(0, 0))
        self.written.append(path)

    def entry(self, path: str, entry: Entry, source: Source) -> None:
        """Copy a non-directory (``source.data``: write those bytes with ``entry``'s metadata)."""
        dst = host_path(self.upper, path)
        if entry.kind is Kind.FILE and source.path is not None and self._link(source.path, dst):
            self.written.append(path)
            return
        if entry.kind is Kind.FILE:
            if source.data is not None:
                dst.write_bytes(source.data)
            else:
                assert source.path is not None
                shutil.copyfile(source.path, dst, follow_symlinks=False)
            self.bytes += dst.stat().st_size
            self._meta(dst, entry)
        elif entry.kind is Kind.SYMLINK:
            assert source.path is not None
            os.symlink(os.readlink(source.path), dst)
            self._meta(dst, entry, symlink=True)
        elif entry.kind is Kind.DEVICE:
            assert source.path is not None
            st = os.lstat(source.path)
            os.mknod(dst, stat.S_IFMT(st.st_mode) | entry.mode, st.st_rdev)
            self._meta(dst, entry)
        else:
            raise LayerError(f"cannot write a {entry.kind} at {path}")
        if source.path is not None:
            st = os.lstat(source.path)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        self.written.append(path)


def sync_filesystem(path: Path) -> None:
    """Flush everything written on ``path``'s filesystem: one ``syncfs`` instead of an fsync
    per file (thousands of them cost most of a rebase's time)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if int(libc.syncfs(fd)) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs of {path} failed")
    except AttributeError:  # a libc without syncfs
        os.sync()
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

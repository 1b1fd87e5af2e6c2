"""The user layer: what a file is, and who wins when a layer is rebased on a new template version.

A stateful desktop keeps the user's changes to the system at file level, as the upper directory
of an overlayfs root whose lower directory is the template version's filesystem. At a rollout
each path the layer touches is compared three ways: the *ancestor* (the base the user's change
was made against), the *user's* view (the layer over the old base) and the *new base*:

* only the user changed it: the user's copy is kept;
* the user's copy equals the new base, or only the base changed it: dropped from the layer;
* both changed it: for files a package owns the new base wins and the user's copy is kept
  beside it (``NAME.deskpool-conflict``) with a conflict reported; for the user's own files
  (``/home``, ``/root``, ``/usr/local``, ``/opt`` and anything no package owns) the user's copy
  wins, reported as a note, never silently.

Pure data and decisions; the tree walking lives in ``deskpool.images.layer_rebase``.
Paths here are absolute POSIX paths of the guest's root (``/etc/hosts``), never host paths.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from deskpool.domain.errors import PermanentError

CONFLICT_SUFFIX = ".deskpool-conflict"

# What the rebase drops whatever happened to it: caches, logs, scratch space, and the machine's
# identity (deskpool gives every desktop its own at boot, so a copy in the layer is stale).
# (Guest paths matched in a layer, not temp files of this process.)
_GUEST_SCRATCH = ("/tmp/**", "/var/tmp/**")  # nosec B108
DEFAULT_EXCLUSIONS: tuple[str, ...] = (
    *_GUEST_SCRATCH, "/run/**", "/var/run/**", "/var/lock/**",
    "/var/cache/**", "/var/log/**", "/var/backups/**", "/var/crash/**",
    "/home/*/.cache/**", "/root/.cache/**", "/home/*/.xsession-errors*",
    "/var/lib/apt/lists/**", "/var/lib/dhcp/*.leases", "/var/lib/systemd/random-seed",
    "/var/lib/dpkg/lock*", "/var/lib/dpkg/*-old", "/var/lib/dpkg/status-new",
    "/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/hostname", "/etc/ssh/ssh_host_*",
    "/etc/krb5.keytab", "/lost+found/**", "/swapfile",
    # deskpool's record of the identity it applied: stale in a rebased layer, where the
    # identity files above are dropped, so the next boot must apply it again.
    "/var/lib/deskpool/identity",
)

# Where the user's copy wins even over a package's file: their homes and the local trees
# Debian policy leaves to the machine's administrator.
DEFAULT_USER_AREAS: tuple[str, ...] = ("/home", "/root", "/usr/local", "/opt")

DPKG_DIR = "/var/lib/dpkg"
DPKG_STATUS = "/var/lib/dpkg/status"
DPKG_INFO = "/var/lib/dpkg/info/"
CONFLICT_DIR = "/var/lib/deskpool/conflicts"


class LayerError(PermanentError):
    """The user layer cannot be rebased as it is; it was left untouched."""


class ManifestError(LayerError):
    """The layer's manifest is missing, unreadable or inconsistent."""


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    DEVICE = "device"  # block/char device (not a whiteout), fifo or socket: compared by rdev
    WHITEOUT = "whiteout"  # only ever in a layer: the user deleted what the base has here


@dataclass(frozen=True)
class Entry:
    """One filesystem object as the rebase compares it: type, permissions, owner, content.

    ``content`` is the sha256 of a file's bytes, a symlink's target, or a device's type and
    number; empty for directories (their children are entries of their own). Modification
    times are not compared: a copy-up that changed nothing else is no change.
    """

    kind: Kind
    mode: int = 0o644  # permission bits with setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    content: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted; overlayfs' own attributes left out
    opaque: bool = False  # a layer directory that hides the base's directory below it

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    def fingerprint(self) -> str:
        """A hash of everything the rebase compares (not ``opaque``: that is the layer's)."""
        h = hashlib.sha256()
        for part in (self.kind.value, f"{self.mode:o}", str(self.uid), str(self.gid),
                     self.content):
            h.update(part.encode() + b"\0")
        for name, value in self.xattrs:
            h.update(name.encode() + b"\0" + value + b"\0")
        return h.hexdigest()


def fingerprint(entry: Entry | None) -> str | None:
    """``None`` stands for "nothing at this path" (a whiteout is nothing, too)."""
    if entry is None or entry.kind is Kind.WHITEOUT:
        return None
    return entry.fingerprint()


class Outcome(StrEnum):
    KEPT = "kept"  # only the user changed it: the user's copy stays in the layer
    DROPPED = "dropped"  # equal to the new base, or changed by the base alone
    CONFLICT = "conflict"  # both changed, the new base won, the user's copy kept beside it
    USER_WON = "user_won"  # both changed, the user's own file: the user's copy won (a note)


class Side(StrEnum):
    USER = "user"
    BASE = "base"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    take: Side  # whose version the desktop sees after the rebase
    reason: str = ""


@dataclass(frozen=True)
class Ownership:
    """Which package (of the old or the new base) ships a path, and whether it is a conffile."""

    package: str
    conffile: bool = False

    def describe(self) -> str:
        return (f"configuration file of package {self.package}" if self.conffile
                else f"file of package {self.package}")


def decide(user: str | None, ancestor: str | None, new: str | None, *,
           owner: Ownership | None, user_area: bool) -> Decision:
    """The three-way rule for one path, on fingerprints (``None``: nothing there)."""
    if user == new:
        return Decision(Outcome.DROPPED, Side.BASE, "equal to the new base")
    if ancestor == new:
        return Decision(Outcome.KEPT, Side.USER, "changed by the user only")
    if user == ancestor:
        return Decision(Outcome.DROPPED, Side.BASE, "changed by the new base only")
    what = _change_words(user, ancestor, new)
    if owner is not None and not user_area:
        return Decision(Outcome.CONFLICT, Side.BASE,
                        f"{what}; {owner.describe()}: the new base's version wins")
    whose = "in the user's own area" if user_area else "no package owns it"
    return Decision(Outcome.USER_WON, Side.USER, f"{what}; {whose}: the user's version wins")


def _change_words(user: str | None, ancestor: str | None, new: str | None) -> str:
    mine = "deleted by the user" if user is None else (
        "created by the user" if ancestor is None else "changed by the user")
    theirs = "deleted by the new base" if new is None else (
        "added by the new base" if ancestor is None else "changed by the new base")
    return f"{mine} and {theirs}"


def conflict_name(path: str, taken: Callable[[str], bool]) -> str:
    """Where the user's copy of ``path`` goes: ``NAME.deskpool-conflict``, then ``.2``, ...

    dpkg's database is never given extra files (dpkg would read them as its own): copies of
    anything under ``/var/lib/dpkg`` go below ``/var/lib/deskpool/conflicts`` instead.
    """
    if path == DPKG_DIR or path.startswith(DPKG_DIR + "/"):
        path = CONFLICT_DIR + path
    candidate, n = path + CONFLICT_SUFFIX, 1
    while taken(candidate):
        n += 1
        candidate = f"{path}{CONFLICT_SUFFIX}.{n}"
    return candidate


# --- rules: exclusions and user areas -----------------------------------------------------


def _glob_regex(pattern: str) -> str:
    """``**`` crosses directories, ``*`` and ``?`` stay inside one, ``[...]`` as in fnmatch."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.+")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class LayerRules:
    """What the rebase drops unreported, and where the user's copy always wins."""

    exclusions: tuple[str, ...] = DEFAULT_EXCLUSIONS
    user_areas: tuple[str, ...] = DEFAULT_USER_AREAS
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for pattern in self.exclusions:
            if not pattern.startswith("/"):
                raise LayerError(f"exclusion {pattern!r} is not an absolute path pattern")
        for area in self.user_areas:
            if not area.startswith("/") or area != area.rstrip("/") or area == "":
                raise LayerError(f"user area {area!r} is not an absolute directory path")
        regex = "|".join(f"(?:{_glob_regex(p)})" for p in self.exclusions) or "(?!)"
        object.__setattr__(self, "_regex", re.compile(f"^(?:{regex})$"))

    def excluded(self, path: str) -> bool:
        return self._regex.match(path) is not None

    def in_user_area(self, path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in self.user_areas)


# --- dpkg's database inside a layer ----------------------------------------------------------

_INFO_NAME = re.compile(r"^(?P<pkg>[a-z0-9][a-z0-9+.-]*)(?::[a-z0-9-]+)?\.(?P<ext>[A-Za-z0-9_-]+)$")


def dpkg_info_package(path: str) -> str | None:
    """The package a ``/var/lib/dpkg/info/PKG[:ARCH].EXT`` file belongs to, else ``None``."""
    if not path.startswith(DPKG_INFO) or "/" in path[len(DPKG_INFO):]:
        return None
    found = _INFO_NAME.match(path[len(DPKG_INFO):])
    return found.group("pkg") if found else None


_USRMERGE = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def owned_aliases(path: str) -> tuple[str, ...]:
    """``path`` and its other spelling on a merged-/usr system (``/bin/ls`` = ``/usr/bin/ls``):
    dpkg's lists name whichever spelling the package shipped."""
    for top in _USRMERGE:
        if path.startswith(top + "/"):
            return (path, "/usr" + path)
        if path.startswith("/usr" + top + "/"):
            return (path, path[4:])
    return (path,)


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerConflict:
    path: str
    reason: str
    user_copy: str | None  # where the user's version went; None when the user had deleted it


@dataclass(frozen=True)
class LayerNote:
    path: str
    text: str


@dataclass
class RebaseReport:
    old_version: str
    new_version: str
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    conflicts: list[LayerConflict] = field(default_factory=list)
    notes: list[LayerNote] = field(default_factory=list)
    excluded: int = 0
    bytes: int = 0  # size of the files in the new layer

    def to_json(self) -> dict[str, Any]:
        return {
            "old_version": self.old_version, "new_version": self.new_version,
            "kept": self.kept, "dropped": self.dropped,
            "conflicts": [{"path": c.path, "reason": c.reason, "user_copy": c.user_copy}
                          for c in self.conflicts],
            "notes": [{"path": n.path, "text": n.text} for n in self.notes],
            "excluded": self.excluded, "bytes": self.bytes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RebaseReport:
        try:
            return cls(
                old_version=str(data["old_version"]), new_version=str(data["new_version"]),
                kept=[str(p) for p in data["kept"]], dropped=[str(p) for p in data["dropped"]],
                conflicts=[LayerConflict(str(c["path"]), str(c["reason"]),
                                         None if c["user_copy"] is None else str(c["user_copy"]))
                           for c in data["conflicts"]],
                notes=[LayerNote(str(n["path"]), str(n["text"])) for n in data["notes"]],
                excluded=int(data["excluded"]), bytes=int(data["bytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerError(f"a stored rebase report is malformed ({exc!r})") from exc

"""A second concurrent session of one user: the pool's policy and the file-level
three-way merge of its changes. Pure rules, no I/O.

A user's profile is one filesystem; two desktops cannot both write it. When a user who
already has a session open starts another one (two pools, two desktops), the pool's
``second_session`` policy decides:

* ``refuse``: the hand-over is refused with a message naming the desktop that holds the
  profile; nothing is reserved.
* ``read_only``: the session gets a throw-away overlay; its changes are dropped at logoff
  (the user is told at logon).
* ``merge``: the session gets an overlay like any other. Whichever session logs off first
  commits as usual; the other, finding that a newer generation was committed meanwhile, is
  merged into it file by file against the generation both started from
  (:func:`plan_merge`): a file changed only by one session keeps that change; a file
  changed by both keeps the first committer's version and the other copy is saved beside
  it as ``NAME.conflict-<desktop>``. Zero files are lost, and every overlap is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePosixPath

from deskpool.domain.errors import InvalidInput


class SecondSession(StrEnum):
    REFUSE = "refuse"
    READ_ONLY = "read_only"
    MERGE = "merge"


class LayerMode(StrEnum):
    """How a session layer ends: committed (or set aside when it lost the race), dropped,
    or merged into whatever was committed meanwhile."""

    EXCLUSIVE = "exclusive"
    READ_ONLY = "read_only"
    MERGE = "merge"


def session_mode(policy: SecondSession, *, other_session_open: bool) -> LayerMode:
    """The mode of a new session layer in a pool with ``policy``. Refusal is decided
    before (:func:`refusal`). Any session that logs off after another one committed is
    merged, whatever its mode says (nothing is lost); ``merge`` marks one known from its
    start to be a second session."""
    if not other_session_open or policy is SecondSession.REFUSE:
        return LayerMode.EXCLUSIVE
    return LayerMode.READ_ONLY if policy is SecondSession.READ_ONLY else LayerMode.MERGE


def refusal(policy: SecondSession, open_on: list[str]) -> str | None:
    """The message refusing a second session, or None when it may start."""
    if policy is not SecondSession.REFUSE or not open_on:
        return None
    where = ", ".join(sorted(open_on))
    return (f"your profile is in use on {where}; log off there first, then connect again "
            f"(this pool allows one session per user)")


@dataclass(frozen=True, slots=True)
class ProfilePolicy:
    """A pool's roaming-profile settings a hand-over needs: what a second concurrent
    session gets, and the paths (relative to the home) kept out of the profile."""

    second_session: SecondSession = SecondSession.MERGE
    exclusions: tuple[str, ...] = ()


class EntryKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"


@dataclass(frozen=True, slots=True)
class Entry:
    """What the merge compares of one path: its kind, permissions, owner and content (a
    file's sha256, a link's target; nothing for a directory)."""

    kind: EntryKind
    mode: int
    uid: int
    gid: int
    content: str = ""


Tree = Mapping[str, Entry]  # relative POSIX paths ("Documents/a.txt") to what they hold


@dataclass(frozen=True, slots=True)
class Write:
    """Put the other session's entry at ``source`` in place at ``target`` (the same path,
    or a conflict copy's)."""

    source: str
    target: str
    entry: Entry


@dataclass(slots=True)
class MergePlan:
    """What to do to the committed tree ("ours") to take in the other session's changes
    ("theirs"): directories to make and entries to write, parents first, then deletions,
    children first. ``conflicts`` lists every path both sessions changed, in words."""

    writes: list[Write] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    result: dict[str, Entry] = field(default_factory=dict)  # the merged tree, to check by

    @property
    def empty(self) -> bool:
        return not self.writes and not self.deletes


def conflict_name(path: str, desktop: str, taken: Mapping[str, object]) -> str:
    """``NAME.conflict-<desktop>`` beside ``path``, numbered when that name is taken."""
    base = f"{path}.conflict-{desktop}"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def plan_merge(base: Tree, ours: Tree, theirs: Tree, *, desktop: str) -> MergePlan:
    """The three-way merge of ``theirs`` (the session logging off on ``desktop``) into
    ``ours`` (the generation committed meanwhile), both started from ``base``.

    Rules, per path: unchanged by theirs: ours stays. Changed by theirs only: theirs is
    taken (a deletion too). Changed alike by both: nothing to do. Changed differently by
    both: ours stays, and theirs, if it still has the path, is saved as a conflict copy (a
    directory with its whole subtree). Where ours turned a directory of theirs into a file,
    theirs' subtree goes under the conflict name too. A directory deleted by theirs goes
    only once nothing of ours or of the merge is left in it; one deleted by ours comes back
    when theirs put something new in it."""
    for tree in (base, ours, theirs):
        for path in tree:
            _check_relative(path)
    merge = _Merge(theirs, dict(ours), desktop)
    deletions: list[str] = []
    for path in sorted(set(base) | set(ours) | set(theirs), key=_depth_first_order):
        b, o, t = base.get(path), ours.get(path), theirs.get(path)
        target = merge.target(path)
        if target != path:  # under a directory of theirs kept beside ours
            if t is not None:
                merge.write(path, target, t)
            continue
        if t == b or o == t:
            continue
        if o == b:  # only theirs changed it
            if t is None:
                deletions.append(path)
            elif o is not None and o.kind is EntryKind.DIR and t.kind is not EntryKind.DIR:
                merge.keep_beside(path, t)  # ours' directory may still hold files
            else:
                merge.write(path, path, t)
            continue
        if t is None:  # changed differently by both, from here on
            merge.plan.conflicts.append(f"{path}: deleted on {desktop}, changed in the "
                                        "committed profile; the committed version is kept")
        elif o is not None and o.kind is t.kind is EntryKind.DIR:
            merge.plan.conflicts.append(f"{path}/: permissions changed by both sessions; "
                                        "the committed ones are kept")
        else:
            merge.keep_beside(path, t)
    for path in sorted(deletions, key=_depth_first_order, reverse=True):
        if any(other.startswith(path + "/") for other in merge.result):
            continue  # something of ours, or merged in, still lives under it
        merge.plan.deletes.append(path)
        merge.result.pop(path, None)
    merge.plan.result = merge.result
    return merge.plan


class _Merge:
    """The plan being made and the tree it leads to."""

    def __init__(self, theirs: Tree, result: dict[str, Entry], desktop: str) -> None:
        self.theirs, self.result, self.desktop = theirs, result, desktop
        self.plan = MergePlan()
        self.moved: dict[str, str] = {}  # a path of theirs -> where its subtree goes

    def target(self, path: str) -> str:
        """Where theirs' ``path`` lands: under a conflict copy when an ancestor was moved
        there, or is a file or link in the result (then it is moved now)."""
        for prefix, copy in self.moved.items():
            if path.startswith(prefix + "/"):
                return copy + path[len(prefix):]
        parts = PurePosixPath(path).parts
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            found = self.result.get(ancestor)
            if found is not None and found.kind is not EntryKind.DIR:
                self.keep_beside(ancestor, self._dir_of_theirs(ancestor, found))
                return self.target(path)
        return path

    def keep_beside(self, path: str, entry: Entry) -> None:
        copy = conflict_name(path, self.desktop, self.result)
        self.write(path, copy, entry)
        if entry.kind is EntryKind.DIR:
            self.moved[path] = copy
        self.plan.conflicts.append(f"{path}: changed by both sessions; the committed version "
                                   f"is kept and the copy from {self.desktop} is saved as "
                                   f"{copy}")

    def write(self, source: str, target: str, entry: Entry) -> None:
        parts = PurePosixPath(target).parts
        for depth in range(1, len(parts)):  # parents first: ours may have deleted them
            ancestor = "/".join(parts[:depth])
            if ancestor not in self.result:
                made = self._dir_of_theirs(ancestor, entry)
                self.plan.writes.append(Write(ancestor, ancestor, made))
                self.result[ancestor] = made
        self.plan.writes.append(Write(source, target, entry))
        self.result[target] = entry

    def _dir_of_theirs(self, path: str, like: Entry) -> Entry:
        found = self.theirs.get(path)
        if found is not None and found.kind is EntryKind.DIR:
            return found
        return Entry(EntryKind.DIR, 0o40700, like.uid, like.gid)


def _depth_first_order(path: str) -> tuple[int, str]:
    return path.count("/"), path


def _check_relative(path: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\n" in path:
        raise InvalidInput(f"profile merge: {path!r} is not a relative path inside a home")

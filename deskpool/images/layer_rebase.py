"""Rebase a user layer from one template version's root onto the next one's.

A layer directory holds ``upper/`` (the overlayfs upper directory), ``work/`` (its workdir)
and ``.deskpool/manifest.json``. ``rebase_layer`` reads the old layer and both base roots and
writes the merged layer into a *new* directory (built as ``OUT.partial`` and renamed when whole),
so the old layer is never modified and a crash at any point leaves either nothing or a complete
result; re-running gives the same result. ``LayerDisk`` keeps generations of a desktop's layer
and switches between them with one atomic symlink replacement.

The merge, path by path (the rules themselves are ``deskpool.domain.layers.decide``): the user's
view is the old layer over the old base, the ancestor the base each change was made against
(the manifest's record, else the old base), and the new layer is whatever, over the new base,
shows the merged view. Where a directory is a directory on one side only (the user deleted a
directory, the base turned a file into one, ...) the whole subtree is decided as one unit, so a
file is never left without its directory and a deleted directory never half comes back.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from deskpool.domain.dpkg_status import StatusMerge, merge_status
from deskpool.domain.layer_manifest import Manifest, ManifestEntry, parse_manifest
from deskpool.domain.layers import (
    DPKG_STATUS,
    Decision,
    Entry,
    Kind,
    LayerConflict,
    LayerError,
    LayerNote,
    LayerRules,
    ManifestError,
    Outcome,
    Ownership,
    RebaseReport,
    Side,
    conflict_name,
    decide,
    dpkg_info_package,
    fingerprint,
)
from deskpool.images.layer_tree import (
    BaseTree,
    LayerWriter,
    Source,
    fsync_dir,
    host_path,
    scan_layer,
    sync_filesystem,
)

MANIFEST = Path(".deskpool/manifest.json")
REPORT = Path(".deskpool/rebase-report.json")
StepHook = Callable[[str], None]
_DEFAULT_DIR = Entry(Kind.DIR, 0o755)


def _write_atomically(path: Path, text: str) -> None:
    """Write, flush, then rename over: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_manifest(layer: Path) -> Manifest:
    path = layer / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"the user layer {layer} has no manifest ({path} is missing)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"the manifest {path} cannot be read ({exc})") from exc
    return parse_manifest(text, source=f"the manifest {path}")


def write_manifest(layer: Path, manifest: Manifest) -> None:
    _write_atomically(layer / MANIFEST, manifest.dumps())


def create_layer(layer: Path, version: str) -> None:
    """A fresh, empty layer on ``version``: what a new stateful desktop starts with."""
    if layer.exists():
        raise LayerError(f"{layer} already exists")
    (layer / "upper").mkdir(parents=True)
    (layer / "work").mkdir()
    write_manifest(layer, Manifest(version))


def record_changes(layer: Path, base_root: Path) -> Manifest:
    """Bring the manifest up to date with the layer: paths changed since the last record are
    written down as made against the base the layer sits on (``base_root``), paths no longer
    in the layer are forgotten, paths already recorded keep their ancestor. Run while the
    layer is not in use (when the desktop shuts down); a rebase without it judges unrecorded
    paths against the old base, which is the same thing."""
    manifest = read_manifest(layer)
    entries, _ = scan_layer(layer / "upper")
    base = BaseTree(base_root, "base")
    files = {p: manifest.files.get(p)
             or ManifestEntry(manifest.base_version, fingerprint(base.entry(p)))
             for p in entries}
    updated = Manifest(manifest.base_version, files, manifest.generation,
                       manifest.rebased_from)
    if updated.checksum() != manifest.checksum():
        write_manifest(layer, updated)
    return updated


def _depth_key(path: str) -> list[str]:
    return path.split("/")


class _Merge:
    """One rebase's state: the inputs, the new layer being written and the report."""

    def __init__(self, old: BaseTree, new: BaseTree, upper: Path, layer: dict[str, Entry],
                 manifest: Manifest, rules: LayerRules, writer: LayerWriter,
                 report: RebaseReport) -> None:
        self.old, self.new, self.upper, self.rules = old, new, upper, rules
        self.layer = layer
        self.manifest, self.writer, self.report = manifest, writer, report
        self.dirs: dict[str, Entry] = {}  # directories of the merged view, by path
        self.owners: dict[str, Ownership] = {**old.owners(), **new.owners()}
        self.status: StatusMerge | None = None

    # --- the three views ------------------------------------------------------------------

    def user(self, path: str) -> tuple[Entry | None, Source | None]:
        """What the user sees at ``path``: the layer's entry, else the old base's unless a
        whiteout, an opaque directory or a file in the layer hides it."""
        found = self.layer.get(path)
        if found is not None:
            if found.kind is Kind.WHITEOUT:
                return None, None
            return found, Source(host_path(self.upper, path))
        parts = path.split("/")
        for i in range(2, len(parts)):
            above = self.layer.get("/".join(parts[:i]))
            if above is not None and (not above.is_dir or above.opaque):
                return None, None
        base = self.old.entry(path)
        return base, (Source(host_path(self.old.root, path)) if base is not None else None)

    def ancestor(self, path: str) -> str | None:
        recorded = self.manifest.files.get(path) if path in self.layer else None
        return recorded.base if recorded is not None else fingerprint(self.old.entry(path))

    def owner(self, path: str) -> Ownership | None:
        return None if self.rules.in_user_area(path) else self.owners.get(path)

    # --- the walk ---------------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """The layer's paths, plus everything below a place where the layer hides or replaces a
        directory (those paths change in the user's view without being in the layer)."""
        paths = set(self.layer)
        for path, found in self.layer.items():
            new = self.new.entry(path)
            hides = not found.is_dir or found.opaque
            if hides or found.is_dir != (new is not None and new.is_dir):
                paths.update(self.old.descendants(path))
                paths.update(self.new.descendants(path))
        return sorted(paths, key=_depth_key)

    def run(self) -> None:
        order = self.candidates()
        self.prepare_status()
        i = 0
        while i < len(order):
            path = order[i]
            end = i + 1
            while end < len(order) and order[end].startswith(path + "/"):
                end += 1
            subtree = order[i + 1:end]
            if self.rules.excluded(path):
                self.report.excluded += sum(1 for p in [path, *subtree] if p in self.layer)
                i = end
                continue
            user, source = self.user(path)
            new = self.new.entry(path)
            user_dir, new_dir = user is not None and user.is_dir, new is not None and new.is_dir
            if user_dir != new_dir:
                self.unit(path, user, source, new, subtree)
                i = end
            elif user is not None and user_dir:
                self.directory(path, user, new)
                i += 1
            else:
                self.leaf(path, user, source, new)
                i = end  # nothing can live below a file, a link or nothing

    # --- directories and leaves -------------------------------------------------------------

    def listed(self, path: str) -> bool:
        """Whether a layer path belongs in the report's lists: directories only when the user
        changed the directory itself (its mode, owner...), not as mere containers."""
        found = self.layer.get(path)
        if found is None:
            return False
        return not found.is_dir or fingerprint(found) != self.ancestor(path)

    def account(self, path: str, decision: Decision, user_copy: str | None = None) -> None:
        if self.listed(path):
            kept = decision.take is Side.USER
            (self.report.kept if kept else self.report.dropped).append(path)
        if decision.outcome is Outcome.CONFLICT:
            self.report.conflicts.append(LayerConflict(path, decision.reason, user_copy))
        elif decision.outcome is Outcome.USER_WON:
            self.report.notes.append(LayerNote(path, decision.reason))

    def decide(self, path: str, user: Entry | None, new: Entry | None) -> Decision:
        return decide(fingerprint(user), self.ancestor(path), fingerprint(new),
                      owner=self.owner(path), user_area=self.rules.in_user_area(path))

    def directory(self, path: str, user: Entry, new: Entry | None) -> None:
        decision = self.decide(path, user, new)
        chosen = user if decision.take is Side.USER else new
        assert chosen is not None
        self.dirs[path] = chosen
        if chosen is user and fingerprint(user) != fingerprint(new):
            self.ensure_parents(path)
            self.writer.directory(path, user)
        self.account(path, decision)

    def leaf(self, path: str, user: Entry | None, source: Source | None,
             new: Entry | None) -> None:
        if path == DPKG_STATUS and self.status is not None:
            self.merged_status(user, source, new)
            return
        package = dpkg_info_package(path)
        if package is not None and self.status is not None and package in self.status.conflicted:
            # The package's stanza conflict is reported once; its files follow the stanza.
            self.account(path, Decision(Outcome.DROPPED, Side.BASE))
            return
        decision = self.decide(path, user, new)
        user_copy = None
        if decision.take is Side.USER:
            self.put(path, user, source)
        elif decision.outcome is Outcome.CONFLICT and user is not None:
            user_copy = self.conflict_copy(path)
            self.put(user_copy, user, source)
        self.account(path, decision, user_copy)

    def put(self, path: str, entry: Entry | None, source: Source | None) -> None:
        self.ensure_parents(path)
        if entry is None:
            self.writer.whiteout(path)
        elif entry.is_dir:
            self.writer.directory(path, entry)
        else:
            assert source is not None
            self.writer.entry(path, entry, source)

    def ensure_parents(self, path: str) -> None:
        parts = path.split("/")
        for i in range(2, len(parts)):
            parent = "/".join(parts[:i])
            if not self.writer.has(parent):
                base = self.new.entry(parent)
                entry = self.dirs.get(parent) or (base if base is not None and base.is_dir
                                                  else _DEFAULT_DIR)
                self.writer.directory(parent, entry)

    def conflict_copy(self, path: str) -> str:
        def taken(candidate: str) -> bool:
            return (candidate in self.layer or self.new.entry(candidate) is not None
                    or self.writer.has(candidate))
        return conflict_name(path, taken)

    # --- subtrees decided as one -----------------------------------------------------------

    def unit(self, path: str, user: Entry | None, source: Source | None, new: Entry | None,
             subtree: list[str]) -> None:
        inside = [p for p in subtree if not self.rules.excluded(p)]
        self.report.excluded += sum(1 for p in subtree
                                    if p in self.layer and self.rules.excluded(p))
        ancestor = self.ancestor(path)
        user_changed = fingerprint(user) != ancestor or any(
            fingerprint(self.user(p)[0]) != self.ancestor(p) for p in inside)
        base_changes = [p for p in [path, *inside]
                        if fingerprint(self.new.entry(p)) != self.ancestor(p)]
        owned = [p for p in base_changes if self.owner(p) is not None]
        what = _unit_words(path, user, ancestor is not None, new, base_changes)
        if not base_changes:
            decision = Decision(Outcome.KEPT, Side.USER, "changed by the user only")
        elif not user_changed:
            decision = Decision(Outcome.DROPPED, Side.BASE, "changed by the new base only")
        elif owned and not self.rules.in_user_area(path):
            owner = self.owner(owned[0])
            assert owner is not None
            decision = Decision(Outcome.CONFLICT, Side.BASE,
                                f"{what}; {owned[0]} is a {owner.describe()}: "
                                "the new base's version wins")
        else:
            whose = ("in the user's own area" if self.rules.in_user_area(path)
                     else "no package owns it")
            decision = Decision(Outcome.USER_WON, Side.USER,
                                f"{what}; {whose}: the user's version wins")
        user_copy = None
        if decision.take is Side.USER:
            self.copy_user_tree(path, path, user, source, inside, opaque=True)
        elif decision.outcome is Outcome.CONFLICT and user is not None:
            user_copy = self.conflict_copy(path)
            self.copy_user_tree(path, user_copy, user, source, inside, opaque=False)
        below = Outcome.KEPT if decision.take is Side.USER else Outcome.DROPPED
        for p in inside:
            self.account(p, Decision(below, decision.take))  # reported once, at ``path``
        self.account(path, decision, user_copy)

    def copy_user_tree(self, path: str, target: str, user: Entry | None,
                       source: Source | None, inside: list[str], *, opaque: bool) -> None:
        """The user's view of ``path`` and below, written whole at ``target``."""
        if user is None or not user.is_dir:
            self.put(target, user, source)
            return
        self.ensure_parents(target)
        self.writer.directory(target, user, opaque=opaque)
        for p in inside:
            entry, src = self.user(p)
            if entry is not None:
                self.put(target + p[len(path):], entry, src)

    # --- dpkg's status file -------------------------------------------------------------------

    def prepare_status(self) -> None:
        """Merge the status file by package when both sides changed it (before the walk, since
        ``info/`` sorts before ``status`` and its files follow the merge)."""
        if DPKG_STATUS not in self.layer or self.rules.excluded(DPKG_STATUS):
            return
        user, source = self.user(DPKG_STATUS)
        new, ancestor = self.new.entry(DPKG_STATUS), self.ancestor(DPKG_STATUS)
        if (user is None or new is None or user.kind is not Kind.FILE
                or new.kind is not Kind.FILE):
            return
        mine, theirs = fingerprint(user), fingerprint(new)
        if mine in (theirs, ancestor) or theirs == ancestor:
            return  # one side alone changed it: the ordinary rule is right
        old_file = host_path(self.old.root, DPKG_STATUS)
        assert source is not None and source.path is not None
        self.status = merge_status(
            old_file.read_text(errors="replace") if self.old.entry(DPKG_STATUS) else "",
            source.path.read_text(errors="replace"),
            host_path(self.new.root, DPKG_STATUS).read_text(errors="replace"))

    def merged_status(self, user: Entry | None, source: Source | None,
                      new: Entry | None) -> None:
        assert self.status is not None and new is not None and user is not None
        merge = self.status
        same = merge.text.encode() == host_path(self.new.root, DPKG_STATUS).read_bytes()
        if not same:
            self.ensure_parents(DPKG_STATUS)
            self.writer.entry(DPKG_STATUS, new, Source(None, merge.text.encode()))
        user_copy = None
        if merge.conflicts:
            user_copy = self.conflict_copy(DPKG_STATUS)
            self.put(user_copy, user, source)
        for c in merge.conflicts:
            arch = f":{c.architecture}" if c.architecture else ""
            self.report.conflicts.append(LayerConflict(
                DPKG_STATUS, f"package {c.package}{arch} changed by both: the user has "
                f"{c.user}, the new base has {c.new}: the new base's wins", user_copy))
        if merge.from_user:
            self.report.notes.append(LayerNote(DPKG_STATUS, (
                f"merged the user's {len(merge.from_user)} package change(s) "
                f"({', '.join(sorted(merge.from_user))}) into the new base's package database")))
        (self.report.dropped if same else self.report.kept).append(DPKG_STATUS)


def _unit_words(path: str, user: Entry | None, had: bool, new: Entry | None,
                base_changes: list[str]) -> str:
    def kind(e: Entry | None) -> str:
        return "nothing" if e is None else {Kind.DIR: "a directory", Kind.FILE: "a file",
                                            Kind.SYMLINK: "a symlink"}.get(e.kind, "a device")
    mine = "deleted by the user" if user is None else f"made {kind(user)} by the user"
    if not had and user is not None:
        mine = f"created as {kind(user)} by the user"
    theirs = f"{kind(new)} in the new base"
    below = [p for p in base_changes if p != path]
    if below:
        theirs += f" (which changed {len(below)} path(s) below it, first {below[0]})"
    return f"{mine}, {theirs}"


# --- the crash-safe entry points -----------------------------------------------------------


def _stored_report(out: Path, old_manifest: Manifest, new_version: str) -> RebaseReport:
    """The report of a finished rebase at ``out``, if it is this very rebase's result."""
    try:
        done = read_manifest(out)
    except ManifestError as exc:
        raise LayerError(f"{out} already exists and is not a finished rebase ({exc})") from exc
    if done.rebased_from != old_manifest.checksum() or done.base_version != new_version:
        raise LayerError(f"{out} already holds another layer; remove it or choose another "
                         "output directory")
    try:
        return RebaseReport.from_json(json.loads((out / REPORT).read_text()))
    except (OSError, ValueError) as exc:
        raise LayerError(f"{out} holds a finished rebase whose report is unreadable ({exc})") \
            from exc


def rebase_layer(old_root: Path, new_root: Path, layer: Path, out: Path, *,
                 old_version: str, new_version: str, rules: LayerRules | None = None,
                 userxattr: bool | None = None, on_step: StepHook | None = None) -> RebaseReport:
    """Write the user layer ``layer`` (made on ``old_root``) rebased onto ``new_root`` as the
    new layer directory ``out``; return what was kept, dropped, in conflict and noted.

    ``layer`` is only read. ``out`` appears whole or not at all (built as ``OUT.partial``). If
    ``out`` already holds this same rebase (a re-run after a crash), its report is returned.
    ``userxattr``: mark opaque directories with ``user.overlay.*`` (default: as the layer does).
    """
    rules = rules or LayerRules()
    step = on_step or (lambda _name: None)
    if out.resolve() == layer.resolve() or layer.resolve() in out.resolve().parents:
        raise LayerError(f"the new layer {out} cannot be inside the old one {layer}")
    manifest = read_manifest(layer)
    if manifest.base_version != old_version:
        raise LayerError(f"the user layer {layer} sits on version {manifest.base_version}, "
                         f"not {old_version}: it cannot be rebased from that root")
    if out.exists():
        return _stored_report(out, manifest, new_version)
    old, new = BaseTree(old_root, "old base"), BaseTree(new_root, "new base")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an earlier run's leftover: it never became a layer
    entries, layer_userxattr = scan_layer(layer / "upper")
    try:
        report = _write_partial(partial, old, new, layer, entries, manifest, new_version,
                                rules, layer_userxattr if userxattr is None else userxattr,
                                step)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(out.parent).free
        raise LayerError(f"the rebased layer does not fit in {out.parent} ({free / 2**20:.0f} "
                         f"MiB free, the user layer holds {_size(layer / 'upper') / 2**20:.0f} "
                         f"MiB); the layer on {old_version} is untouched") from exc
    os.replace(partial, out)
    fsync_dir(out.parent)
    step("renamed")
    return report


def _write_partial(partial: Path, old: BaseTree, new: BaseTree, layer: Path,
                   entries: dict[str, Entry], manifest: Manifest, new_version: str,
                   rules: LayerRules, userxattr: bool, step: StepHook) -> RebaseReport:
    writer = LayerWriter(partial / "upper", userxattr=userxattr)
    report = RebaseReport(manifest.base_version, new_version)
    merge = _Merge(old, new, layer / "upper", entries, manifest, rules, writer, report)
    step("started")
    merge.run()
    step("tree-written")
    report.bytes = writer.bytes
    (partial / "work").mkdir()
    files = {p: ManifestEntry(report.new_version, fingerprint(new.entry(p)))
             for p in writer.written}
    write_manifest(partial, Manifest(report.new_version, files, manifest.generation + 1,
                                     manifest.checksum()))
    _write_atomically(partial / REPORT, json.dumps(report.to_json(), indent=1) + "\n")
    sync_filesystem(partial)  # all of it on disk before the rename makes it the layer
    step("manifest-written")
    return report


def _size(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(root) for f in fs)


class LayerDisk:
    """A desktop's layer disk: numbered generations and a ``current`` symlink to one of them.

    A rebase writes the next generation beside the current one and then replaces the symlink
    in one ``rename``: the desktop boots on the old layer or the new one, never a mix. Old
    generations stay until ``prune`` (the caller's choice, once the new version booted)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.link = root / "current"

    @classmethod
    def create(cls, root: Path, version: str) -> LayerDisk:
        disk = cls(root)
        if disk.link.exists() or disk.link.is_symlink():
            raise LayerError(f"{root} already holds a user layer")
        create_layer(root / "generations" / "1", version)
        disk._switch(root / "generations" / "1")
        return disk

    def current(self) -> Path:
        if not self.link.is_symlink():
            raise LayerError(f"{self.root} holds no user layer (no {self.link.name} link)")
        return self.root / os.readlink(self.link)

    def _switch(self, generation: Path) -> None:
        tmp = self.root / "current.new"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(generation.relative_to(self.root), tmp)
        os.replace(tmp, self.link)
        fsync_dir(self.root)

    def rebase(self, old_root: Path, new_root: Path, *, old_version: str, new_version: str,
               rules: LayerRules | None = None, on_step: StepHook | None = None) -> RebaseReport:
        """Rebase the current generation onto ``new_version`` and switch to the result.
        Re-running after a crash at any point finishes the same rebase."""
        current = self.current()
        manifest = read_manifest(current)
        if manifest.base_version == new_version and manifest.rebased_from is not None:
            try:  # already switched: a re-run after a crash that followed the switch
                return RebaseReport.from_json(json.loads((current / REPORT).read_text()))
            except (OSError, ValueError) as exc:
                raise LayerError(f"{current} is on {new_version} already, but its rebase "
                                 f"report is unreadable ({exc})") from exc
        out = self.root / "generations" / str(manifest.generation + 1)
        if out.exists() and not self._is_rebase_of(out, manifest, new_version):
            shutil.rmtree(out)  # a rebase to another version that never became current
        report = rebase_layer(old_root, new_root, current, out, old_version=old_version,
                              new_version=new_version, rules=rules, on_step=on_step)
        self._switch(out)
        if on_step is not None:
            on_step("switched")
        return report

    @staticmethod
    def _is_rebase_of(out: Path, manifest: Manifest, new_version: str) -> bool:
        try:
            done = read_manifest(out)
        except ManifestError:
            return False
        return done.rebased_from == manifest.checksum() and done.base_version == new_version

    def prune(self) -> list[Path]:
        """Remove every generation but the current one (and leftovers of crashed rebases)."""
        keep = self.current().resolve()
        removed = []
        for item in sorted((self.root / "generations").iterdir()):
            if item.resolve() != keep:
                shutil.rmtree(item)
                removed.append(item)
        return removed

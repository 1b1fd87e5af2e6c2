"""``deskpool backup`` / ``restore``: the database and the template store, with a manifest.

A backup is a directory::

    manifest.json       format, deskpool version, Alembic revision, database kind, where the
                        template store was, and the size and sha256 of every file below
    database.sqlite     (SQLite) a consistent snapshot, or database.pgdump (pg_dump -Fc)
    templates/...       the template store: every version's disk (and kernel, initrd)

It is written in a temporary directory beside DEST and renamed to DEST at the end, so DEST is
whole or absent. A restore checks every file's checksum before it writes anything, refuses a
data directory or database that is not empty (unless ``force``), and migrates a backup of an
older deskpool up to this version's schema. What is not in a backup: the desktops' disks and
memory states, which live in each host's storage (a stateless desktop is remade from its
template; a stateful one's disk is the host's to back up), and the built-image cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import deskpool
from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput
from deskpool.store import backup as store
from deskpool.store.backup import BackupError
from deskpool.store.db import head_revision, upgrade_to_head

FORMAT = 1
MANIFEST = "manifest.json"
DUMP_NAMES = {"sqlite": "database.sqlite", "postgresql": "database.pgdump"}
_CHUNK = 1 << 20

# A step's progress: (what, done, total); total 0 while unknown. Units are bytes, except the
# database copy (SQLite pages).
Progress = Callable[[str, int, int], None]


def _no_progress(_what: str, _done: int, _total: int) -> None:
    pass


@dataclass(frozen=True)
class BackupReport:
    path: Path
    revision: str
    database: str
    files: int
    size_bytes: int


@dataclass(frozen=True)
class RestoreReport:
    revision_before: str
    revision_after: str
    files: int
    relocated_versions: int


def _sha256(path: Path, progress: Progress, what: str, done: int, total: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress(what, done, total)
    return digest.hexdigest()


def _copy(src: Path, dest: Path, progress: Progress, what: str, done: int, total: int) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dest.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            done += len(chunk)
            progress(what, done, total)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copymode(src, dest)
    return done


def _template_sources(root: Path) -> list[Path]:
    """The store's files, leftovers of a crashed publish (``.staging-*``) left out."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".staging-") for part in p.relative_to(root).parts))


def backup(settings: Settings, dest: Path, progress: Progress = _no_progress) -> BackupReport:
    """Write a backup of the database and template store to the new directory ``dest``."""
    url = settings.resolved_database_url
    kind = store.database_kind(url)
    if dest.exists():
        raise InvalidInput(f"{dest} already exists; give a new directory to back up into")
    revision = store.revision_of(url)
    if revision is None:
        raise BackupError(f"the database {store.safe_url(url)} holds no deskpool data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        dump = work / DUMP_NAMES[kind]
        dumper = store.dump_sqlite if kind == "sqlite" else store.dump_postgresql
        dumper(url, dump, lambda done, total: progress("database", done, total))
        # The files the snapshot's rows point at are immutable and never rewritten, so a copy
        # after the snapshot holds them all, unless a version was deleted in between (checked).
        root = settings.templates_dir
        sources = _template_sources(root)
        total, done = sum(p.stat().st_size for p in sources), 0
        for src in sources:
            done = _copy(src, work / "templates" / src.relative_to(root), progress,
                         "templates", done, total)
        missing = [p for p in store.template_files(url)
                   if p.is_relative_to(root) and not (work / "templates" /
                                                      p.relative_to(root)).is_file()]
        if missing:
            raise BackupError(f"template files went missing while backing up ({missing[0]}); "
                              "run the backup again")
        files = [p for p in sorted(work.rglob("*")) if p.is_file()]
        total, done, listed = sum(p.stat().st_size for p in files), 0, {}
        for path in files:
            size = path.stat().st_size
            listed[str(path.relative_to(work))] = {
                "size": size, "sha256": _sha256(path, progress, "checksums", done, total)}
            done += size
        manifest = {"format": FORMAT, "deskpool_version": deskpool.__version__,
                    "created_at": datetime.now(UTC).isoformat(), "alembic_revision": revision,
                    "database": kind, "templates_dir": str(root.resolve()), "files": listed}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return BackupReport(path=dest, revision=revision, database=kind, files=len(listed),
                        size_bytes=total)


def read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(f"{src} is not a deskpool backup (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: not a backup format this deskpool reads "
                          f"(format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
                          f", expected {FORMAT})")
    for key in ("alembic_revision", "database", "templates_dir", "files"):
        if key not in manifest:
            raise BackupError(f"{path}: the manifest has no {key!r}")
    return manifest


def verify(src: Path, manifest: dict[str, Any], progress: Progress = _no_progress) -> None:
    """Every listed file present, of its size and checksum; raises ``BackupError`` naming
    the first that is not."""
    files: dict[str, dict[str, Any]] = manifest["files"]
    total, done = sum(int(f["size"]) for f in files.values()), 0
    for name, expected in files.items():
        path = src / name
        if ".." in Path(name).parts or not path.is_file():
            raise BackupError(f"corrupt backup: {name} is missing from {src}")
        if path.stat().st_size != expected["size"]:
            raise BackupError(f"corrupt backup: {name} has {path.stat().st_size} bytes, the "
                              f"manifest says {expected['size']}")
        if _sha256(path, progress, "verifying", done, total) != expected["sha256"]:
            raise BackupError(f"corrupt backup: the checksum of {name} does not match the "
                              "manifest")
        done += int(expected["size"])


def _data_dir_in_use(settings: Settings) -> list[str]:
    data = settings.data_dir
    return sorted(p.name for p in data.iterdir()) if data.is_dir() else []


def restore(settings: Settings, src: Path, *, force: bool = False,
            progress: Progress = _no_progress) -> RestoreReport:
    """Restore the backup ``src`` into the data directory and database ``settings`` name."""
    manifest = read_manifest(src)
    url = settings.resolved_database_url
    kind = store.database_kind(url)
    if manifest["database"] != kind:
        raise BackupError(f"the backup holds a {manifest['database']} database and this "
                          f"deskpool uses {kind} ({store.safe_url(url)}); set database_url to a "
                          f"{manifest['database']} database")
    revision = str(manifest["alembic_revision"])
    if not store.is_known_revision(revision):
        raise BackupError(f"the backup is at schema revision {revision}, which this deskpool "
                          f"(schema {head_revision()}) does not know: restore it with a newer "
                          "deskpool")
    if not force:
        used = _data_dir_in_use(settings)
        if used:
            raise BackupError(f"the data directory {settings.data_dir} is not empty "
                              f"({', '.join(used[:5])}); restore into an empty one, or give "
                              "--force to replace its database and template store")
        if not store.database_is_empty(url):
            raise BackupError(f"the database {store.safe_url(url)} is not empty; give --force to "
                              "replace it")
    verify(src, manifest, progress)  # nothing is written before every checksum matched

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    root = settings.templates_dir
    staged = Path(tempfile.mkdtemp(prefix=".templates.restoring-", dir=settings.data_dir))
    try:
        names = [n for n in manifest["files"] if n.startswith("templates/")]
        total = sum(int(manifest["files"][n]["size"]) for n in names)
        done = 0
        for name in names:
            done = _copy(src / name, staged / Path(name).relative_to("templates"), progress,
                         "templates", done, total)
        dump = src / DUMP_NAMES[kind]
        progress("database", 0, 0)
        if kind == "sqlite":
            store.load_sqlite(dump, url)
        else:
            store.load_postgresql(dump, url, clean=force)
        progress("database", 1, 1)
        if root.exists():
            old = root.with_name(f".templates.replaced-{os.getpid()}")
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staged, root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    upgrade_to_head(url)  # a backup of an older deskpool: its schema brought to this one's
    relocated = 0
    if Path(manifest["templates_dir"]) != root.resolve():
        relocated = store.relocate_template_files(url, Path(manifest["templates_dir"]),
                                                  root.resolve())
    return RestoreReport(revision_before=revision, revision_after=head_revision(),
                         files=len(manifest["files"]), relocated_versions=relocated)

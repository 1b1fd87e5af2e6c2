"""The database side of ``deskpool backup`` / ``restore``: a consistent copy of the database
and its return into an empty one.

SQLite: the ``sqlite3`` online backup API, which copies a consistent snapshot page by page
while brokers keep writing (WAL included). PostgreSQL: ``pg_dump --format=custom`` (one
snapshot of the whole database) and ``pg_restore``; the libpq tools of the server's major
version must be installed (Debian's ``postgresql-client``, part of ``postgresql``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import inspect, select, update
from sqlalchemy.engine import make_url

from deskpool.domain.errors import InvalidInput, PermanentError
from deskpool.store.db import (
    _engine_for,
    alembic_config,
    current_revision,
    make_session_factory,
)
from deskpool.store.models import TemplateVersion

# done, total (pages for SQLite; unknown, 0, for pg_dump)
CopyProgress = Callable[[int, int], None]


class BackupError(PermanentError):
    """A backup or restore that cannot be done as asked; nothing was changed."""


def database_kind(url: str) -> str:
    """``sqlite`` (a file) or ``postgresql``; other databases are refused."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or str(parsed.database).startswith("file:"):
            raise InvalidInput(f"cannot back up or restore the SQLite database {url!r}: only "
                               "a database in a file can be")
        return "sqlite"
    if backend == "postgresql":
        return "postgresql"
    raise InvalidInput(f"cannot back up or restore a {backend} database (SQLite and PostgreSQL "
                       "only)")


def safe_url(url: str) -> str:
    """The URL for messages: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_path(url: str) -> Path:
    return Path(str(make_url(url).database)).expanduser()


def revision_of(url: str) -> str | None:
    """The migration the database is at (None: empty or missing)."""
    if database_kind(url) == "sqlite" and not sqlite_path(url).is_file():
        return None
    return current_revision(url)


def is_known_revision(revision: str) -> bool:
    """Whether this version of deskpool ships that migration (so it can migrate from it)."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except (CommandError, RevisionError):
        return False


def database_is_empty(url: str) -> bool:
    """No table at all (a SQLite file that does not exist is empty too)."""
    if database_kind(url) == "sqlite" and not sqlite_path(url).exists():
        return True
    with _engine_for(url) as engine:
        return not inspect(engine).get_table_names()


def template_files(url: str) -> list[Path]:
    """Every file a template version points to (disk, kernel, initrd)."""
    with _engine_for(url) as engine, make_session_factory(engine)() as session:
        rows = session.execute(select(TemplateVersion.image_path, TemplateVersion.kernel_path,
                                      TemplateVersion.initrd_path)).all()
    return [Path(p) for row in rows for p in row if p]


def relocate_template_files(url: str, old_root: Path, new_root: Path) -> int:
    """Point template versions whose files were under ``old_root`` at ``new_root`` (a
    restore into another data directory); returns how many versions changed."""
    old_prefix, changed = str(old_root).rstrip("/") + "/", 0
    with _engine_for(url) as engine, engine.begin() as connection:
        rows = connection.execute(select(
            TemplateVersion.id, TemplateVersion.image_path, TemplateVersion.kernel_path,
            TemplateVersion.initrd_path)).all()
        for version_id, *paths in rows:
            moved = [str(new_root / p[len(old_prefix):]) if p and p.startswith(old_prefix)
                     else p for p in paths]
            if moved != paths:
                connection.execute(update(TemplateVersion)
                                   .where(TemplateVersion.id == version_id)
                                   .values(image_path=moved[0], kernel_path=moved[1],
                                           initrd_path=moved[2]))
                changed += 1
    return changed


# --- SQLite ---------------------------------------------------------------------------------


def dump_sqlite(url: str, dest: Path, progress: CopyProgress) -> None:
    source_path = sqlite_path(url)
    if not source_path.is_file():
        raise BackupError(f"there is no database at {source_path}")
    source = sqlite3.connect(source_path, timeout=30)
    target = sqlite3.connect(dest)
    try:
        # A consistent snapshot even while brokers write: the copy restarts from the top if
        # another connection writes between its steps.
        source.backup(target, pages=1024,
                      progress=lambda _status, remaining, total: progress(total - remaining,
                                                                           total))
    finally:
        target.close()
        source.close()


def load_sqlite(dump: Path, url: str) -> None:
    """Put the dumped file in the database's place (whole, by a rename)."""
    target = sqlite_path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.restoring")
    shutil.copyfile(dump, staged)
    for leftover in (target.with_name(target.name + "-wal"),
                     target.with_name(target.name + "-shm")):
        leftover.unlink(missing_ok=True)  # a WAL of the database being replaced
    os.replace(staged, target)


# --- PostgreSQL -----------------------------------------------------------------------------


def _libpq_env(url: str) -> dict[str, str]:
    """The connection as libpq variables: the password never shows on a command line."""
    parsed = make_url(url)
    env = dict(os.environ)
    for name, value in (("PGHOST", parsed.host), ("PGPORT", parsed.port),
                        ("PGUSER", parsed.username), ("PGPASSWORD", parsed.password),
                        ("PGDATABASE", parsed.database)):
        if value is not None:
            env[name] = str(value)
    for key, name in (("host", "PGHOST"), ("port", "PGPORT"), ("sslmode", "PGSSLMODE")):
        query = parsed.query.get(key)
        if isinstance(query, str):
            env[name] = query
    return env


def _run_pg_tool(argv: list[str], url: str) -> None:
    if shutil.which(argv[0]) is None:
        raise BackupError(f"{argv[0]} is not installed (Debian: postgresql-client)")
    result = subprocess.run(argv, env=_libpq_env(url), capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise BackupError(f"{argv[0]} failed: {result.stderr.strip()[-500:]}")


def dump_postgresql(url: str, dest: Path, progress: CopyProgress) -> None:
    progress(0, 0)
    _run_pg_tool(["pg_dump", "--format=custom", "--no-owner", "--no-privileges",
                  f"--file={dest}"], url)
    progress(1, 1)


def load_postgresql(dump: Path, url: str, *, clean: bool) -> None:
    _run_pg_tool(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error",
                  "--single-transaction", *(["--clean", "--if-exists"] if clean else []),
                  f"--dbname={make_url(url).database}",
                  str(dump)], url)

"""``deskpool backup`` / ``restore``: a world of pools, desktops and users (fake driver) backed
up, restored into an empty data directory and found whole; a corrupt backup is refused with
nothing written; a backup of an older schema is migrated up; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deskpool.broker.accounts import LocalAuthenticator
from deskpool.broker.user_admin import UserAdmin
from deskpool.config import Settings
from deskpool.services.backup import BackupError, backup, restore
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.pools import PoolService
from deskpool.services.templates import TemplateService
from deskpool.store.db import _migrate, current_revision, head_revision
from tests.broker_world import PASSWORD, BrokerWorld, make_world

DESKPOOL = Path(sys.executable).parent / "deskpool"
_restore_databases = iter(range(1, 1_000_000))


def _empty_target(request: pytest.FixtureRequest, database_url: str, root: Path) -> Settings:
    """Settings of an empty data directory and an empty database of the same kind."""
    if database_url.startswith("sqlite"):
        target_url = None  # the data directory's own SQLite file
    else:
        target_url = request.getfixturevalue("postgres").create_database(
            f"restored{next(_restore_databases)}")
    return Settings(data_dir=root / "data", database_url=target_url)


def _world(root: Path, database_url: str | None = None) -> BrokerWorld:
    root.mkdir()
    return make_world(root, database_url=database_url)


def _inventory(ctx: ServiceContext) -> dict[str, object]:
    return {
        "pools": sorted((p.name, p.template, p.spare, p.max_size)
                        for p in PoolService(ctx).list()),
        "desktops": sorted((d.name, d.state, d.host, d.mac, d.machine_id)
                           for d in DesktopService(ctx).list()),
        "users": sorted((u.name, u.is_admin, tuple(u.groups)) for u in UserAdmin(ctx).list()),
        "versions": sorted((v.template, v.number, v.image_sha256)
                           for v in TemplateService(ctx).list_versions()),
    }


def test_restore_into_an_empty_data_dir_finds_every_pool_desktop_and_user(
    tmp_path: Path, database_url: str, request: pytest.FixtureRequest
) -> None:
    world = _world(tmp_path / "a", database_url)
    world.pool("lab")
    world.pool("art", spare=1, max_size=2, naming_pattern="art-{n:02}")
    world.user("alice", groups=("staff",), entitled_to=("lab",))
    world.user("bob", admin=True)
    world.fill()
    before = _inventory(world.ctx)
    assert len(before["desktops"]) == 3 and len(before["pools"]) == 2  # type: ignore[arg-type]

    dest = tmp_path / "backups" / "monday"
    report = backup(world.ctx.settings, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["alembic_revision"] == head_revision() == report.revision
    disk = next(name for name in manifest["files"] if name.endswith("disk.qcow2"))
    assert hashlib.sha256((dest / disk).read_bytes()).hexdigest() \
        == manifest["files"][disk]["sha256"]
    assert [p.name for p in dest.parent.iterdir()] == ["monday"]  # no partial dir left
    world.ctx.close()

    target = _empty_target(request, database_url, tmp_path / "b")
    result = restore(target, dest)
    assert result.revision_after == head_revision()
    restored = ServiceContext(target)
    try:
        assert _inventory(restored) == before
        # The template store came along, and the versions point into the new data directory.
        for version in TemplateService(restored).list_versions():
            path = Path(version.image_path)
            assert path.is_relative_to(target.templates_dir.resolve()), path
            assert hashlib.sha256(path.read_bytes()).hexdigest() == version.image_sha256
        # Password hashes too: alice signs in with her password.
        assert LocalAuthenticator(restored).authenticate("alice", PASSWORD) is not None
    finally:
        restored.close()

    # The data directory is in use now: a second restore is refused without --force.
    with pytest.raises(BackupError, match="is not empty"):
        restore(target, dest)
    restore(target, dest, force=True)
    again = ServiceContext(target)
    try:
        assert _inventory(again) == before
    finally:
        again.close()


def test_a_corrupt_backup_is_refused_and_nothing_is_written(
    tmp_path: Path, database_url: str, request: pytest.FixtureRequest
) -> None:
    world = _world(tmp_path / "a", database_url)
    world.pool("lab")
    world.fill(passes=1)
    dest = tmp_path / "bk"
    backup(world.ctx.settings, dest)
    world.ctx.close()
    manifest = json.loads((dest / "manifest.json").read_text())
    disk = dest / next(name for name in manifest["files"] if name.endswith("disk.qcow2"))
    disk.chmod(0o644)
    with disk.open("r+b") as f:  # one flipped byte, same size
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))

    target = _empty_target(request, database_url, tmp_path / "b")
    with pytest.raises(BackupError, match=r"corrupt backup: the checksum of templates/.*"
                                          r"disk\.qcow2 does not match"):
        restore(target, dest)
    assert not target.data_dir.exists()
    if target.database_url is not None:
        from deskpool.store.backup import database_is_empty

        assert database_is_empty(target.database_url)

    (dest / disk.relative_to(dest)).unlink()
    with pytest.raises(BackupError, match=r"corrupt backup: templates/.* is missing"):
        restore(target, dest)
    assert not target.data_dir.exists()


def test_a_backup_of_an_older_schema_is_migrated_up(tmp_path: Path) -> None:
    old = Settings(data_dir=tmp_path / "old")
    _migrate(old.resolved_database_url, "upgrade", "0010")
    dest = tmp_path / "bk"
    assert backup(old, dest).revision == "0010"
    target = Settings(data_dir=tmp_path / "new")
    report = restore(target, dest)
    assert (report.revision_before, report.revision_after) == ("0010", head_revision())
    assert current_revision(target.resolved_database_url) == head_revision()


def test_the_cli_backs_up_and_restores_with_one_line_errors(tmp_path: Path) -> None:
    world = _world(tmp_path / "a")
    world.pool("lab")
    world.user("alice", entitled_to=("lab",))
    world.fill(passes=1)
    before = _inventory(world.ctx)
    world.ctx.close()

    def deskpool(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DESKPOOL_DATA_DIR": str(data_dir)}
        env.pop("DESKPOOL_DEBUG", None)
        return subprocess.run([str(DESKPOOL), *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)

    made = deskpool(tmp_path / "a" / "data", "backup", str(tmp_path / "bk"))
    assert made.returncode == 0, made.stderr
    assert f"to {tmp_path / 'bk'}" in " ".join(made.stdout.split())
    again = deskpool(tmp_path / "a" / "data", "backup", str(tmp_path / "bk"))
    assert again.returncode == 1 and "already exists" in again.stderr

    refused = deskpool(tmp_path / "a" / "data", "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not empty" in lines[0] and "--force" in lines[0], lines

    done = deskpool(tmp_path / "b" / "data", "restore", str(tmp_path / "bk"))
    assert done.returncode == 0, done.stderr
    restored = ServiceContext(Settings(data_dir=tmp_path / "b" / "data"))
    try:
        assert _inventory(restored) == before
    finally:
        restored.close()

    shutil.copytree(tmp_path / "bk", tmp_path / "bad")
    (tmp_path / "bad" / "database.sqlite").write_bytes(b"not a database")
    bad = deskpool(tmp_path / "c" / "data", "restore", str(tmp_path / "bad"))
    assert bad.returncode == 1
    size = (tmp_path / "bk" / "database.sqlite").stat().st_size
    assert bad.stderr.strip() == "error: corrupt backup: database.sqlite has 14 bytes, the " \
                                 f"manifest says {size}"
    assert not (tmp_path / "c").exists()

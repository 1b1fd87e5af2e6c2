"""A user's state is never destroyed by a rollout (fake driver).

A stateful pool's dedicated desktop keeps its user's changes through every way a pool moves
between template versions: a rollout, a rollout with canaries, a rollback, and the maximum age.
The user logs off while the desktop is outdated (the moment a stateless desktop is replaced),
and afterwards finds the same desktop with their file on it. A stateless pool's outdated
desktop is still replaced at logout.
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.domain.pools import Assignment, OnLogout, PoolKind
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.functional.test_pools_reconciler import (  # noqa: F401  (fixtures)
    Clock,
    clock,
    ctx,
    desktops,
    fake,
    make_pool,
    reconciler,
)
from tests.pool_users import PoolUsers

NOTES = "/home/alice/notes.txt"


def publish_v2(ctx: ServiceContext, tmp_path: Path) -> None:
    disk = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk))


def passes(reconciler: Reconciler, n: int = 3) -> None:
    for _ in range(n):
        reconciler.run_pass()


def alice_works(users: PoolUsers, fake: FakeDriver) -> uuid.UUID:
    mine = users.connect("alice")
    users.open_console(mine, "alice")
    GuestAgent(fake, mine).write_file(NOTES, b"my thesis, chapter 3")
    return mine


@pytest.mark.parametrize("path", ["rollout", "canary", "rollback", "max-age"])
def test_a_stateful_users_desktop_survives_every_version_change(
    path: str, ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock,
    tmp_path: Path,
) -> None:
    pools = PoolService(ctx)
    users = PoolUsers(ctx, make_pool(
        ctx, spare=1, kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
        on_logout=OnLogout.RECYCLE_AS_IS, canary=1 if path == "canary" else 0,
        max_age_s=3600 if path == "max-age" else None))
    users.entitle("alice", "bob")
    passes(reconciler, 1)
    if path == "rollback":
        publish_v2(ctx, tmp_path)
        pools.rollout("lab")
        passes(reconciler)
    mine = alice_works(users, fake)
    mine_version = {d.id: d.version for d in desktops(ctx)}[mine]

    if path in ("rollout", "canary"):
        publish_v2(ctx, tmp_path)
        assert pools.rollout("lab").version == 2
    elif path == "rollback":
        assert pools.rollback("lab").version == 1
    else:
        clock.now += timedelta(hours=2)
    passes(reconciler)
    # Logging off an outdated (or aged) desktop: a stateless one would be retired here.
    assert users.log_off(mine, "alice") == "recycling"
    passes(reconciler)
    clock.now += timedelta(hours=2)
    passes(reconciler)

    after = {d.id: d for d in desktops(ctx)}
    assert mine in after, f"alice's desktop was destroyed by the {path}"
    assert after[mine].state == "ready" and after[mine].version == mine_version
    assert users.connect("alice") == mine
    assert GuestAgent(fake, mine).read_file(NOTES) == b"my thesis, chapter 3"
    # The rest of the pool did move on: bob gets a desktop of the pool's current version.
    current = pools.get("lab").version
    bobs = users.connect("bob")
    assert {d.id: d.version for d in desktops(ctx)}[bobs] == current


def test_a_stateless_outdated_desktop_is_still_replaced_at_logout(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, tmp_path: Path,
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=1))
    users.entitle("alice")
    passes(reconciler, 1)
    mine = alice_works(users, fake)
    publish_v2(ctx, tmp_path)
    PoolService(ctx).rollout("lab")
    assert users.log_off(mine, "alice") == "retiring"
    passes(reconciler)
    assert mine not in {d.id for d in desktops(ctx)}

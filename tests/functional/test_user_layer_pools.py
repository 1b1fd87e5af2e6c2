"""A stateful pool's user layer on the fake hypervisor (issue 14, item 3): each desktop's VM
is defined with its own layer disk, made once and kept through every re-making of the VM (a
crash's repair), removed only with the desktop; the pool's rules refuse what cannot work and
name the field; a desktop with a layer does not move live (its disk would not follow)."""

from __future__ import annotations

import uuid

import pytest

from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.domain.offline import OfflinePolicy
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.drivers.base import layer_volume_name
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.migration import MigrationService
from deskpool.services.pool_admin import PoolAdmin
from deskpool.services.pools import PoolService
from deskpool.services.user_layer_volumes import ensure_layer_volume
from tests.fake_pool_world import Clock
from tests.functional import test_vm_crash as crash_world
from tests.functional.test_vm_crash import after_backoff, desktop, make_pool

ctx, fake, clock, reconciler = (crash_world.ctx, crash_world.fake, crash_world.clock,
                                crash_world.reconciler)
STATEFUL = {"kind": PoolKind.STATEFUL, "assignment": Assignment.DEDICATED,
            "on_logout": OnLogout.RECYCLE_AS_IS}


def layered(ctx: ServiceContext, reconciler: Reconciler) -> uuid.UUID:
    users = make_pool(ctx, "home", user_layer_mib=128, **STATEFUL)
    reconciler.run_pass()
    return users.connect("alice")


def test_each_desktop_boots_with_its_own_layer_disk_kept_through_a_repair(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock
) -> None:
    desktop_id = layered(ctx, reconciler)
    spec = fake.defined_spec(desktop_id)
    assert spec is not None and spec.layer_volume == layer_volume_name(desktop_id)
    made = fake.volume_info(layer_volume_name(desktop_id))
    assert made.capacity_bytes == 128 * 2**20  # the pool's size, an ext4 disk of it

    fake.crash_vm(desktop_id)  # repaired: started again on the same disks
    reconciler.run_pass()
    after_backoff(clock, ctx, desktop_id)
    reconciler.run_pass()
    assert desktop(ctx, desktop_id).state == "ready"
    again = fake.defined_spec(desktop_id)
    assert again is not None and again.layer_volume == layer_volume_name(desktop_id)
    # The VM made again (what a retried provisioning does): the layer is the user's, kept.
    assert ensure_layer_volume(fake, desktop_id, size_mib=256, version=2) == again.layer_volume
    assert fake.volume_info(layer_volume_name(desktop_id)) == made

    DesktopService(ctx).delete(str(desktop_id))
    reconciler.run_pass()
    assert layer_volume_name(desktop_id) not in fake.list_volumes()


def test_a_desktop_with_a_layer_is_not_moved_live(
    ctx: ServiceContext, reconciler: Reconciler
) -> None:
    desktop_id = layered(ctx, reconciler)
    with pytest.raises(Conflict, match="user layer disk, which does not move live"):
        MigrationService(ctx).migrate(str(desktop_id), reason="test")


@pytest.mark.parametrize(("fields", "says"), [
    ({"kind": PoolKind.STATELESS}, "only a stateful pool keeps a user layer"),
    ({**STATEFUL, "clone_mode": "instant"}, "instant clones cannot have a user layer"),
    ({**STATEFUL, "user_layer_mib": 10}, r"user_layer_mib \(10\) must be 0"),
    ({**STATEFUL, "offline": OfflinePolicy(may_go_offline=True)}, "cannot go offline yet"),
])
def test_a_pool_that_cannot_keep_a_layer_is_refused_naming_why(
    fields: dict[str, object], says: str
) -> None:
    spec = {"user_layer_mib": 256, **fields}
    with pytest.raises(InvalidInput, match=says):
        PoolSpec("p", "golden", **spec).validate()  # type: ignore[arg-type]


def test_the_layer_size_changes_only_while_the_pool_is_empty(
    ctx: ServiceContext, reconciler: Reconciler
) -> None:
    layered(ctx, reconciler)
    with pytest.raises(Conflict, match="user_layer_mib"):
        PoolAdmin(ctx).update("home", {"user_layer_mib": 512})
    PoolService(ctx).create(PoolSpec("empty", "golden", **STATEFUL))  # type: ignore[arg-type]
    PoolAdmin(ctx).update("empty", {"user_layer_mib": 512})
    assert PoolService(ctx).get("empty").user_layer_mib == 512

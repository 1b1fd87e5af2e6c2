"""A pool's template disk missing or corrupt, on the fake driver, with the reconciler's clock
moved by hand: the pool is marked broken with the reason (one error event, not one per
desktop per pass), no half-made desktop is left, new desktops are tried once per backoff
(30 s doubling to 10 min), the running desktops are left alone, the admin sees it (pool view,
``deskpool pool show``/``list``), and it clears by itself when the disk is fine again (the file
restored, a new version rolled out) or by the admin's ``clear-fault``."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.domain.models import PowerState
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.base import owned_volume_names
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.audit import Actor, audit_log
from deskpool.services.context import ServiceContext
from deskpool.services.pool_admin import PoolAdmin
from deskpool.services.pools import PoolService, PoolView
from deskpool.services.template_faults import fault_backoff
from deskpool.services.templates import ImageFiles, TemplateService
from tests.broker_world import make_world
from tests.fake_pool_world import Clock, fake_driver, fake_host_context
from tests.pool_users import PoolUsers

URI = "fake://tplfault"
ADMIN = "/api/v1/admin"


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    with fake_host_context(tmp_path, URI, golden=False) as context:
        yield context


@pytest.fixture()
def fake(ctx: ServiceContext) -> FakeDriver:
    return fake_driver(URI)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def reconciler(ctx: ServiceContext, clock: Clock) -> Iterator[Reconciler]:
    found = Reconciler(ctx, workers=2, ready_timeout_s=5, clock=clock)
    yield found
    found.close()


def publish(ctx: ServiceContext, tmp_path: Path, name: str) -> tuple[Path, str]:
    """A new version of template ``golden``: its disk in the template store and the name of
    its copy on a host."""
    disk = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    version = TemplateService(ctx).publish("golden", ImageFiles(disk=disk))
    return Path(version.image_path), f"tv-{version.id}.qcow2"


def make_pool(ctx: ServiceContext) -> PoolUsers:
    PoolService(ctx).create(PoolSpec(name="lab", template="golden", spare=1, max_size=4,
                                     naming_pattern="lab-{n:02}"))
    users = PoolUsers(ctx, "lab")
    users.entitle("alice", "bob")
    return users


def rows(ctx: ServiceContext) -> dict[uuid.UUID, str]:
    with ctx.uow(read_only=True) as uow:
        return {d.id: d.state.value for d in uow.desktops.summaries()}


def events(ctx: ServiceContext, kind: str) -> list[str]:
    with ctx.uow(read_only=True) as uow:
        return [f"{e.severity}: {e.message}" for e in uow.events.recent(100, kind=kind)]


def pool(ctx: ServiceContext) -> PoolView:
    return PoolService(ctx).get("lab")


def cli(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "250"}
    done = subprocess.run([str(Path(sys.executable).parent / "deskpool"), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    return done.stdout


def test_backoff_doubles_from_30_s_to_a_10_min_cap() -> None:
    assert [int(fault_backoff(n).total_seconds()) for n in range(1, 9)] == [
        30, 60, 120, 240, 480, 600, 600, 600]


def test_a_corrupt_host_copy_breaks_the_pool_once_and_backs_off(
    ctx: ServiceContext, tmp_path: Path, fake: FakeDriver, reconciler: Reconciler,
    clock: Clock,
) -> None:
    _v1, v1_volume = publish(ctx, tmp_path, "v1")
    users = make_pool(ctx)
    reconciler.run_pass()
    alices = users.connect("alice")  # the pool now wants a new spare
    users.open_console(alices, "alice")
    fake.tamper_volume(v1_volume)  # bytes of the host's copy change under it
    t0 = clock.now

    report = reconciler.run_pass()
    assert any("is corrupt" in e for e in report.errors), report.errors
    view = pool(ctx)
    assert view.fault is not None
    assert "template 'golden' version 1 cannot be used on host 'h1'" in view.fault
    assert f"volume {v1_volume} on {URI} is corrupt" in view.fault
    assert (view.fault_failures, view.fault_since, view.fault_retry_at) == (
        1, t0, t0 + timedelta(seconds=30))
    # Nothing half-made: the try left no row, no VM, no volume of its own.
    assert rows(ctx) == {alices: "in_use"}
    assert [vm.vm_id for vm in fake.list_vms()] == [alices]
    assert all(v == v1_volume or v in owned_volume_names(alices) for v in fake.list_volumes())
    (event,) = events(ctx, "template-unusable")
    assert event.startswith("error: pool lab: template 'golden' version 1 cannot be used")

    # Waiting: passes make nothing and say why; still one event.
    for seconds in (0, 10, 29):
        clock.now = t0 + timedelta(seconds=seconds)
        report = reconciler.run_pass()
        assert any("lab: broken, next try at" in n for n in report.notes), report.notes
        assert rows(ctx) == {alices: "in_use"} and pool(ctx).fault_failures == 1

    # Each try fails the same way: one desktop per backoff, doubling up to 10 min.
    waits = []
    for expected in (2, 3, 4, 5, 6, 7):
        before = pool(ctx).fault_retry_at
        assert before is not None
        clock.now = before
        reconciler.run_pass()
        after = pool(ctx)
        assert after.fault_failures == expected and after.fault_retry_at is not None
        waits.append(int((after.fault_retry_at - before).total_seconds()))
        assert rows(ctx) == {alices: "in_use"}
    assert waits == [60, 120, 240, 480, 600, 600]
    assert len(events(ctx, "template-unusable")) == 1

    # Alice's desktop went on through all of it.
    assert rows(ctx)[alices] == "in_use"
    assert fake.get_vm(alices).power_state is PowerState.RUNNING

    # The admin sees it: the pool view (the API's), `pool show` and `pool list`.
    shown = cli(tmp_path, "pool", "show", "lab")
    assert "broken" in shown and "7 failed tries" in shown and "is corrupt" in shown, shown
    assert "broken" in cli(tmp_path, "pool", "list")

    # The admin removes the bad copy by hand and clears the fault: the next pass re-imports
    # it from the template store (whose file is fine) and the pool refills.
    fake.delete_volume(v1_volume)
    PoolAdmin(ctx, Actor("admin")).clear_fault("lab")
    assert pool(ctx).fault is None
    assert any("fault cleared by admin" in e for e in events(ctx, "template-usable"))
    reconciler.run_pass()
    states = sorted(rows(ctx).values())
    assert states == ["in_use", "ready"], states
    assert users.connect("bob") != alices
    assert pool(ctx).fault is None
    assert len(events(ctx, "template-unusable")) == 1


def test_a_corrupt_then_missing_template_file_is_tried_at_once_when_restored(
    ctx: ServiceContext, tmp_path: Path, fake: FakeDriver, reconciler: Reconciler,
    clock: Clock,
) -> None:
    v1, v1_volume = publish(ctx, tmp_path, "v1")
    good = v1.read_bytes()
    with v1.open("r+b") as disk:  # bit rot in the template store before any host has it
        disk.seek(4096)
        disk.write(b"\xde\xad\xbe\xef")
    make_pool(ctx)
    t0 = clock.now
    reconciler.run_pass()
    view = pool(ctx)
    assert view.fault is not None and "checksum of" in view.fault, view.fault
    assert rows(ctx) == {} and fake.list_vms() == [] and fake.list_volumes() == []

    # Now the file is gone altogether: a new reason, so one more event.
    v1.unlink()
    clock.now = t0 + timedelta(seconds=30)
    reconciler.run_pass()
    view = pool(ctx)
    assert view.fault is not None and "does not exist" in view.fault
    assert view.fault_failures == 2 and view.fault_since == t0
    assert len(events(ctx, "template-unusable")) == 2
    assert rows(ctx) == {} and fake.list_volumes() == []

    # Restored well before the next try is due (60 s): the next pass notices the file
    # changed and tries at once; the pool is whole again and says so.
    clock.now = t0 + timedelta(seconds=40)
    v1.write_bytes(good)
    report = reconciler.run_pass()
    assert any("its template disk file changed" in n for n in report.notes), report.notes
    assert pool(ctx).fault is None
    assert list(rows(ctx).values()) == ["ready"]
    assert v1_volume in fake.list_volumes()
    (healed,) = events(ctx, "template-usable")
    assert "usable again on host h1" in healed and "after 2 failed tries" in healed


def test_a_new_version_rolled_out_ends_the_fault(
    ctx: ServiceContext, tmp_path: Path, fake: FakeDriver, reconciler: Reconciler,
    clock: Clock,
) -> None:
    v1, _ = publish(ctx, tmp_path, "v1")
    v1.unlink()
    make_pool(ctx)
    reconciler.run_pass()
    assert pool(ctx).fault is not None
    publish(ctx, tmp_path, "v2")
    PoolService(ctx).rollout("lab")
    reconciler.run_pass()  # no wait for the backoff: the fault was version 1's
    assert pool(ctx).fault is None
    assert list(rows(ctx).values()) == ["ready"]
    assert any("now makes its desktops from version 2" in e
               for e in events(ctx, "template-usable"))
    with pytest.raises(Exception, match="has no template fault"):
        PoolAdmin(ctx, Actor("admin")).clear_fault("lab")


def test_the_admin_api_shows_the_fault_and_clears_it(tmp_path: Path) -> None:
    world = make_world(tmp_path, host_uri="fake://tplfault-api")
    try:
        world.pool("lab", spare=1)
        world.user("root", admin=True)
        world.fill(passes=1)
        (volume,) = [v for v in world.fake.list_volumes() if v.startswith("tv-")]
        world.fake.tamper_volume(volume)
        admin = world.client("root")
        assert admin.post(f"{ADMIN}/pools/lab/resize", json={"spare": 2}).status_code == 200
        world.fill(passes=2)
        (listed,) = admin.get(f"{ADMIN}/pools").json()
        assert "template 'golden' version 1 cannot be used on host 'h1'" in listed["fault"]
        assert listed["fault_failures"] == 1 and listed["fault_retry_at"] is not None
        assert listed["counts"] == {"ready": 1}  # the try left no desktop behind
        world.fake.delete_volume(volume)  # fixed by hand: the next try re-imports it
        cleared = admin.post(f"{ADMIN}/pools/lab/clear-fault")
        assert cleared.status_code == 200 and cleared.json()["fault"] is None
        again = admin.post(f"{ADMIN}/pools/lab/clear-fault")
        assert again.status_code == 409 and "has no template fault" in again.json()["detail"]
        assert audit_log(world.ctx, target="pool/lab")[0].action == "pool.clear-fault"
        world.fill(passes=1)
        assert admin.get(f"{ADMIN}/pools").json()[0]["counts"] == {"ready": 2}
    finally:
        world.ctx.close()

"""Rebasing a layered desktop onto its pool's new template version (issue 14), on the fake
hypervisor: at its user's logoff and, free and ready, by the reconciler; a failed rebase
puts it back on its own version for its user; a broker dying mid-way finishes at the next
pass; pools without user layers behave as before.

The fake cannot run the guest's rebase, so ``GuestRebase`` plays the guest's part of the
contract: at a boot with the old root attached it leaves the report where the running guest
shows it, or (failing) never lets its agent answer."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain.errors import Conflict
from deskpool.domain.layers import LayerConflict, RebaseReport
from deskpool.domain.models import VmSpec
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import layer_volume_name
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.factory import version_volume_names
from deskpool.services.layer_rebase_boot import REPORT_PATH, request_rebase
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.user_layers import UserLayerViews
from tests.fake_pool_world import Clock, fake_driver, fake_host_context
from tests.pool_users import PoolUsers

URI = "fake://rebase"
LAYERED = {"kind": PoolKind.STATEFUL, "assignment": Assignment.DEDICATED,
           "on_logout": OnLogout.RECYCLE_AS_IS, "user_layer_mib": 128}
REPORT = RebaseReport(old_version="1", new_version="2", kept=["/etc/hosts", "/opt/app/x"],
                      dropped=["/usr/lib/old.so"],
                      conflicts=[LayerConflict("/etc/app.conf", "changed in both",
                                               "/etc/app.conf.user")], bytes=4096)


def publish(ctx: ServiceContext, tmp_path: Path, n: int) -> None:
    """Template ``golden`` version ``n``, booted by direct kernel boot."""
    disk, kernel, initrd = (tmp_path / f"v{n}.qcow2", tmp_path / f"v{n}.vmlinuz",
                            tmp_path / f"v{n}.initrd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    kernel.write_bytes(b"kernel %d" % n)
    initrd.write_bytes(b"initrd %d" % n)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk, kernel=kernel, initrd=initrd,
                                                      cmdline="console=ttyS0"))


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    with fake_host_context(tmp_path, URI, golden=False) as context:
        publish(context, tmp_path, 1)
        yield context


@pytest.fixture()
def fake(ctx: ServiceContext) -> FakeDriver:
    return fake_driver(URI)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def reconciler(ctx: ServiceContext, clock: Clock) -> Reconciler:
    return Reconciler(ctx, workers=2, ready_timeout_s=2, clock=clock)


class GuestRebase:
    """The guest's side of a rebase boot (a VM defined with ``layer_base_volume``): the
    report left at ``REPORT_PATH`` (``ok``), or a boot that stops before the agent starts
    (``fail``). ``boots``: the specs of the rebase boots, in order."""

    def __init__(self, fake: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fake, self.mode = fake, "ok"
        self.boots: list[VmSpec] = []
        self.then: list[tuple[str, Exception]] = []  # faults armed after a rebase boot
        self._start = fake.start_vm
        monkeypatch.setattr(fake, "start_vm", self.start_vm)

    def start_vm(self, vm_id: uuid.UUID) -> None:
        spec = self.fake.defined_spec(vm_id)
        rebasing = spec is not None and spec.layer_base_volume is not None
        silent = rebasing and self.mode == "fail"
        if silent:
            self.fake.agent_delay_polls = 10**9  # the boot stops: its agent never answers
        try:
            self._start(vm_id)
        finally:
            self.fake.agent_delay_polls = 0
        if not rebasing:
            return
        assert spec is not None
        self.boots.append(spec)
        if self.mode == "ok":
            GuestAgent(self.fake, vm_id).write_file(
                REPORT_PATH, json.dumps(REPORT.to_json()).encode())
        for point, error in self.then:
            self.fake.fail_next(point, error)
        self.then.clear()


@pytest.fixture()
def guest(fake: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> GuestRebase:
    return GuestRebase(fake, monkeypatch)


def version_of(ctx: ServiceContext, desktop_id: uuid.UUID) -> tuple[str, int]:
    found = DesktopService(ctx).get(str(desktop_id))
    return found.state, found.version


def root_of(ctx: ServiceContext, number: int) -> str:
    with ctx.uow(read_only=True) as uow:
        template = uow.templates.get_by_name("golden")
        return version_volume_names(uow.versions.get_by_number(template.id, number))[0]


def cmdline(spec: VmSpec | None) -> str:
    assert spec is not None and spec.direct_boot is not None
    return spec.direct_boot.cmdline


def alice_on_v1_then_rollout(ctx: ServiceContext, reconciler: Reconciler, tmp_path: Path,
                             **pool: object) -> tuple[PoolUsers, uuid.UUID]:
    """Alice at work on her layered desktop (version 1) when version 2 is rolled out."""
    PoolService(ctx).create(PoolSpec(**{"name": "home", "template": "golden", "spare": 1,
                                        "max_size": 3, "naming_pattern": "home-{n:02}",
                                        **LAYERED, **pool}))  # type: ignore[arg-type]
    users = PoolUsers(ctx, "home")
    users.entitle("alice", "bob")
    reconciler.run_pass()
    mine = users.connect("alice")
    users.open_console(mine, "alice")
    reconciler.run_pass()  # the pool's spare made again
    publish(ctx, tmp_path, 2)
    assert PoolService(ctx).rollout("home").version == 2
    return users, mine


def test_a_logoff_rebases_the_layer_onto_the_new_version(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, guest: GuestRebase,
    tmp_path: Path,
) -> None:
    users, mine = alice_on_v1_then_rollout(ctx, reconciler, tmp_path)
    layer = layer_volume_name(mine)
    before = fake.volume_info(layer)
    assert "deskpool.layer_version=1" in cmdline(fake.defined_spec(mine))
    reconciler.run_pass()
    assert mine not in {b.vm_id for b in guest.boots}, "in use: not rebased under her"

    assert users.log_off(mine, "alice") == "recycling"
    report = reconciler.run_pass()
    assert report.errors == []

    # The rebase boot: the new root, her layer, the old root beside it, told the version.
    (boot,) = [b for b in guest.boots if b.vm_id == mine]
    assert boot.layer_volume == layer and boot.layer_base_volume == root_of(ctx, 1)
    assert boot.base_volume == root_of(ctx, 2)
    assert "deskpool.layer_version=2" in cmdline(boot)
    assert cmdline(boot).startswith("console=ttyS0")
    # The guest's report is kept, the row moved on, and the final VM pins no old version.
    last = UserLayerViews(ctx).desktop_layer(mine).last_rebase
    assert last is not None and last.outcome == "rebased"
    assert (last.old_version, last.new_version, last.kept, last.dropped) == (1, 2, 2, 1)
    assert [c.path for c in last.conflicts] == ["/etc/app.conf"]
    assert version_of(ctx, mine) == ("ready", 2)
    final = fake.defined_spec(mine)
    assert final is not None and final.layer_base_volume is None
    assert final.layer_volume == layer and final.base_volume == root_of(ctx, 2)
    assert "deskpool.layer_version=2" in cmdline(final)
    assert fake.volume_info(layer) == before  # her layer: the same disk throughout
    assert UserLayerViews(ctx).pool_layers("home").awaiting_rebase == 0
    assert users.connect("alice") == mine  # still hers, now on version 2
    reconciler.run_pass()
    assert len([b for b in guest.boots if b.vm_id == mine]) == 1  # once, not every pass


def test_a_free_ready_desktop_is_rebased_by_the_reconciler_and_one_in_use_waits(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, guest: GuestRebase,
    tmp_path: Path,
) -> None:
    _users, mine = alice_on_v1_then_rollout(ctx, reconciler, tmp_path)
    spare = [d.id for d in DesktopService(ctx).list() if d.id != mine]
    assert len(spare) == 1 and version_of(ctx, spare[0]) == ("ready", 1)
    assert UserLayerViews(ctx).pool_layers("home").awaiting_rebase == 2
    with pytest.raises(Conflict, match="in use by alice: its user layer is rebased when "
                                       "they log off"):
        request_rebase(ctx, mine)
    reconciler.run_pass()
    assert version_of(ctx, spare[0]) == ("ready", 2)
    assert [b.vm_id for b in guest.boots] == spare
    assert version_of(ctx, mine) == ("in_use", 1)
    assert UserLayerViews(ctx).pool_layers("home").awaiting_rebase == 1
    with pytest.raises(Conflict, match="already runs its pool's version 2"):
        request_rebase(ctx, spare[0])


def test_a_failed_rebase_leaves_the_desktop_on_its_version_ready_for_its_user(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, guest: GuestRebase,
    tmp_path: Path,
) -> None:
    users, mine = alice_on_v1_then_rollout(ctx, reconciler, tmp_path, max_size=1)
    layer = layer_volume_name(mine)
    before = fake.volume_info(layer)
    guest.mode = "fail"
    users.log_off(mine, "alice")
    reconciler.run_pass()

    assert [b.vm_id for b in guest.boots] == [mine]
    assert version_of(ctx, mine) == ("ready", 1)
    final = fake.defined_spec(mine)
    assert final is not None and final.layer_base_volume is None
    assert final.layer_volume == layer and final.base_volume == root_of(ctx, 1)
    assert "deskpool.layer_version=1" in cmdline(final)
    assert fake.volume_info(layer) == before
    last = UserLayerViews(ctx).desktop_layer(mine).last_rebase
    assert last is not None and last.outcome == "failed"
    assert last.error is not None and "runs version 1 again" in last.error
    failed = [e for e in recent_events(ctx) if e.kind == "layer-rebase-failed"]
    assert failed and "could not be rebased from version 1 to 2" in failed[0].message
    layers = UserLayerViews(ctx).pool_layers("home")
    assert (layers.failed, layers.awaiting_rebase) == (1, 1)
    # Not retried at every pass (she would wait on a failing boot each time): at her next
    # logoff, or when an administrator asks.
    reconciler.run_pass()
    assert len(guest.boots) == 1
    assert users.connect("alice") == mine
    users.open_console(mine, "alice")
    guest.mode = "ok"
    users.log_off(mine, "alice")
    reconciler.run_pass()
    assert version_of(ctx, mine) == ("ready", 2)


def test_an_administrator_rebases_a_ready_desktop_now(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, guest: GuestRebase,
    tmp_path: Path,
) -> None:
    users, mine = alice_on_v1_then_rollout(ctx, reconciler, tmp_path, max_size=1)
    guest.mode = "fail"
    users.log_off(mine, "alice")
    reconciler.run_pass()
    assert version_of(ctx, mine) == ("ready", 1)
    guest.mode = "ok"
    _id, name = request_rebase(ctx, mine)
    assert version_of(ctx, mine) == ("recycling", 1)
    reconciler.run_pass()
    assert version_of(ctx, mine) == ("ready", 2)
    assert name in {e.desktop for e in recent_events(ctx) if e.kind == "layer-rebased"}


@pytest.mark.parametrize("when", ["before-the-switch", "after-the-switch"])
def test_a_broker_dying_mid_rebase_finishes_it_at_the_next_pass(
    when: str, ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver,
    guest: GuestRebase, clock: Clock, tmp_path: Path,
) -> None:
    users, mine = alice_on_v1_then_rollout(ctx, reconciler, tmp_path, max_size=1)
    layer = layer_volume_name(mine)
    before = fake.volume_info(layer)
    died = RuntimeError("broker killed")
    if when == "before-the-switch":
        fake.fail_next("create_vm.define", died)  # making the rebase boot's VM
    else:
        guest.then.append(("create_vm.define", died))  # making the final VM
    users.log_off(mine, "alice")
    reconciler.run_pass()
    assert version_of(ctx, mine) == ("recycling", 1 if when == "before-the-switch" else 2)

    with ctx.uow(read_only=True) as uow:
        clock.now = uow.desktops.get(mine).next_attempt_at or clock.now
    reconciler.run_pass()
    assert version_of(ctx, mine) == ("ready", 2)
    final = fake.defined_spec(mine)
    assert final is not None and final.layer_base_volume is None
    assert fake.volume_info(layer) == before
    rebases = [e for e in recent_events(ctx) if e.kind == "layer-rebased"]
    assert len(rebases) == 1  # recorded once
    assert users.connect("alice") == mine


@pytest.mark.parametrize("kind", ["stateless", "stateful without a layer"])
def test_pools_without_user_layers_behave_as_before(
    kind: str, ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver,
    guest: GuestRebase, tmp_path: Path,
) -> None:
    pool = ({"kind": PoolKind.STATELESS, "assignment": Assignment.FLOATING,
             "on_logout": OnLogout.RECYCLE_REVERT, "user_layer_mib": 0}
            if kind == "stateless" else {"user_layer_mib": 0})
    users, mine = alice_on_v1_then_rollout(ctx, reconciler, tmp_path, **pool)
    spec = fake.defined_spec(mine)
    assert spec is not None and spec.layer_volume is None
    assert "deskpool.layer_version" not in cmdline(spec)
    outcome = users.log_off(mine, "alice")
    for _ in range(2):
        reconciler.run_pass()
    assert guest.boots == []
    if kind == "stateless":
        assert outcome == "retiring"
        assert mine not in {d.id for d in DesktopService(ctx).list()}
    else:  # kept on its version, its user's
        assert outcome == "recycling"
        assert version_of(ctx, mine) == ("ready", 1)
        with pytest.raises(Conflict, match="has no user layer to rebase"):
            request_rebase(ctx, mine)

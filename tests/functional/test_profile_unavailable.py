"""A roaming profile that cannot be plugged in at logon (a committed layer missing or
damaged, the profile store full): the user still gets a desktop with a temporary home on a
floating pool, told so in the answer and their portal, or a clear refusal on a stateful one;
the admin gets an error event naming why; no committed generation changes. Fake driver,
scripted session hook, real qcow2 layers (as tests/functional/test_profile_logon.py)."""

from __future__ import annotations

import errno
import hashlib
import subprocess
from pathlib import Path

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.profile_logon import ProfileUnavailable
from deskpool.domain.pools import Assignment, OnLogout, PoolKind
from deskpool.domain.profiles import LayerState
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.images import profile_disks
from deskpool.services.events import messages_for
from tests.broker_world import BrokerWorld, make_world
from tests.functional import test_profile_logon as logon_world
from tests.functional.test_profile_logon import (
    ANN,
    Hook,
    events,
    generation,
    layers,
    log_off_and_recycle,
    state_of,
)
from tests.functional.test_profile_views import cli

# The profile-logon tests' scripted session hook, on every fake desktop.
hook = logon_world.hook


def committed_files(w: BrokerWorld) -> dict[int, str]:
    """Each committed generation's file checksum ("missing" for a file that is gone)."""
    found = {}
    for layer in layers(w, LayerState.COMMITTED):
        path = Path(layer.path)
        found[layer.generation] = (hashlib.sha256(path.read_bytes()).hexdigest()
                                   if path.is_file() else "missing")
    return found


def at_generation_two(tmp_path: Path, **pool: object) -> tuple[BrokerWorld, Path]:
    """A world where Ann logged on and off once (generation 2 committed); the path of
    generation 2's file."""
    w = make_world(tmp_path)
    w.pool("lab", spare=1, max_size=2, roaming_profiles=True, **pool)
    EntitlementService(w.ctx).grant("lab", "group", "staff")
    w.fill(passes=2)
    first = Broker(w.ctx).connect(ANN, "lab")
    assert first.status == "ready" and first.desktop_id is not None, first.message
    log_off_and_recycle(w, first.desktop_id)
    assert generation(w) == 2
    (top,) = [la for la in layers(w, LayerState.COMMITTED) if la.generation == 2]
    return w, Path(top.path)


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    else:  # its qcow2 header overwritten: qemu-img no longer reads it as a layer
        with path.open("r+b") as handle:
            handle.write(b"\0" * 512)


@pytest.mark.parametrize("how", ["missing", "damaged"])
def test_a_floating_pool_gives_a_temporary_home_and_both_are_told(
        tmp_path: Path, hook: Hook, how: str) -> None:
    w, top = at_generation_two(tmp_path)
    try:
        damage(top, how)
        before = committed_files(w)
        handover = Broker(w.ctx).connect(ANN, "lab")
        assert handover.status == "ready", handover.message
        assert "temporary home" in handover.message
        start = hook.argv_of("start")[-1]
        assert "--profile" not in start and start[1] == "ann", start
        (admin,) = events(w, "profile-unavailable")
        assert admin[0] == "error" and "generation 2" in admin[1]
        assert ("is missing" if how == "missing" else "is damaged") in admin[1], admin
        (told,) = [m for m in messages_for(w.ctx, ANN.name) if m.kind == "profile-temporary"]
        assert handover.desktop in told.message and "not kept" in told.message
        assert str(top) not in told.message  # the store's paths are the admin's
        # Nothing committed changed, now or at this session's logoff.
        assert handover.desktop_id is not None
        ends = len(hook.argv_of("end"))
        log_off_and_recycle(w, handover.desktop_id)
        assert len(hook.argv_of("end")) == ends  # no profile to end
        assert generation(w) == 2 and committed_files(w) == before
        assert layers(w, LayerState.SESSION) == []
    finally:
        w.ctx.close()
        forget_fake_hosts()


def test_a_stateful_pool_refuses_clearly_and_gives_the_desktop_back(
        tmp_path: Path, hook: Hook) -> None:
    w, top = at_generation_two(tmp_path, kind=PoolKind.STATEFUL,
                               assignment=Assignment.DEDICATED,
                               on_logout=OnLogout.RECYCLE_AS_IS)
    try:
        damage(top, "damaged")
        before = committed_files(w)
        with pytest.raises(ProfileUnavailable, match="roaming profile cannot be loaded"):
            Broker(w.ctx).connect(ANN, "lab")
        (refused,) = events(w, "profile-refused")
        assert refused[0] == "error" and "is damaged" in refused[1], refused
        # The desktop was not at fault: it is not failed, and no session layer is left.
        with w.ctx.uow(read_only=True) as uow:
            states = {d.name: d.state.value for d in uow.desktops.list()}
        assert "error" not in states.values(), states
        assert layers(w, LayerState.SESSION) == []
        assert generation(w) == 2 and committed_files(w) == before
    finally:
        w.ctx.close()
        forget_fake_hosts()


def test_a_full_profile_store_gives_a_temporary_home(
        tmp_path: Path, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    w, _top = at_generation_two(tmp_path)
    try:
        before = committed_files(w)

        def full(base: Path, path: Path) -> Path:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(profile_disks, "create_overlay", full)
        handover = Broker(w.ctx).connect(ANN, "lab")
        assert handover.status == "ready" and "temporary home" in handover.message
        (admin,) = events(w, "profile-unavailable")
        assert "No space left on device" in admin[1]
        assert handover.desktop_id is not None and state_of(w, handover.desktop_id) in (
            "reserved", "in_use")
        assert generation(w) == 2 and committed_files(w) == before
    finally:
        w.ctx.close()
        forget_fake_hosts()


def test_verify_finds_changed_data_that_the_logon_check_cannot_see(
        tmp_path: Path, hook: Hook) -> None:
    w, top = at_generation_two(tmp_path)
    try:
        admin = w.client(w.user("root-admin", admin=True))
        clean = admin.post("/api/v1/admin/profiles/ann/verify")
        assert clean.status_code == 200 and clean.json() == {"user": "ann", "problems": []}
        # Data changed under consistent metadata (what a flipped bit on disk looks like to
        # qemu-img check): the logon's check passes, the checksum does not.
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x55 1M 4k", str(top)],
                       check=True, capture_output=True)
        assert profile_disks.check_layer(top).error is None
        report = admin.post("/api/v1/admin/profiles/ann/verify").json()
        (problem,) = report["problems"]
        assert problem.startswith("generation 2:") and "is corrupt: sha256" in problem
        assert [s for s, _m in events(w, "profile-corrupt")] == ["error"]
        run = cli(w, "profile", "verify", "ann")
        assert run.returncode == 1 and "corrupt" in run.stdout and "generation 2" in run.stdout
        unknown = admin.post("/api/v1/admin/profiles/nobody/verify")
        assert unknown.status_code == 404 and "nobody has no roaming profile" in unknown.text
    finally:
        w.ctx.close()
        forget_fake_hosts()

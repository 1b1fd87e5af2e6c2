"""Roaming profiles at logon and logoff through the broker and the reconciler, on the fake
driver with a scripted session hook (the fake guest cannot run the shell script: its
``start`` / ``check`` / ``end`` answers are scripted and travel through the fake guest
agent's ``guest-exec`` like the real ones). The profile layers are real qcow2 files."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import AgentUnavailable, Unavailable
from deskpool.domain.profile_merge import LayerMode, SecondSession
from deskpool.domain.profiles import LayerState, disk_serial
from deskpool.domain.users import Identity
from deskpool.drivers.fake.guest import FakeGuest, _Process
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.reconciler.loop import Reconciler
from deskpool.services.events import messages_for
from deskpool.services.profile_desktops import SESSION_HOOK
from deskpool.store.access_models import Event
from deskpool.store.models import Desktop
from tests.broker_world import BrokerWorld, make_world

ANN = Identity(name="ann", display_name="Ann", source="local", groups=frozenset({"staff"}))


@dataclass
class Hook:
    """Every fake desktop's session hook: the argv of each call, by hostname; ``end`` answers
    ``end_code`` (3: the profile stays busy) or, with ``end_silent``, the agent goes quiet."""

    calls: list[tuple[str, list[str]]] = field(default_factory=list)
    end_code: int = 0
    end_silent: bool = False
    session_starts: bool = True

    def run(self, host: str, argv: list[str]) -> tuple[int, str, str]:
        self.calls.append((host, argv))
        sub = argv[1]
        if sub == "start":
            return 0, "starting\n", ""
        if sub in ("check", "wait"):
            return (0 if self.session_starts else 1), "", ""
        if sub == "status":
            return 0, '{"sessions": []}\n', ""
        if sub == "end":
            if self.end_code:
                return self.end_code, "", "session-hook: the profile stays busy"
            return 0, "unmounted\n", ""
        return 2, "", "usage"

    def argv_of(self, sub: str) -> list[list[str]]:
        return [argv[1:] for _host, argv in self.calls if argv[1] == sub]


@pytest.fixture()
def hook(monkeypatch: pytest.MonkeyPatch) -> Hook:
    script = Hook()
    original = FakeGuest.execute

    def execute(guest: FakeGuest, command: str, arguments: dict[str, Any]) -> Any:
        guest._files.setdefault(SESSION_HOOK, b"#!/bin/sh\n")  # the desktop flavor's file
        argv = [str(a) for a in arguments.get("arg", [])]
        if command == "guest-exec" and argv[:1] == [SESSION_HOOK]:
            if script.end_silent and argv[1:2] == ["end"]:
                raise AgentUnavailable(f"guest agent of {guest._hostname()} is not responding")
            code, out, err = script.run(guest._hostname(), argv)
            guest._next_id += 1
            guest._procs[guest._next_id] = _Process(code, out.encode(), err.encode(), True)
            return {"pid": guest._next_id}
        return original(guest, command, arguments)

    monkeypatch.setattr(FakeGuest, "execute", execute)
    return script


def world_with(tmp_path: Path, *, roaming: bool) -> BrokerWorld:
    w = make_world(tmp_path)
    w.pool("lab", spare=2, max_size=2, roaming_profiles=roaming)
    EntitlementService(w.ctx).grant("lab", "group", "staff")
    w.fill(passes=2)
    return w


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = world_with(tmp_path, roaming=True)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def layers(w: BrokerWorld, state: LayerState) -> list[Any]:
    with w.ctx.uow(read_only=True) as uow:
        return [la for la in uow.profiles.layers_in_state(state) if la.user == ANN.name]


def generation(w: BrokerWorld) -> int:
    with w.ctx.uow(read_only=True) as uow:
        return uow.profiles.get(ANN.name).generation


def events(w: BrokerWorld, kind: str) -> list[tuple[str, str]]:
    with w.ctx.uow(read_only=True) as uow:
        return [(e.severity, e.message) for e in uow.session.scalars(
            select(Event).where(Event.kind == kind))]


def state_of(w: BrokerWorld, desktop_id: uuid.UUID) -> str:
    with w.ctx.uow(read_only=True) as uow:
        return uow.session.get(Desktop, desktop_id).state.value  # type: ignore[union-attr]


def log_off_and_recycle(w: BrokerWorld, desktop_id: uuid.UUID) -> None:
    SessionService(w.ctx).log_off(desktop_id, by=None, reason="the user logged off")
    reconciler = Reconciler(w.ctx, workers=1, ready_timeout_s=5)
    for _ in range(3):
        report = reconciler.run_pass()
        assert not report.errors, report.errors
        if state_of(w, desktop_id) == "ready":
            return
    raise AssertionError(f"the desktop did not come back: {state_of(w, desktop_id)}")


def test_logon_plugs_the_profile_in_and_passes_its_serial_to_the_hook(
        world: BrokerWorld, hook: Hook) -> None:
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.status == "ready", handover.message
    assert handover.desktop_id is not None
    (session,) = layers(world, LayerState.SESSION)
    serial = disk_serial(session.id)
    assert session.desktop == handover.desktop and generation(world) == 1
    assert serial in world.fake.attached_disks(handover.desktop_id)
    (start,) = hook.argv_of("start")
    assert start[:3] == ["start", "--profile", serial] and start[3] == "ann", start
    # A reconnect finds the same disk: no second session layer, the same serial.
    again = Broker(world.ctx).connect(ANN, "lab")
    assert again.reconnect and again.desktop_id == handover.desktop_id
    assert [la.id for la in layers(world, LayerState.SESSION)] == [session.id]
    assert hook.argv_of("start")[-1][:3] == ["start", "--profile", serial]


def test_logoff_ends_the_session_in_the_guest_and_commits_the_next_generation(
        world: BrokerWorld, hook: Hook) -> None:
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.desktop_id is not None
    (session,) = layers(world, LayerState.SESSION)
    log_off_and_recycle(world, handover.desktop_id)
    assert [argv[:2] for argv in hook.argv_of("end")] == [["end", "ann"]]
    assert generation(world) == 2
    assert [la.id for la in layers(world, LayerState.COMMITTED)
            if la.generation == 2] == [session.id]
    assert world.fake.attached_disks(handover.desktop_id) == {}
    assert any("generation 2 committed" in m for _s, m in events(world, "profile-committed"))
    # The next logon, on either desktop, opens a session on generation 2.
    Broker(world.ctx).connect(ANN, "lab")
    (second,) = layers(world, LayerState.SESSION)
    assert second.base_generation == 2 and second.parent_id == session.id


@pytest.mark.parametrize("failure", ["silent", "busy"])
def test_a_guest_that_cannot_unmount_leaves_the_layer_unclean_and_the_recycle_goes_on(
        world: BrokerWorld, hook: Hook, failure: str) -> None:
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.desktop_id is not None
    (session,) = layers(world, LayerState.SESSION)
    if failure == "silent":
        hook.end_silent = True
    else:
        hook.end_code = 3
    log_off_and_recycle(world, handover.desktop_id)  # back to ready: reverted all the same
    assert generation(world) == 1  # nothing committed
    assert [la.id for la in layers(world, LayerState.UNCLEAN)] == [session.id]
    (unclean,) = events(world, "profile-unclean")
    assert unclean[0] == "warning" and "powered off" in unclean[1], unclean
    assert ("did not answer" if failure == "silent" else "stays busy") in unclean[1]
    assert world.fake.attached_disks(handover.desktop_id) == {}  # released by the power-off


def test_a_session_that_does_not_start_ends_its_profile_at_once(
        world: BrokerWorld, hook: Hook) -> None:
    hook.session_starts = False
    with pytest.raises(Unavailable):
        Broker(world.ctx).connect(ANN, "lab")
    # Both desktops were tried; each plugged the profile in and ended it: nothing is left
    # open or plugged into a desktop that is failed and replaced.
    assert len(hook.argv_of("end")) == 2
    assert layers(world, LayerState.SESSION) == []
    assert all(world.fake.attached_disks(vm.vm_id) == {} for vm in world.fake.list_vms())


def test_a_pool_without_roaming_profiles_plugs_nothing_in(tmp_path: Path, hook: Hook) -> None:
    w = world_with(tmp_path, roaming=False)
    try:
        handover = Broker(w.ctx).connect(ANN, "lab")
        assert handover.status == "ready" and handover.desktop_id is not None
        (start,) = hook.argv_of("start")
        assert "--profile" not in start and start[1] == "ann"
        assert w.fake.attached_disks(handover.desktop_id) == {}
        with w.ctx.uow(read_only=True) as uow:
            assert uow.profiles.find(ANN.name) is None
        log_off_and_recycle(w, handover.desktop_id)
        assert hook.argv_of("end") == []  # nothing to end
    finally:
        w.ctx.close()
        forget_fake_hosts()


def two_pool_world(tmp_path: Path, policy: str) -> BrokerWorld:
    """Two roaming pools, the second with ``policy`` for a second concurrent session."""
    w = make_world(tmp_path)
    w.pool("lab", spare=1, max_size=1, roaming_profiles=True)
    w.pool("labs", spare=1, max_size=1, roaming_profiles=True,
           second_session=SecondSession(policy))
    for pool in ("lab", "labs"):
        EntitlementService(w.ctx).grant(pool, "group", "staff")
    w.fill(passes=2)
    return w


def reserved(w: BrokerWorld) -> list[str]:
    with w.ctx.uow(read_only=True) as uow:
        return [d.name for d in uow.session.scalars(select(Desktop))
                if d.assigned_user is not None]


def test_a_second_session_is_refused_by_pool_policy_before_anything_is_reserved(
        tmp_path: Path, hook: Hook) -> None:
    w = two_pool_world(tmp_path, "refuse")
    try:
        first = Broker(w.ctx).connect(ANN, "lab")
        assert first.status == "ready"
        with pytest.raises(Unavailable, match=f"your profile is in use on {first.desktop}; "
                                              "log off there first"):
            Broker(w.ctx).connect(ANN, "labs")
        assert reserved(w) == [first.desktop]
        assert [la.desktop for la in layers(w, LayerState.SESSION)] == [first.desktop]
    finally:
        w.ctx.close()
        forget_fake_hosts()


@pytest.mark.parametrize("policy", ["read_only", "merge"])
def test_a_second_session_gets_the_pools_mode_and_the_user_is_told(
        tmp_path: Path, hook: Hook, policy: str) -> None:
    w = two_pool_world(tmp_path, policy)
    try:
        first = Broker(w.ctx).connect(ANN, "lab")
        second = Broker(w.ctx).connect(ANN, "labs")
        assert second.status == "ready", second.message
        by_desktop = {la.desktop: la for la in layers(w, LayerState.SESSION)}
        assert by_desktop[first.desktop].mode is LayerMode.EXCLUSIVE
        expected = LayerMode.READ_ONLY if policy == "read_only" else LayerMode.MERGE
        assert by_desktop[second.desktop].mode is expected
        (told,) = [m for m in messages_for(w.ctx, ANN.name)
                   if m.kind == "profile-second-session"]
        assert f"also open on {first.desktop}" in told.message
        assert ("read-only" if policy == "read_only" else "merged") in told.message
        # The read-only session logs off first: dropped, generation unchanged.
        assert second.desktop_id is not None
        log_off_and_recycle(w, second.desktop_id)
        assert generation(w) == (1 if policy == "read_only" else 2)
    finally:
        w.ctx.close()
        forget_fake_hosts()


def test_the_second_session_policy_is_set_shown_and_checked_through_the_api(
        world: BrokerWorld) -> None:
    admin = world.client(world.user("root-admin", admin=True))
    made = admin.post("/api/v1/admin/pools", json={
        "name": "solo", "template": "golden", "spare": 0, "max_size": 1,
        "naming_pattern": "solo-{n:02}", "roaming_profiles": True,
        "second_session": "refuse"})
    assert made.status_code == 200, made.text
    assert made.json()["second_session"] == "refuse"
    changed = admin.patch("/api/v1/admin/pools/solo", json={"second_session": "read_only"})
    assert changed.status_code == 200, changed.text
    shown = {p["name"]: p["second_session"] for p in admin.get("/api/v1/admin/pools").json()}
    assert shown == {"lab": "merge", "solo": "read_only"}
    refused = admin.patch("/api/v1/admin/pools/solo", json={"second_session": "twice"})
    assert refused.status_code == 422 and "second_session" in refused.text
    assert any(e["action"] == "pool.update" and "second_session" in e["message"]
               for e in admin.get("/api/v1/admin/audit").json())


def test_the_pools_exclusions_reach_the_hook_and_are_checked(
        tmp_path: Path, hook: Hook) -> None:
    w = make_world(tmp_path)
    try:
        w.pool("lab", spare=1, max_size=1, roaming_profiles=True,
               profile_exclusions=("Scratch space", "~/.cache", ".local/share/Trash"))
        EntitlementService(w.ctx).grant("lab", "group", "staff")
        w.fill(passes=2)
        assert Broker(w.ctx).connect(ANN, "lab").status == "ready"
        (start,) = hook.argv_of("start")
        assert start[3:7] == ["--exclude", "Scratch space", "--exclude",
                              ".local/share/Trash"], start  # ~/.cache is the hook's own
        admin = w.client(w.user("root-admin", admin=True))
        for bad, status in (("../etc", 400), ("/etc", 422), ("a\nb", 422)):
            refused = admin.patch("/api/v1/admin/pools/lab",
                                  json={"profile_exclusions": [bad]})
            assert refused.status_code == status, (bad, refused.text)
        ok = admin.patch("/api/v1/admin/pools/lab", json={"profile_exclusions": ["Music"]})
        assert ok.status_code == 200 and ok.json()["profile_exclusions"] == ["Music"]
    finally:
        w.ctx.close()
        forget_fake_hosts()

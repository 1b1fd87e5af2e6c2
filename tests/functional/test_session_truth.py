"""Session truth from the desktop's graphical session, and hand-over's bad-input paths, on the
fake driver with a scripted session hook (``FakeHook``: the fake guest cannot run the real
shell script, so its ``start`` / ``check`` / ``status`` answers are scripted per desktop and
travel through the fake guest agent's ``guest-exec`` like the real ones)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from deskpool.broker.desktop_session import SESSION_HOOK, SessionStarter
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker, Handover
from deskpool.broker.sessions import SessionService
from deskpool.domain.accounts import AccountRefused
from deskpool.domain.errors import AgentUnavailable, InvalidInput, Unavailable
from deskpool.domain.pools import PoolSpec
from deskpool.domain.users import Identity
from deskpool.drivers.fake.guest import FakeGuest, _Process
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.store.access_models import Event, Logon
from deskpool.store.models import Desktop, utcnow
from tests.broker_world import BrokerWorld, make_world


@dataclass
class FakeHook:
    """The session hook of every fake desktop, by hostname: ``mode`` "ok" (the session
    starts), "never" (it never runs) or "silent" (the guest agent stops answering after its
    readiness ping); ``sessions`` what ``status`` reports."""

    mode: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    silence_first: bool = False  # the first desktop asked after its ping goes silent

    def run(self, host: str, argv: list[str]) -> tuple[int, str, str]:
        sub = argv[1]
        self.calls.append((host, sub))
        if sub == "start":
            return 0, "starting\n", ""
        if sub == "check":
            return (1, "", "") if self.mode.get(host) == "never" else (0, "", "")
        if sub == "status":
            return 0, json.dumps({"sessions": self.sessions.get(host, [])}) + "\n", ""
        return 2, "", f"session-hook: usage: {argv}"


@pytest.fixture()
def hook(monkeypatch: pytest.MonkeyPatch) -> FakeHook:
    script = FakeHook()
    original = FakeGuest.execute

    def execute(guest: FakeGuest, command: str, arguments: dict[str, Any]) -> Any:
        host = guest._hostname()
        guest._files.setdefault(SESSION_HOOK, b"#!/bin/sh\n")  # the desktop flavor's file
        if script.silence_first and command != "guest-ping":
            script.silence_first = False
            script.mode[host] = "silent"
        if script.mode.get(host) == "silent" and command != "guest-ping":
            raise AgentUnavailable(f"guest agent of {host} is not responding")
        argv = [str(a) for a in arguments.get("arg", [])]
        if command == "guest-exec" and arguments.get("path") == "/bin/sh" and argv[:1] == [
                SESSION_HOOK]:
            code, out, err = script.run(host, argv)
            guest._next_id += 1
            guest._procs[guest._next_id] = _Process(code, out.encode(), err.encode(), True)
            return {"pid": guest._next_id}
        return original(guest, command, arguments)

    monkeypatch.setattr(FakeGuest, "execute", execute)
    return script


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.pool("lab", spare=2, max_size=2, session_start_timeout_s=40, idle_timeout_s=900)
    EntitlementService(w.ctx).grant("lab", "group", "staff")
    w.fill(passes=2)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def member(name: str) -> Identity:
    return Identity(name=name, display_name=name, source="local", groups=frozenset({"staff"}))


def desktops(world: BrokerWorld) -> dict[str, tuple[str, str | None, str | None]]:
    """hostname -> (state, assigned user, guest user)."""
    with world.ctx.uow(read_only=True) as uow:
        return {d.hostname: (d.state.value, d.assigned_user, d.guest_user)
                for d in uow.session.scalars(select(Desktop))}


def events(world: BrokerWorld, kind: str) -> list[tuple[str, str]]:
    with world.ctx.uow(read_only=True) as uow:
        return [(e.severity, e.message) for e in uow.session.scalars(
            select(Event).where(Event.kind == kind).order_by(Event.at))]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def broker(world: BrokerWorld) -> tuple[Broker, FakeClock]:
    clock = FakeClock()
    return Broker(world.ctx, sessions=SessionStarter(world.ctx, clock=clock,
                                                     sleep=clock.sleep)), clock


def session(user: str, *, sid: str = "3", state: str = "active", type_: str = "x11",
            uid: int = 10_000, x_idle_ms: int | None = 1200, locked: bool = False
            ) -> dict[str, Any]:
    return {"id": sid, "user": user, "uid": uid, "type": type_, "class": "user",
            "state": state, "active": state == "active", "remote": False,
            "service": "lightdm-autologin", "display": ":0" if type_ == "x11" else "",
            "idle_hint": False, "idle_since_us": 0, "locked": locked, "x_idle_ms": x_idle_ms}


# --- hand-over's bad input -----------------------------------------------------------------

def test_a_session_that_never_starts_times_out_by_the_pools_setting(
        world: BrokerWorld, hook: FakeHook) -> None:
    hook.mode = {"lab-01": "never", "lab-02": "never"}
    b, clock = broker(world)
    with pytest.raises(Unavailable) as caught:
        b.connect(member("alice"), "lab")
    message = str(caught.value)
    assert "passed its readiness check" in message
    assert "lab-01: your session did not start in time" in message
    assert "lab-02: your session did not start in time" in message
    # The pool's 40 s, not the starter's 150 s default, per desktop.
    assert 80 <= clock.now < 150
    assert desktops(world) == {"lab-01": ("error", None, None),
                               "lab-02": ("error", None, None)}
    failed = events(world, "readiness-failed")
    assert [s for s, _ in failed] == ["error", "error"]
    assert all("graphical session did not start within 40 s" in m for _, m in failed), failed
    b.records.flush()
    with world.ctx.uow(read_only=True) as uow:
        logons = [(r.outcome, r.user_name) for r in uow.session.scalars(select(Logon))]
        desktop_errors = [d.last_error for d in uow.session.scalars(select(Desktop))]
    assert logons == [("failed", "alice")]
    assert all(e and "did not start within 40 s" in e for e in desktop_errors), desktop_errors


def test_a_guest_whose_agent_goes_silent_is_failed_and_another_desktop_tried(
        world: BrokerWorld, hook: FakeHook) -> None:
    b, _clock = broker(world)
    hook.mode = {"lab-01": "silent", "lab-02": "silent"}
    with pytest.raises(Unavailable, match=r"lab-0[12]: it did not answer.*lab-0[12]: it did "
                                          "not answer"):
        b.connect(member("alice"), "lab")
    assert {s for s, _u, _g in desktops(world).values()} == {"error"}
    assert all(u is None for _s, u, _g in desktops(world).values())
    assert [s for s, _ in events(world, "readiness-failed")] == ["error", "error"]


def test_one_silent_guest_does_not_keep_the_user_from_another(
        world: BrokerWorld, hook: FakeHook) -> None:
    hook.silence_first = True
    b, _clock = broker(world)
    answer = b.connect(member("alice"), "lab")
    silent = next(h for h, m in hook.mode.items() if m == "silent")
    assert answer.status == "ready" and answer.hostname not in (None, silent)
    assert desktops(world) == {silent: ("error", None, None),
                               str(answer.hostname): ("reserved", "alice", None)}
    failed = events(world, "readiness-failed")
    assert len(failed) == 1 and failed[0][0] == "error" and silent in failed[0][1]
    assert (str(answer.hostname), "check") in hook.calls


def test_a_name_that_cannot_be_a_linux_account_is_told_and_nothing_is_held(
        world: BrokerWorld, hook: FakeHook) -> None:
    b, _clock = broker(world)
    with pytest.raises(AccountRefused, match=r"'42@corp\.example'.*start with '4'"):
        b.connect(member("42@corp.example"), "lab")
    assert desktops(world) == {"lab-01": ("ready", None, None),
                               "lab-02": ("ready", None, None)}
    assert [s for s, _ in events(world, "account-refused")] == ["error"]
    assert not any(sub == "start" for _h, sub in hook.calls)


def test_the_session_start_timeout_must_be_positive() -> None:
    with pytest.raises(InvalidInput, match="session_start_timeout_s \\(0\\) must be whole seconds"):
        PoolSpec("lab", "golden", session_start_timeout_s=0).validate()


def test_the_session_start_timeout_is_set_and_shown_through_the_api(
        world: BrokerWorld) -> None:
    admin = world.client(world.user("root-admin", admin=True))
    made = admin.post("/api/v1/admin/pools", json={
        "name": "slow", "template": "golden", "spare": 0, "max_size": 1,
        "naming_pattern": "slow-{n:02}", "session_start_timeout_s": 600})
    assert made.status_code == 200, made.text
    assert made.json()["session_start_timeout_s"] == 600
    shown = {p["name"]: p["session_start_timeout_s"]
             for p in admin.get("/api/v1/admin/pools").json()}
    assert shown == {"lab": 40, "slow": 600}
    refused = admin.post("/api/v1/admin/pools", json={
        "name": "bad", "template": "golden", "session_start_timeout_s": -5})
    assert refused.status_code == 422, refused.text  # checked at the edge, naming the field
    assert "session_start_timeout_s" in refused.json()["detail"]
    patched = admin.patch("/api/v1/admin/pools/slow", json={"session_start_timeout_s": 90})
    assert patched.status_code == 200, patched.text
    assert patched.json()["session_start_timeout_s"] == 90


# --- session truth after hand-over ---------------------------------------------------------

def _handed_over(world: BrokerWorld, hook: FakeHook) -> tuple[Handover, uuid.UUID, str]:
    b, _clock = broker(world)
    answer = b.connect(member("alice"), "lab")
    assert answer.status == "ready" and answer.desktop_id and answer.hostname
    SessionService(world.ctx).console_connected(answer.desktop_id, "alice")
    return answer, answer.desktop_id, answer.hostname


def test_login_logout_and_the_greeter_come_from_the_graphical_session(
        world: BrokerWorld, hook: FakeHook) -> None:
    _answer, _d_id, host = _handed_over(world, hook)
    sessions = SessionService(world.ctx)
    # Right after hand-over nothing may be listed yet (LightDM restarting): no log off.
    report = sessions.run_timers()
    assert not report.errors and not report.logged_off
    assert desktops(world)[host] == ("in_use", "alice", None)
    hook.sessions[host] = [session("alice")]
    report = sessions.run_timers()
    assert report.guest_logins == [host] and not report.errors
    assert desktops(world)[host] == ("in_use", "alice", "alice")
    assert "alice logged in to lab-0" in events(world, "guest-login")[0][1]
    assert "x11 session 3 on display :0" in events(world, "guest-login")[0][1]
    # "Log Out" in the desktop's menu: the session closes (a leftover process may keep it
    # listed as closing) and LightDM's greeter (a system user, never listed) comes back.
    hook.sessions[host] = [session("alice", state="closing")]
    report = sessions.run_timers()
    assert report.logged_off == [host] and not report.errors
    state, user, guest = desktops(world)[host]
    assert (state, user, guest) == ("recycling", None, None)  # the pool recycles on logout
    logged_off = events(world, "logged-off")
    assert logged_off and "alice logged out of their desktop" in logged_off[-1][1]


def test_idle_comes_from_the_x_server_and_logs_off_past_the_pools_timeout(
        world: BrokerWorld, hook: FakeHook) -> None:
    _answer, d_id, host = _handed_over(world, hook)
    sessions = SessionService(world.ctx)
    hook.sessions[host] = [session("alice", x_idle_ms=30_000)]
    sessions.run_timers()
    with world.ctx.uow(read_only=True) as uow:
        assert uow.desktops.get(d_id).idle_since is None  # under a minute is not idle
    hook.sessions[host] = [session("alice", x_idle_ms=600_000)]
    now = utcnow()
    sessions.run_timers(now)
    with world.ctx.uow(read_only=True) as uow:
        since = uow.desktops.get(d_id).idle_since
    assert since is not None
    assert abs((now - since.replace(tzinfo=now.tzinfo)).total_seconds() - 600) < 5
    report = sessions.run_timers(now + timedelta(seconds=301))  # 900 s without input
    assert report.logged_off == [host]
    assert "idle for more than 900 s" in events(world, "logged-off")[-1][1]


def test_a_lock_is_an_event_and_a_broken_hook_an_error_not_a_logoff(
        world: BrokerWorld, hook: FakeHook) -> None:
    _answer, _d_id, host = _handed_over(world, hook)
    sessions = SessionService(world.ctx)
    hook.sessions[host] = [session("alice")]
    sessions.run_timers()
    hook.sessions[host] = [session("alice", locked=True)]
    sessions.run_timers()
    hook.sessions[host] = [session("alice")]
    sessions.run_timers()
    assert [m for _s, m in events(world, "guest-locked")] == [
        f"alice locked their session on {host}"]
    assert [m for _s, m in events(world, "guest-unlocked")] == [
        f"alice unlocked their session on {host}"]
    hook.sessions[host] = [{"id": "3", "user": "alice"}]  # an answer the broker cannot read
    report = sessions.run_timers()
    assert not report.logged_off
    assert report.errors and "unreadable answer" in report.errors[0]
    assert desktops(world)[host] == ("in_use", "alice", "alice")


def test_a_signed_in_reservation_never_connected_to_is_recycled_not_handed_on(
        world: BrokerWorld, hook: FakeHook) -> None:
    # Single sign-on made alice's account and started her session at hand-over; she never
    # opens the console. At the reservation timeout the desktop must not go back to ready
    # with her session and files on it: the pool's on-logout policy (recycle) runs.
    b, _clock = broker(world)
    answer = b.connect(member("alice"), "lab")
    assert answer.status == "ready" and answer.desktop_id and answer.hostname
    b.records.flush()
    host = answer.hostname
    assert desktops(world)[host][:2] == ("reserved", "alice")
    later = utcnow() + timedelta(seconds=301)  # the pool's reservation timeout is 300 s
    report = SessionService(world.ctx).run_timers(later, poll_guests=False)
    assert report.reservations_expired == [host] and not report.errors
    assert desktops(world)[host] == ("recycling", None, None)
    (logged_off,) = events(world, "logged-off")
    assert "alice never connected within 300 s; their session is ended" in logged_off[1]

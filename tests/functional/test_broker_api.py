"""The broker over HTTP on the fake driver: sign-in, connect, reconnect, console tickets,
session timers, log off, and clear refusals that leave nothing reserved."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.broker.console import ConsoleTickets
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import AuthenticationFailed
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.desktops import DesktopService
from deskpool.store.models import utcnow
from tests.broker_world import PASSWORD, BrokerWorld, make_world


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path, database_url=database_url)
    w.pool("lab")
    w.user("alice", entitled_to=("lab",))
    w.user("bob")
    w.user("root", admin=True)
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def states(world: BrokerWorld) -> dict[str, str]:
    return {d.name: d.state for d in DesktopService(world.ctx).list()}


def test_sign_in_with_a_password_sets_a_session_cookie(world: BrokerWorld) -> None:
    client = world.client()
    answer = client.post("/api/v1/auth/login", json={"username": "Alice",
                                                      "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    assert answer.json()["user"]["name"] == "alice"
    assert client.get("/api/v1/me").json()["name"] == "alice"  # the cookie carries it
    assert client.post("/api/v1/auth/logout").status_code == 204
    assert client.get("/api/v1/me").status_code == 401


def test_a_wrong_password_is_refused_without_saying_which_part_was_wrong(
        world: BrokerWorld) -> None:
    client = world.client()
    for user, password in (("alice", "nope-nope-nope"), ("nobody", PASSWORD)):
        answer = client.post("/api/v1/auth/login", json={"username": user,
                                                          "password": password})
        assert answer.status_code == 401
        assert answer.json()["detail"] == "wrong user name or password"


def test_connect_hands_over_a_running_desktop_and_reconnect_returns_it(
        world: BrokerWorld) -> None:
    client = world.client("alice")
    first = client.post("/api/v1/pools/lab/connect").json()
    assert first["status"] == "ready" and not first["reconnect"]
    assert set(first["phases_ms"]) >= {"claim", "power_on", "ready"}
    assert states(world)[first["desktop"]] == "reserved"
    again = client.post("/api/v1/pools/lab/connect").json()
    assert again["desktop_id"] == first["desktop_id"] and again["reconnect"]
    mine = client.get("/api/v1/desktops").json()
    assert [d["name"] for d in mine] == [first["desktop"]]


def test_a_suspended_desktop_is_resumed_before_hand_over(world: BrokerWorld) -> None:
    for desktop in DesktopService(world.ctx).list():
        world.fake.suspend_vm(desktop.id)
    answer = world.client("alice").post("/api/v1/pools/lab/connect").json()
    assert answer["status"] == "ready"
    assert world.fake.get_vm(uuid.UUID(answer["desktop_id"])).power_state.value == "running"


def test_refusals_are_clear_and_reserve_nothing(world: BrokerWorld) -> None:
    before = states(world)
    unknown = world.client("alice").post("/api/v1/pools/nope/connect")
    assert unknown.status_code == 404 and "no pool named 'nope'" in unknown.json()["detail"]
    denied = world.client("bob").post("/api/v1/pools/lab/connect")
    assert denied.status_code == 403 and "not entitled" in denied.json()["detail"]
    assert states(world) == before
    events = world.client("root").get("/api/v1/admin/events").json()
    assert {e["kind"] for e in events} >= {"logon-refused"}
    logons = world.client("root").get("/api/v1/admin/logons").json()
    assert sorted(r["outcome"] for r in logons) == ["refused", "refused"]


def test_an_exhausted_pool_says_so(world: BrokerWorld) -> None:
    world.pool("tiny", spare=1, max_size=1)
    for name in ("carol", "dave"):
        world.user(name, entitled_to=("tiny",))
    world.fill()
    assert world.client("carol").post("/api/v1/pools/tiny/connect").json()["status"] == "ready"
    refused = world.client("dave").post("/api/v1/pools/tiny/connect")
    assert refused.status_code == 503 and "exhausted" in refused.json()["detail"]


def test_an_empty_pool_that_may_grow_makes_a_desktop_for_the_user(world: BrokerWorld) -> None:
    world.pool("lazy", spare=0, max_size=3)
    world.user("erin", entitled_to=("lazy",))
    pending = world.client("erin").post("/api/v1/pools/lazy/connect").json()
    assert pending["status"] == "pending" and "being made for you" in pending["message"]
    world.fill()
    ready = world.client("erin").post("/api/v1/pools/lazy/connect").json()
    assert ready["status"] == "ready" and ready["desktop"] == "lazy-01"


def test_a_desktop_failing_its_readiness_check_is_replaced_by_another(
        world: BrokerWorld) -> None:
    from deskpool.domain.errors import AgentUnavailable

    world.fake.fail_next("agent_command", AgentUnavailable("agent silent"))
    world.fake.fail_next("agent_command", AgentUnavailable("agent silent"))
    alice = world.client("alice")
    alice.app.state.services.broker.ready_timeout_s = 0  # type: ignore[attr-defined]
    answer = alice.post("/api/v1/pools/lab/connect")
    failed = [e for e in world.client("root").get("/api/v1/admin/events").json()
              if e["kind"] == "readiness-failed"]
    assert failed and failed[0]["severity"] == "error"
    held = [n for n, s in states(world).items() if s in ("reserved", "in_use")]
    if answer.status_code == 200:
        assert held == [answer.json()["desktop"]]
    else:
        assert answer.status_code == 503 and held == []
    assert "error" in states(world).values()


def test_console_ticket_is_single_use_and_bound_to_its_user(world: BrokerWorld) -> None:
    alice = world.client("alice")
    desktop = alice.post("/api/v1/pools/lab/connect").json()["desktop_id"]
    assert world.client("bob").post(f"/api/v1/desktops/{desktop}/console").status_code == 403
    ticket = alice.post(f"/api/v1/desktops/{desktop}/console").json()["token"]
    tickets = ConsoleTickets(world.ctx)
    target = tickets.consume(ticket)
    assert target.user == "alice" and target.port > 0
    with pytest.raises(AuthenticationFailed):
        tickets.consume(ticket)


def test_an_expired_console_ticket_opens_nothing(world: BrokerWorld) -> None:
    desktop = world.client("alice").post("/api/v1/pools/lab/connect").json()["desktop_id"]
    from deskpool.domain.users import Identity
    short = ConsoleTickets(world.ctx, ttl=timedelta(seconds=-1))
    ticket = short.issue(Identity("alice", "alice", "local"), uuid.UUID(desktop))
    with pytest.raises(AuthenticationFailed):
        ConsoleTickets(world.ctx).consume(ticket.token)


def test_session_events_and_timers(world: BrokerWorld) -> None:
    desktop = world.client("alice").post("/api/v1/pools/lab/connect").json()
    d_id = uuid.UUID(desktop["desktop_id"])
    sessions = SessionService(world.ctx)
    sessions.console_connected(d_id, "alice")
    assert states(world)[desktop["desktop"]] == "in_use"
    sessions.console_disconnected(d_id, "alice")
    assert states(world)[desktop["desktop"]] == "idle"
    # Resumable until the disconnect timer runs out...
    sessions.run_timers(utcnow() + timedelta(seconds=60))
    assert states(world)[desktop["desktop"]] == "idle"
    # ...then logged off, and the pool's policy (revert) recycles it.
    report = sessions.run_timers(utcnow() + timedelta(seconds=1801))
    assert report.logged_off == [desktop["desktop"]]
    assert states(world)[desktop["desktop"]] == "recycling"


def test_an_unused_reservation_expires(world: BrokerWorld) -> None:
    desktop = world.client("alice").post("/api/v1/pools/lab/connect").json()["desktop"]
    report = SessionService(world.ctx).run_timers(utcnow() + timedelta(seconds=301))
    assert report.reservations_expired == [desktop]
    assert states(world)[desktop] == "ready"
    assert world.client("alice").get("/api/v1/desktops").json() == []


def test_guest_login_then_logout_ends_the_session(world: BrokerWorld) -> None:
    desktop = world.client("alice").post("/api/v1/pools/lab/connect").json()
    d_id = uuid.UUID(desktop["desktop_id"])
    sessions = SessionService(world.ctx)
    sessions.console_connected(d_id, "alice")
    world.fake.guest_session(d_id, "alice")
    assert sessions.run_timers().guest_logins == [desktop["desktop"]]
    world.fake.guest_session(d_id, None)
    assert sessions.run_timers().logged_off == [desktop["desktop"]]
    assert states(world)[desktop["desktop"]] == "recycling"


def test_user_log_off_recycles_and_the_next_connect_gets_a_clean_desktop(
        world: BrokerWorld) -> None:
    alice = world.client("alice")
    first = alice.post("/api/v1/pools/lab/connect").json()
    assert world.client("bob").post(
        f"/api/v1/desktops/{first['desktop_id']}/logoff").status_code == 403
    off = alice.post(f"/api/v1/desktops/{first['desktop_id']}/logoff")
    assert off.status_code == 200 and off.json()["state"] == "recycling"
    second = alice.post("/api/v1/pools/lab/connect").json()
    assert second["status"] == "ready" and second["desktop_id"] != first["desktop_id"]


def test_admin_routes_need_an_admin(world: BrokerWorld) -> None:
    assert world.client("alice").get("/api/v1/admin/desktops").status_code == 403
    rows = world.client("root").get("/api/v1/admin/desktops").json()
    assert {r["state"] for r in rows} == {"ready"}


def test_a_session_idle_in_the_guest_past_the_pools_timer_is_logged_off(
        world: BrokerWorld) -> None:
    world.pool("idle", spare=1, max_size=2, idle_timeout_s=600)
    world.user("ida", entitled_to=("idle",))
    world.fill()
    desktop = world.client("ida").post("/api/v1/pools/idle/connect").json()
    d_id = uuid.UUID(desktop["desktop_id"])
    sessions = SessionService(world.ctx)
    sessions.console_connected(d_id, "ida")
    world.fake.guest_session(d_id, "ida", idle_minutes=3)  # typing 3 minutes ago
    sessions.run_timers()
    assert states(world)[desktop["desktop"]] == "in_use"  # idle, but not for 10 minutes
    world.fake.guest_session(d_id, "ida", idle_minutes=11)
    sessions.run_timers()  # reads the guest: idle since 11 minutes ago
    report = sessions.run_timers()
    assert report.logged_off == [desktop["desktop"]]
    assert states(world)[desktop["desktop"]] == "recycling"


def test_a_user_reads_that_their_desktop_crashed_in_their_messages(world: BrokerWorld) -> None:
    alice = world.client("alice")
    assert alice.get("/api/v1/messages").json() == []
    desktop_id = uuid.UUID(alice.post("/api/v1/pools/lab/connect").json()["desktop_id"])
    world.fake.crash_vm(desktop_id)
    world.fill(passes=1)
    (message,) = alice.get("/api/v1/messages").json()
    assert message["severity"] == "warning"
    assert "its VM stopped unexpectedly: QEMU ended (crashed)" in message["message"]
    assert alice.get("/api/v1/desktops").json() == []  # no longer held
    assert world.client("bob").get("/api/v1/messages").json() == []  # alice's alone
    assert world.client().get("/api/v1/messages").status_code == 401

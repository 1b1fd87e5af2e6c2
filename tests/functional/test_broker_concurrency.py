"""Logon storms straight into ``Broker.connect`` from many threads, on the fake driver: every
ready desktop goes to exactly one user, no user holds two, the unlucky get a clear answer and
hold nothing, and the same holds with two brokers (two ``ServiceContext``s) on one database."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker, Handover
from deskpool.config import Settings
from deskpool.domain.errors import AgentUnavailable, DeskpoolError, PoolExhausted, Unavailable
from deskpool.domain.pools import Assignment
from deskpool.domain.states import HELD_STATES
from deskpool.domain.users import Identity
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.context import ServiceContext
from deskpool.store.access_models import Logon
from deskpool.store.models import Desktop
from tests.broker_world import BrokerWorld, make_world

USERS = 220
READY = 40
MAX_SIZE = 60  # room for 20 desktops made for users; the rest find the pool exhausted
GROUP = "crowd"

Outcome = Handover | DeskpoolError


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def crowd_pool(world: BrokerWorld, name: str, *, ready: int, max_size: int,
               **kw: object) -> str:
    world.pool(name, spare=ready, max_size=max_size, naming_pattern=f"{name}-{{n:03}}", **kw)
    EntitlementService(world.ctx).grant(name, "group", GROUP)
    world.fill(passes=2)
    assert len(desktops(world, name)) == ready
    return name


def member(name: str) -> Identity:
    """A signed-in group member, as the API hands it to the broker (no user row is needed:
    the entitlement is the group's)."""
    return Identity(name=name, display_name=name, source="local", groups=frozenset({GROUP}))


def storm(calls: list[tuple[Broker, Identity, str]]) -> list[Outcome]:
    """Run every connect at once, one thread each; each one's answer or error."""
    outcomes: list[Outcome | None] = [None] * len(calls)
    crashes: list[BaseException] = []
    gate = threading.Barrier(len(calls))

    def run(i: int, broker: Broker, identity: Identity, pool: str) -> None:
        gate.wait()
        try:
            outcomes[i] = broker.connect(identity, pool)
        except DeskpoolError as exc:
            outcomes[i] = exc
        except BaseException as exc:  # anything else fails the test, below
            crashes.append(exc)

    threads = [threading.Thread(target=run, args=(i, *c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a connect never returned"
    assert not crashes, f"{len(crashes)} connects crashed, first: {crashes[0]!r}"
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]


def desktops(world: BrokerWorld, pool: str) -> dict[uuid.UUID, tuple[str, str, str | None]]:
    """id -> (name, state, assigned user) of the pool's desktops, from the database."""
    with world.ctx.uow(read_only=True) as uow:
        pool_id = uow.pools.get_by_name(pool).id
        return {d.id: (d.name, d.state, d.assigned_user) for d in uow.session.scalars(
            select(Desktop).where(Desktop.pool_id == pool_id))}


def by_kind(users: list[str], outcomes: list[Outcome]
            ) -> tuple[dict[str, Handover], dict[str, Handover], dict[str, DeskpoolError]]:
    ready = {u: o for u, o in zip(users, outcomes, strict=True)
             if isinstance(o, Handover) and o.status == "ready"}
    pending = {u: o for u, o in zip(users, outcomes, strict=True)
               if isinstance(o, Handover) and o.status == "pending"}
    errors = {u: o for u, o in zip(users, outcomes, strict=True)
              if isinstance(o, DeskpoolError)}
    assert len(ready) + len(pending) + len(errors) == len(users)
    return ready, pending, errors


def assert_one_desktop_per_user_and_user_per_desktop(
        world: BrokerWorld, pool: str, ready: dict[str, Handover],
        pending: dict[str, Handover], errors: dict[str, DeskpoolError]) -> None:
    rows = desktops(world, pool)
    handed = Counter(h.desktop_id for h in ready.values())
    assert not [d for d, n in handed.items() if n > 1], "a desktop was handed to two users"
    for user, handover in ready.items():
        assert handover.desktop_id is not None
        name, state, holder = rows[handover.desktop_id]
        assert (name, state, holder) == (handover.desktop, "reserved", user)
    holders = Counter(holder for _, state, holder in rows.values()
                      if holder is not None and state in HELD_STATES)
    assert set(holders) == set(ready), "held desktops and ready answers disagree"
    assert max(holders.values(), default=1) == 1, "a user holds two desktops"
    assigned = Counter(holder for _, _, holder in rows.values() if holder is not None)
    for user in pending:
        assert assigned[user] == 1  # the one being made for them
    for user in errors:
        assert assigned[user] == 0, f"{user} got an error yet has a desktop assigned"


def test_a_logon_storm_hands_each_ready_desktop_to_exactly_one_user(
        world: BrokerWorld) -> None:
    pool = crowd_pool(world, "crowd", ready=READY, max_size=MAX_SIZE)
    ready_before = set(desktops(world, pool))
    broker = Broker(world.ctx)
    users = [f"u{n:03}" for n in range(USERS)]
    outcomes = storm([(broker, member(u), pool) for u in users])
    ready, pending, errors = by_kind(users, outcomes)

    assert {h.desktop_id for h in ready.values()} == ready_before  # every one, once each
    assert len(ready) == READY
    assert len(pending) == MAX_SIZE - READY
    assert all("being made for you" in h.message for h in pending.values())
    assert len(errors) == USERS - MAX_SIZE
    for exc in errors.values():
        assert isinstance(exc, PoolExhausted) and "exhausted" in str(exc), repr(exc)
    assert_one_desktop_per_user_and_user_per_desktop(world, pool, ready, pending, errors)
    assert len(desktops(world, pool)) == MAX_SIZE
    with world.ctx.uow(read_only=True) as uow:
        logged = Counter(uow.session.scalars(select(Logon.outcome)))
    assert logged == {"ready": READY, "pending": MAX_SIZE - READY,
                      "failed": USERS - MAX_SIZE}


def test_desktops_failing_readiness_in_a_storm_leave_nothing_reserved(
        world: BrokerWorld) -> None:
    pool = crowd_pool(world, "flaky", ready=30, max_size=30)
    broker = Broker(world.ctx, ready_timeout_s=0)
    for _ in range(6):
        world.fake.fail_next("agent_command", AgentUnavailable("agent silent"))
    users = [f"f{n:03}" for n in range(80)]
    ready, pending, errors = by_kind(users, storm([(broker, member(u), pool)
                                                   for u in users]))
    rows = desktops(world, pool)
    broken = {d for d, (_, state, _) in rows.items() if state == "error"}
    assert len(broken) == 6
    assert all(rows[d][2] is None for d in broken), "a failed desktop stayed assigned"
    assert len(ready) == 30 - 6  # every good desktop found a user
    # A broken desktop no longer counts against the pool's size, so a few late users may
    # have had one made for them instead.
    assert len(pending) <= len(broken)
    for exc in errors.values():
        assert isinstance(exc, Unavailable | PoolExhausted), repr(exc)
    assert_one_desktop_per_user_and_user_per_desktop(world, pool, ready, pending, errors)


def test_one_user_connecting_twenty_times_at_once_gets_one_desktop(
        world: BrokerWorld) -> None:
    pool = crowd_pool(world, "mine", ready=5, max_size=5,
                      assignment=Assignment.DEDICATED)
    broker = Broker(world.ctx)
    outcomes = storm([(broker, member("solo"), pool)] * 20)
    assert all(isinstance(o, Handover) and o.status == "ready" for o in outcomes), outcomes
    handovers = [o for o in outcomes if isinstance(o, Handover)]
    assert len({h.desktop_id for h in handovers}) == 1
    assert sorted(h.reconnect for h in handovers) == [False] + [True] * 19
    rows = desktops(world, pool)
    assert [(n, s) for n, s, u in rows.values() if u == "solo"] == [
        (handovers[0].desktop, "reserved")]
    assert sum(1 for _, s, _ in rows.values() if s == "ready") == 4


def test_two_brokers_on_one_database_never_double_assign(world: BrokerWorld) -> None:
    pool = crowd_pool(world, "shared", ready=READY, max_size=READY)
    other = ServiceContext(Settings(data_dir=world.ctx.settings.data_dir))
    try:
        brokers = (Broker(world.ctx), Broker(other))
        users = [f"s{n:03}" for n in range(120)]
        # Each user asks both brokers, twice each, all at once.
        calls = [(brokers[k % 2], member(u), pool) for u in users for k in range(4)]
        outcomes = storm(calls)
    finally:
        other.close()
    per_user: dict[str, list[Outcome]] = {}
    for (_, identity, _), outcome in zip(calls, outcomes, strict=True):
        per_user.setdefault(identity.name, []).append(outcome)
    winners: dict[str, Handover] = {}
    for user, answers in per_user.items():
        got = {o.desktop_id for o in answers if isinstance(o, Handover)}
        assert all((isinstance(o, Handover) and o.status == "ready")
                   or (isinstance(o, PoolExhausted) and "exhausted" in str(o))
                   for o in answers), answers
        assert len(got) <= 1, f"{user} was handed {len(got)} desktops"
        if got:
            winners[user] = next(o for o in answers if isinstance(o, Handover))
    assert len(winners) == READY
    losers: dict[str, DeskpoolError] = {
        u: PoolExhausted("exhausted") for u in per_user if u not in winners}
    assert_one_desktop_per_user_and_user_per_desktop(world, pool, winners, {}, losers)

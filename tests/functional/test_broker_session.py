"""The broker's single sign-on step on the fake driver: a user who cannot have an account is
told so and nothing stays reserved; a session that does not start fails the desktop."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from deskpool.broker.desktop_session import SessionStarter
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.domain.accounts import AccountRefused
from deskpool.domain.errors import Unavailable
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.store.access_models import Event, Logon
from deskpool.store.models import Desktop
from tests.broker_world import BrokerWorld, make_world


class HookEverywhere(SessionStarter):
    """As if every desktop carried the session hook (the fake guest cannot run it)."""

    def has_hook(self, agent: GuestAgent, version_id: uuid.UUID) -> bool:
        return True


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.pool("lab", spare=2, max_size=2)
    EntitlementService(w.ctx).grant("lab", "group", "staff")
    w.fill(passes=2)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def member(name: str) -> Identity:
    return Identity(name=name, display_name=name, source="local", groups=frozenset({"staff"}))


def states(world: BrokerWorld) -> list[tuple[str, str | None]]:
    with world.ctx.uow(read_only=True) as uow:
        return sorted((d.state.value, d.assigned_user)
                      for d in uow.session.scalars(select(Desktop)))


def test_a_user_without_a_linux_account_is_told_and_the_desktop_given_back(
        world: BrokerWorld) -> None:
    broker = Broker(world.ctx, sessions=HookEverywhere(world.ctx))
    with pytest.raises(AccountRefused, match=r"'root'.*system account"):
        broker.connect(member("root"), "lab")
    assert states(world) == [("ready", None), ("ready", None)]
    broker.records.flush()
    with world.ctx.uow(read_only=True) as uow:
        events = [e.severity for e in uow.session.scalars(
            select(Event).where(Event.kind == "account-refused"))]
        logons = [(r.outcome, r.user_name) for r in uow.session.scalars(select(Logon))]
    assert events == ["error"]
    assert logons == [("failed", "root")]


def test_a_session_that_cannot_start_fails_the_desktop_and_leaves_nothing_reserved(
        world: BrokerWorld) -> None:
    broker = Broker(world.ctx, sessions=HookEverywhere(world.ctx, timeout_s=1))
    with pytest.raises(Unavailable, match="readiness check"):
        broker.connect(member("alice"), "lab")
    assert states(world) == [("error", None), ("error", None)]


def test_desktops_without_the_hook_are_handed_over_as_before(world: BrokerWorld) -> None:
    answer = Broker(world.ctx).connect(member("alice"), "lab")
    assert answer.status == "ready"
    assert "session" not in answer.phases_ms

"""Listings on request paths cost a fixed number of queries, however many pools, templates,
users and desktops there are (no query per row), and still say the same."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.templates import ImageFiles, TemplateService
from tests.broker_world import BrokerWorld, make_world

ROUTES = ("/api/v1/pools", "/api/v1/admin/pools", "/api/v1/admin/templates",
          "/api/v1/admin/users", "/api/v1/admin/hosts", "/api/v1/admin/desktops",
          "/api/v1/admin/sessions", "/api/v1/admin/entitlements")


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path, database_url=database_url)
    w.pool("lab")
    w.user("alice", entitled_to=("lab",))
    w.user("root", admin=True, entitled_to=("lab",))
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


@contextmanager
def counted(world: BrokerWorld) -> Iterator[list[str]]:
    engine: Engine = world.ctx.session_factory.kw["bind"]
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def queries_per_route(world: BrokerWorld) -> dict[str, int]:
    client = world.client("root")
    # Writes the logon records pending in the broker's batch now, not during a count.
    assert client.get("/api/v1/admin/events").status_code == 200
    found = {}
    for route in ROUTES:
        with counted(world) as statements:
            assert client.get(route).status_code == 200, route
        found[route] = len(statements)
    return found


def test_listings_cost_the_same_queries_for_one_pool_or_many(world: BrokerWorld,
                                                             tmp_path: Path) -> None:
    before = queries_per_route(world)
    accounts, grants = AccountService(world.ctx), EntitlementService(world.ctx)
    for name in ("art", "bio", "chem"):
        disk = tmp_path / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"],
                       check=True)
        TemplateService(world.ctx).publish(name, ImageFiles(disk=disk))
        world.pool(name, template=name, naming_pattern=f"{name}-{{n:02}}")
        grants.grant(name, "group", "staff")
    for n in range(3):
        world.user(f"user{n}", groups=("staff", f"team{n}"))
    accounts.add_to_group("root", "staff")
    world.tokens["root"] = accounts.issue_api_token("root", "tests").token  # now in staff
    world.fill()
    world.client("alice").post("/api/v1/pools/lab/connect")
    assert len(world.client("root").get("/api/v1/pools").json()) == 4
    assert queries_per_route(world) == before


def test_the_users_pool_list_counts_ready_desktops_and_names_the_users_own(
        world: BrokerWorld) -> None:
    client = world.client("alice")
    [lab] = client.get("/api/v1/pools").json()
    assert (lab["name"], lab["template"], lab["mine"]) == ("lab", "golden", None)
    ready = lab["ready"]
    assert ready >= 1
    got = client.post("/api/v1/pools/lab/connect").json()
    [lab] = client.get("/api/v1/pools").json()
    assert (lab["ready"], lab["mine"]) == (ready - 1, got["desktop"])
    assert world.client("root").get("/api/v1/pools").json()[0]["mine"] is None

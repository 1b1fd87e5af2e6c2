"""Observability on the fake driver: /metrics parsed with prometheus_client's own parser (its
pool counts match the database, logon phases and reconcile passes are there), /healthz and
/readyz, and JSON log lines carrying the request id and the user."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deskpool.api.observability import log_handler
from deskpool.config import Settings
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.store import downgrade
from tests.broker_world import BrokerWorld, make_world


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path, database_url=database_url)
    w.pool("lab")
    w.pool("kiosk", spare=1)
    w.user("alice", entitled_to=("lab",))
    w.user("root", admin=True)
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def scrape(world: BrokerWorld) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    answer = world.client().get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found: dict[str, list[tuple[dict[str, str], float, str]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found.setdefault(family.name, []).append((sample.labels, sample.value,
                                                      sample.name))
    return found


def test_metrics_count_desktops_as_the_database_has_them(world: BrokerWorld) -> None:
    world.client("alice").post("/api/v1/pools/lab/connect")
    metrics = scrape(world)
    rows = world.client("root").get("/api/v1/admin/desktops").json()
    from_db = Counter((d["pool"], d["state"], d["host"]) for d in rows)
    assert len(rows) == len(DesktopService(world.ctx).list()) == 3
    scraped = {(labels["pool"], labels["state"], labels["host"]): value
               for labels, value, _ in metrics["deskpool_desktops"]}
    assert scraped == {key: float(n) for key, n in from_db.items()}
    assert scraped[("lab", "reserved", "h1")] == 1.0
    assert {labels["host"] for labels, _, _ in metrics["deskpool_host_vcpus"]} == {"h1"}
    live = {labels["host"]: value for labels, value, _ in metrics["deskpool_host_desktops"]}
    assert live == {"h1": float(sum(from_db.values()))}
    states = {labels["state"]: v for labels, v, _ in metrics["deskpool_host_state"]}
    assert states["enabled"] == 1.0 and states["down"] == 0.0
    statuses = {labels["pool"]: labels["status"] for labels, _, _ in
                metrics["deskpool_pool_status"]}
    assert statuses == {"lab": "enabled", "kiosk": "enabled"}
    assert "deskpool_console_connections" in metrics


def test_logon_phases_and_reconcile_passes_are_histograms(world: BrokerWorld) -> None:
    world.client("alice").post("/api/v1/pools/lab/connect")
    world.client("root").get("/api/v1/admin/logons")  # flushes the batched logon records
    metrics = scrape(world)
    phases = metrics["deskpool_logon_phase_seconds"]
    claim_count = [v for labels, v, name in phases
                   if name.endswith("_count") and labels["phase"] == "claim"]
    assert claim_count == [1.0]
    claim_buckets = [(labels["le"], v) for labels, v, name in phases
                     if name.endswith("_bucket") and labels["phase"] == "claim"]
    assert claim_buckets[-1] == ("+Inf", 1.0)
    counts = [v for _, v in claim_buckets]
    assert counts == sorted(counts)  # cumulative
    session = [v for labels, v, name in phases
               if name.endswith("_count") and labels["phase"] == "session"]
    assert session == [0.0]  # the fake guest has no session hook: never measured
    passes = [v for _, v, name in metrics["deskpool_reconcile_pass_seconds"]
              if name.endswith("_count")]
    assert passes and passes[0] >= 3  # the fixture's passes, in this process
    assert "deskpool_reconcile_errors" in metrics


def test_metrics_can_require_a_token(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    try:
        world.ctx.settings.metrics_token = "s3cret-token"
        client = world.client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={
            "authorization": "Bearer s3cret-token"}).status_code == 200
    finally:
        world.ctx.close()
        forget_fake_hosts()


def test_health_and_readiness(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    try:
        client = world.client()
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
        # A database behind this version's migrations: not ready, saying why.
        downgrade(world.ctx.session_factory.kw["bind"], "0010")
        behind = client.get("/readyz")
        assert behind.status_code == 503
        assert "at migration 0010" in behind.json()["detail"]
    finally:
        world.ctx.close()
        forget_fake_hosts()


def test_readiness_fails_when_the_database_does_not_answer(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    try:
        client = world.client()
        unreachable = ServiceContext(Settings(
            data_dir=tmp_path / "gone", database_url=f"sqlite:///{tmp_path / 'x.db'}"))
        client.app.state.services.ctx = unreachable  # type: ignore[attr-defined]
        (tmp_path / "x.db").unlink()
        (tmp_path / "x.db").mkdir()  # a directory where the database file was
        unreachable.session_factory.kw["bind"].dispose()
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert "the database does not answer" in answer.json()["detail"]
    finally:
        world.ctx.close()
        forget_fake_hosts()


def test_json_log_lines_carry_the_request_id_and_the_user(world: BrokerWorld) -> None:
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        client = world.client("root")
        answer = client.get("/api/v1/admin/pools", headers={"x-request-id": "req-42"})
        assert answer.headers["x-request-id"] == "req-42"
        generated = client.get("/api/v1/me").headers["x-request-id"]
        assert len(generated) == 32
        hostile = client.get("/api/v1/me", headers={"x-request-id": "a\"b c"})
        assert hostile.headers["x-request-id"] != 'a"b c'  # replaced, never echoed raw
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "deskpool.access"]
    first = next(line for line in access if line["request_id"] == "req-42")
    assert first["user"] == "root" and first["status"] == 200
    assert first["message"].startswith("GET /api/v1/admin/pools 200")
    assert {"time", "level", "logger", "message", "request_id", "user"} <= set(first)
    assert any(line["request_id"] == generated for line in access)

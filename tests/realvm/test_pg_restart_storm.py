"""PostgreSQL restarted in the middle of a logon storm on two brokers, with real guests.

Two ``deskpool serve`` processes share one PostgreSQL database and one qemu:///system host
with a pool of three console-flavor desktops, ready before the storm. Six users connect at
once, through either broker, and keep going: a user handed a desktop holds it a moment and
logs off (the desktop is reverted to its factory snapshot and handed out again), a user
without one is told so ("exhausted", or "being prepared") and tries again. Mid-storm the
database is stopped twice, a fast shutdown, then the postmaster SIGKILLed (each ~3 s down,
then started on the same port), while nothing of the brokers is touched.

What must hold:

* no desktop was handed to two users at once and no user held two desktops: checked on the
  API's answers (the spans during which a user surely held a desktop never overlap another
  user's on it) and on the database, sampled during the storm (each sample agrees with
  those spans; no user has two held desktops);
* while the database is down every request gets a clear 503 (a sentence and Retry-After),
  never a 500;
* both brokers' ``/readyz`` are 200 again by themselves (the processes are never restarted),
  their reconcilers and session timers go on: the users still holding a desktop at the end
  walk away, the reservation timer releases them, the reconciler recycles them, and the pool
  is back at its three ready desktops with nothing in a transitional state and no VM unknown
  to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

import httpx
import pytest
from sqlalchemy import select

from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.states import HELD_STATES
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.images.builder import GuestImage
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store import DatabaseUnavailable
from deskpool.store.models import Desktop
from tests.conftest import IN_CI
from tests.crash_invariants import check_invariants
from tests.pg_server import PostgresServer, available
from tests.realvm.conftest import TEMPLATE, remove_pool_of

pytestmark = pytest.mark.realvm
POOL = "pgstorm"  # its desktops (and so their VMs) are named pgstorm-NN
DESKTOPS, USERS = 3, 6
RESERVATION_S = 15  # a reservation never connected to is released after this (session timers)
RESTARTS: tuple[Literal["fast", "kill"], ...] = ("fast", "kill")
DOWN_S = 3.0  # how long the database stays away at each restart
HOLD_S = (1.0, 2.0)  # how long a user keeps a desktop before logging off
READY_TIMEOUT_S = 900  # console guests booting at once under TCG on a busy machine
DB_DOWN = "the database did not answer; please try again in a moment"
HELD = tuple(s.value for s in HELD_STATES)
TRANSITIONAL = ("provisioning", "customizing", "recycling", "retiring", "error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


@dataclass
class Deployment:
    server: PostgresServer
    settings: Settings
    ctx: ServiceContext
    driver: LibvirtDriver
    tokens: dict[str, str]
    brokers: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


@pytest.fixture()
def deployment(guest_image: GuestImage, tmp_path: Path) -> Iterator[Deployment]:
    reason = available()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL tier cannot run in CI: {reason}")
        pytest.skip(reason)
    started = time.monotonic()
    with PostgresServer() as server:
        url = server.create_database("storm")
        settings = Settings(data_dir=tmp_path / "data", database_url=url)
        ctx = ServiceContext(settings)
        storage = tmp_path / "pool"
        HostService(ctx).add("local", "qemu:///system", storage_dir=storage,
                             limits=HostLimits(max_provisioning=DESKTOPS))
        TemplateService(ctx).publish(TEMPLATE, ImageFiles.from_guest_image(guest_image),
                                     recipe_hash=guest_image.recipe_hash)
        PoolService(ctx).create(PoolSpec(POOL, TEMPLATE, spare=DESKTOPS, max_size=DESKTOPS,
                                         naming_pattern=f"{POOL}-{{n:02}}",
                                         reservation_timeout_s=RESERVATION_S))
        EntitlementService(ctx).grant(POOL, "group", "staff")
        accounts = AccountService(ctx)
        tokens = {}
        for i in range(USERS):
            name = f"user{i}"
            accounts.create_user(name, "password-123")
            accounts.add_to_group(name, "staff")
            tokens[name] = accounts.issue_api_token(name, "storm").token
        installation = ctx.installation_id
        driver = LibvirtDriver("qemu:///system", storage_dir=storage)
        world = Deployment(server, settings, ctx, driver, tokens)
        try:
            for _ in range(2):
                _start_broker(world, tmp_path)
            for url_, _process in world.brokers:
                wait_for(lambda u=url_: _readyz(u) == 200, 60, f"broker {url_}")
            took = wait_for(lambda: _states(ctx) == Counter(ready=DESKTOPS), READY_TIMEOUT_S,
                            f"{DESKTOPS} ready desktops")
            print(f"\n[pgstorm] pool of {DESKTOPS} ready in {took:.0f} s "
                  f"(setup {time.monotonic() - started:.0f} s)")
            yield world
        except BaseException:
            for log in world.logs:
                print(log, log.read_text()[-4000:])
            with contextlib.suppress(Exception):
                print("[pgstorm] desktops:", _rows(ctx))
            raise
        finally:
            for _url, process in world.brokers:
                process.terminate()
            for _url, process in world.brokers:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
            for vm in driver.list_vms():
                if vm.metadata is not None and vm.metadata.installation_id == installation:
                    driver.delete_vm(vm.vm_id)
            driver.close()
            ctx.close()
            remove_pool_of(storage)


def _start_broker(world: Deployment, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(world.settings.data_dir),
           "DESKPOOL_DATABASE_URL": str(world.settings.database_url),
           "DESKPOOL_RECONCILE_INTERVAL_S": "1", "DESKPOOL_TIMERS_INTERVAL_S": "1",
           # Longer than an outage: a broker keeps the work it had in hand across one.
           "DESKPOOL_LEASE_S": "15", "DESKPOOL_READY_TIMEOUT_S": str(READY_TIMEOUT_S)}
    log = tmp_path / f"broker-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-c", "from deskpool.cli.main import run; run()", "serve",
         "--port", str(port), "--console-port", str(free_port()), "--spice-port", "0",
         "--rdp-port", "0"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    world.brokers.append((f"http://127.0.0.1:{port}", process))
    world.logs.append(log)


def _readyz(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def _rows(ctx: ServiceContext) -> list[tuple[str, str, str | None]]:
    with ctx.uow(read_only=True) as uow:
        return [(str(n), str(s), e) for n, s, e in uow.session.execute(
            select(Desktop.name, Desktop.state, Desktop.last_error)).all()]


def _states(ctx: ServiceContext) -> Counter[str]:
    with ctx.uow(read_only=True) as uow:
        return Counter(str(s) for s in uow.session.scalars(select(Desktop.state)).all())


# --- the storm ------------------------------------------------------------------------------


@dataclass
class Hold:
    """A desktop handed to a user; between ``received`` and ``until`` the user surely held
    it (handed before the answer arrived; given back no sooner than the logoff was sent, nor
    than the reservation timer could release it)."""

    user: str
    desktop: str
    received: float
    until: float = float("inf")


@dataclass
class Sample:
    """The held desktops as the database saw them, read between ``start`` and ``end``."""

    start: float
    end: float
    held: list[tuple[str, str]]  # (desktop id, user)


@dataclass
class Storm:
    holds: list[Hold] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    readyz: list[tuple[float, int, int | None]] = field(default_factory=list)
    outages: list[tuple[str, float, float]] = field(default_factory=list)  # how, down, up
    over: asyncio.Event = field(default_factory=asyncio.Event)


def _kind(reply: httpx.Response) -> str | None:
    """What an answer to a connect or logoff says; None for one that is not clear."""
    try:
        body = reply.json()
    except ValueError:
        return None
    if reply.status_code == 200:
        return str(body.get("status", "ok"))
    detail = str(body.get("detail", ""))
    if reply.status_code != 503 or "Traceback" in detail:
        return None
    if detail == DB_DOWN and reply.headers.get("retry-after") == "2":
        return "database-down"
    if "is exhausted" in detail:
        return "no-desktop"
    if "too busy" in detail:
        return "busy"
    return None


async def _user(storm: Storm, client: httpx.AsyncClient, brokers: list[str], i: int,
                name: str, token: str) -> None:
    headers = {"authorization": f"Bearer {token}"}
    turn = i
    chain_start: float | None = None  # first connect since the user last held nothing
    while not storm.over.is_set():
        turn += 1
        url = brokers[turn % 2]
        sent = time.monotonic()
        chain_start = chain_start or sent
        try:
            reply = await client.post(f"{url}/api/v1/pools/{POOL}/connect", headers=headers)
        except httpx.HTTPError as exc:
            storm.bad.append(f"{name} connect at {url}: {exc!r}")
            await asyncio.sleep(1)
            continue
        kind = _kind(reply)
        storm.answers[f"connect {kind}"] += 1
        if kind is None:
            storm.bad.append(f"{name} connect: {reply.status_code} {reply.text[:300]}")
        if kind != "ready":
            await asyncio.sleep(random.uniform(0.3, 0.8))
            continue
        hold = Hold(name, reply.json()["desktop_id"], time.monotonic())
        storm.holds.append(hold)
        await asyncio.sleep(random.uniform(*HOLD_S))
        # The reservation timer may release it RESERVATION_S after it was reserved, which
        # is no sooner than the first connect of this chain was sent.
        hold.until = min(time.monotonic(), chain_start + RESERVATION_S)
        if storm.over.is_set():
            return  # walks away: the session timers give it back
        await _log_off(storm, client, brokers[(turn + 1) % 2], hold, headers, chain_start)
        chain_start = None


async def _log_off(storm: Storm, client: httpx.AsyncClient, url: str, hold: Hold,
                   headers: dict[str, str], chain_start: float) -> None:
    lost_answer = False  # a try got a 503: it may have logged off all the same
    while True:
        try:
            reply = await client.post(f"{url}/api/v1/desktops/{hold.desktop}/logoff",
                                      headers=headers)
        except httpx.HTTPError as exc:
            storm.bad.append(f"{hold.user} logoff at {url}: {exc!r}")
            return
        kind = _kind(reply)
        storm.answers[f"logoff {kind or reply.status_code}"] += 1
        if reply.status_code == 200:
            return
        if kind == "database-down":
            lost_answer = True
            await asyncio.sleep(0.5)
            continue
        timed_out = time.monotonic() >= chain_start + RESERVATION_S
        if reply.status_code == 403 and (lost_answer or timed_out):
            return  # already given back: by the try whose answer was lost, or the timer
        storm.bad.append(f"{hold.user} logoff: {reply.status_code} {reply.text[:300]}")
        return


async def _outages(storm: Storm, server: PostgresServer) -> None:
    """Churn first, then each restart; after each, hand-overs again (the brokers recovered)."""
    async def handed(at_least: int, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while len(storm.holds) < at_least:
            assert time.monotonic() < deadline, f"no hand-overs {what} in {timeout_s:g} s"
            await asyncio.sleep(0.2)

    try:
        await handed(DESKTOPS + 2, 180, "before the first restart")
        for how in RESTARTS:
            mark = len(storm.holds)
            down = time.monotonic()
            await asyncio.to_thread(server.stop, how)
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(server.start)
            storm.outages.append((how, down, time.monotonic()))
            await handed(mark + DESKTOPS, 180, f"after the {how} restart")
    finally:
        storm.over.set()


async def _watch_readyz(storm: Storm, brokers: list[str], client: httpx.AsyncClient) -> None:
    while not storm.over.is_set():
        for b, url in enumerate(brokers):
            try:
                status: int | None = (await client.get(f"{url}/readyz", timeout=5)).status_code
            except httpx.HTTPError:
                status = None
            storm.readyz.append((time.monotonic(), b, status))
        await asyncio.sleep(0.5)


def _sample(ctx: ServiceContext) -> Sample | None:
    start = time.monotonic()
    try:
        with ctx.uow(read_only=True) as uow:
            held = [(str(d), str(u)) for d, u in uow.session.execute(
                select(Desktop.id, Desktop.assigned_user).where(
                    Desktop.state.in_(HELD))).all()]
    except DatabaseUnavailable:
        return None  # the outage: nothing to compare
    return Sample(start, time.monotonic(), held)


async def _watch_database(storm: Storm, ctx: ServiceContext) -> None:
    while not storm.over.is_set():
        sample = await asyncio.to_thread(_sample, ctx)
        if sample is not None:
            storm.samples.append(sample)
        await asyncio.sleep(0.3)


async def _run_storm(world: Deployment) -> Storm:
    storm = Storm()
    brokers = [url for url, _process in world.brokers]
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await asyncio.gather(
            _outages(storm, world.server), _watch_readyz(storm, brokers, client),
            _watch_database(storm, world.ctx),
            *(_user(storm, client, brokers, i, name, token)
              for i, (name, token) in enumerate(world.tokens.items())))
    return storm


# --- the test -------------------------------------------------------------------------------


def test_postgresql_restarted_during_a_logon_storm_on_two_brokers(
        deployment: Deployment) -> None:
    world = deployment
    started = time.monotonic()
    storm = asyncio.run(_run_storm(world))
    storm_s = time.monotonic() - started
    assert not storm.bad, storm.bad
    assert tuple(how for how, _down, _up in storm.outages) == RESTARTS
    # The outages were met by the users, and the users without a desktop were told so.
    assert storm.answers["connect database-down"] + storm.answers["logoff database-down"] > 0
    assert storm.answers["connect no-desktop"] + storm.answers["connect pending"] > 0

    _no_double_assignment(storm)
    _database_agrees(storm)

    # Both brokers' readiness followed the database down and back up, by themselves.
    last_up = storm.outages[-1][2]
    for b, (url, process) in enumerate(world.brokers):
        during = [s for t, i, s in storm.readyz if i == b and any(
            down <= t <= up for _how, down, up in storm.outages)]
        assert 503 in during, f"broker {url} never said it was not ready: {during}"
        wait_for(lambda u=url: _readyz(u) == 200, 30, f"{url} ready again")
        assert process.poll() is None, f"broker {url} died"
        assert any(s == 200 for t, i, s in storm.readyz if i == b and t > last_up)

    # Those still holding a desktop walked away: the session timers release them, the
    # reconcilers recycle them, and the pool is whole, nothing half-done.
    settle_s = wait_for(lambda: _states(world.ctx) == Counter(ready=DESKTOPS),
                        RESERVATION_S + 180, f"the pool back at {DESKTOPS} ready desktops")
    check_invariants(world.settings, world.driver, {}, pool=POOL, spare=DESKTOPS,
                     max_size=DESKTOPS)
    with world.ctx.uow(read_only=True) as uow:
        blamed = uow.session.execute(select(Desktop.name, Desktop.last_error).where(
            Desktop.last_error.contains("database"))).all()
    assert not blamed, f"desktops failed for the database's outage: {blamed}"
    for log in world.logs:
        text = log.read_text()
        assert "programming error" not in text and "hit a bug" not in text, log
        assert "deskpool.api.server_errors" not in text, f"a 500 in {log}"
    recovery = [f"{how}: down {up - down:.1f} s" for how, down, up in storm.outages]
    print(f"[pgstorm] storm {storm_s:.0f} s, {len(storm.holds)} hand-overs, "
          f"{'; '.join(recovery)}; answers {dict(storm.answers)}; "
          f"{len(storm.samples)} database samples; settled {settle_s:.0f} s after")


def _no_double_assignment(storm: Storm) -> None:
    for a, b in combinations(storm.holds, 2):
        overlap = a.received < b.until and b.received < a.until
        if a.desktop == b.desktop and a.user != b.user:
            assert not overlap, f"desktop {a.desktop} held by {a.user} and {b.user} at once"
        if a.user == b.user and a.desktop != b.desktop:
            assert not overlap, f"{a.user} held {a.desktop} and {b.desktop} at once"


def _database_agrees(storm: Storm) -> None:
    assert storm.samples, "the database was never sampled"
    for sample in storm.samples:
        users = [u for _d, u in sample.held]
        assert len(users) == len(set(users)), f"a user holds two desktops: {sample.held}"
        assert len(sample.held) <= DESKTOPS
        for hold in storm.holds:
            if hold.received <= sample.start and sample.end <= hold.until:
                assert (hold.desktop, hold.user) in sample.held, (
                    f"{hold.user} held {hold.desktop} but the database said {sample.held}")

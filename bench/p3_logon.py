"""P3: a logon storm against a no-op storm, over HTTP against the real server, in one run.

A broker process (this script with ``--serve``) builds its world on a temporary SQLite data
dir, since the fake driver keeps its VMs in process memory: a fake host, a template from a tiny
qcow2, one pool of ``--desktops`` ready desktops (``spare`` = ``max_size`` = that number, made
by the reconciler through the factory, as in production), ``--logons`` users in one group that
is entitled to the pool, and one API token each. Then it serves the API with uvicorn on a real
TCP socket.

The client (asyncio + httpx, one connection per user) fires storms of concurrent requests, one
per user: a warm-up ping storm (opens the connections, not counted), then ping, logon, ping.
A ping is ``GET /api/v1/ping``: it authenticates the token and does nothing else. A logon is
``POST /api/v1/pools/p3/connect``. The ping p99 is taken over both ping storms around the
logon storm, so machine noise hits both sides alike. Afterwards the database is read directly
to count double assignments: a desktop named to more than one user, a user holding more than
one desktop, or a ready answer whose desktop the database does not show reserved for its user.

``/metrics`` is scraped as a monitoring system would: once while the logon storm runs (it must
answer under load) and once after it; the second scrape's desktop counts by pool and state and
its logon phase histograms are compared with the database, line by line.

Last line:
    P3 <p99 logon latency / p99 ping latency>   (target <= 3)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import uvicorn
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from deskpool.api.app import create_app
from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.states import HELD_STATES
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store.access_models import Group, GroupMember, Logon, User
from deskpool.store.db import UnitOfWork, make_engine, make_session_factory
from deskpool.store.models import Desktop

POOL = "p3"
GROUP = "p3-users"
HOST_URI = "fake://p3"


def raise_file_limit() -> None:
    """One socket per user on each side: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the broker process ------------------------------------------------------------------


def build_world(data_dir: Path, desktops: int, users: int) -> tuple[ServiceContext, list[str]]:
    """The broker's world: its context (whose fake host holds the VMs, so it must stay open)
    and one API token per user, in user order."""
    ctx = ServiceContext(Settings(data_dir=data_dir))
    HostService(ctx).add("h1", HOST_URI)
    disk = data_dir.parent / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk))
    PoolService(ctx).create(PoolSpec(name=POOL, template="golden", spare=desktops,
                                     max_size=desktops, naming_pattern="p3-{n:04}"))
    start = time.perf_counter()
    reconciler = Reconciler(ctx, workers=4, ready_timeout_s=30)
    for _ in range(5):
        reconciler.run_pass()
        with ctx.uow(read_only=True) as uow:
            ready = sum(1 for d in uow.pools.desktops(uow.pools.get_by_name(POOL).id)
                        if d.state == "ready")
        if ready == desktops:
            break
    else:
        raise SystemExit(f"the reconciler made only {ready} of {desktops} ready desktops")
    fill_s = time.perf_counter() - start
    # Users straight into the table with one shared Argon2 hash: hashing a password per user
    # would take minutes and is not what this measures (logons use API tokens).
    start = time.perf_counter()
    password_hash = PasswordHasher().hash("p3-password")
    with ctx.uow() as uow:
        group = Group(name=GROUP)
        uow.session.add(group)
        uow.flush()
        for n in range(users):
            user = User(name=f"user{n:04}", display_name=f"User {n}", source="local",
                        password_hash=password_hash)
            uow.session.add(user)
            uow.flush()
            uow.session.add(GroupMember(group_id=group.id, user_id=user.id))
        uow.commit()
    EntitlementService(ctx).grant(POOL, "group", GROUP)
    accounts = AccountService(ctx)
    tokens = [accounts.issue_api_token(f"user{n:04}", "p3").token for n in range(users)]
    users_s = time.perf_counter() - start
    with ctx.uow(read_only=True) as uow:
        assert uow.session.query(Desktop).filter(Desktop.state == "ready").count() == desktops
    print(f"world: {desktops} ready desktops made by the reconciler in {fill_s:.1f} s; "
          f"{users} users with API tokens in {users_s:.1f} s", flush=True)
    return ctx, tokens


def serve(workdir: Path, desktops: int, users: int) -> None:
    raise_file_limit()
    ctx, tokens = build_world(workdir / "data", desktops, users)
    (workdir / "tokens.json").write_text(json.dumps(tokens))
    app = create_app(ctx, directories=[], console_ws_port=None)
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it each answer's body waits ~40 ms for the client's delayed ACK of its headers.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # Keep-alive outlasts the run, so every storm reuses the warm-up's connections.
    config = uvicorn.Config(app, log_level="warning", backlog=4096, timeout_keep_alive=600)
    server = uvicorn.Server(config)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        ctx.close()


# --- the client --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_request(before: tuple[float, float], server_pid: int, requests: int) -> str:
    """CPU milliseconds per request the server and this client spent since ``before``."""
    server = (cpu_seconds(server_pid) - before[0]) / requests * 1000
    client = (time.process_time() - before[1]) / requests * 1000
    return f"CPU/req server {server:4.1f} ms, client {client:4.1f} ms"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(values: list[float]) -> str:
    return (f"p50 {percentile(values, 50) * 1000:6.0f} ms  "
            f"p99 {percentile(values, 99) * 1000:6.0f} ms")


async def storm(clients: list[httpx.AsyncClient], method: str, path: str
                ) -> tuple[list[float], list[tuple[int, dict[str, object]]]]:
    """One concurrent request per user; each one's latency and (status, JSON answer)."""
    gate = asyncio.Event()

    async def one(client: httpx.AsyncClient) -> tuple[float, int, dict[str, object]]:
        await gate.wait()
        start = time.perf_counter()
        try:
            answer = await client.request(method, path)
        except httpx.HTTPError as exc:
            return time.perf_counter() - start, 0, {"detail": repr(exc)}
        elapsed = time.perf_counter() - start
        try:
            body = answer.json()
        except ValueError:
            body = {"detail": answer.text[:200]}
        return elapsed, answer.status_code, body

    tasks = [asyncio.create_task(one(c)) for c in clients]
    await asyncio.sleep(0)  # every task is parked at the gate: they start together
    gate.set()
    results = await asyncio.gather(*tasks)
    return [r[0] for r in results], [(r[1], r[2]) for r in results]


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One ``GET /metrics``: each deskpool sample by (name, labels)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600.0) as client:
        started = time.perf_counter()
        answer = await client.get("/metrics")
        answer.raise_for_status()
        print(f"{'metrics scrape':<14} {(time.perf_counter() - started) * 1000:.0f} ms, "
              f"{len(answer.content)} bytes", flush=True)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            if family.name.startswith("deskpool_") for sample in family.samples}


async def run_storms(port: int, server_pid: int, tokens: list[str], pings: int
                     ) -> tuple[list[float], list[float], list[tuple[int, dict[str, object]]],
                                int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    ping_times: list[float] = []
    ping_errors = 0
    async with contextlib.AsyncExitStack() as stack:
        # One client (one connection) per user, as each user has a browser of their own; one
        # shared client with a thousand connections spends its time scanning its own pool.
        clients = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {t}"},
            limits=httpx.Limits(max_connections=1, keepalive_expiry=600),
            timeout=httpx.Timeout(600.0))) for t in tokens]

        async def ping_storm(label: str, keep: bool) -> None:
            nonlocal ping_errors
            cpu = cpu_seconds(server_pid), time.process_time()
            times, answers = await storm(clients, "GET", "/api/v1/ping")
            bad = sum(1 for status, _ in answers if status != 200)
            print(f"{label:<14} {ms(times)}  {cpu_per_request(cpu, server_pid, len(tokens))}"
                  f"  errors {bad}", flush=True)
            if keep:
                ping_times.extend(times)
                ping_errors += bad

        await ping_storm("ping (warm-up)", keep=False)
        for n in range(pings):
            await ping_storm(f"ping {n + 1}", keep=True)
        cpu = cpu_seconds(server_pid), time.process_time()
        # A monitoring scrape lands in the middle of the storm, as it would in production.
        logons = asyncio.ensure_future(storm(clients, "POST", f"/api/v1/pools/{POOL}/connect"))
        await asyncio.sleep(0.05)
        await scrape(port)
        logon_times, answers = await logons
        not_ready = sum(1 for s, a in answers if s != 200 or a.get("status") != "ready")
        print(f"{'logon':<14} {ms(logon_times)}  "
              f"{cpu_per_request(cpu, server_pid, len(tokens))}  not ready {not_ready}",
              flush=True)
        for n in range(pings):
            await ping_storm(f"ping {pings + n + 1}", keep=True)
        metrics = await scrape(port)
    return ping_times, logon_times, answers, ping_errors, metrics


def check_metrics(data_dir: Path,
                  metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> int:
    """Lines where the last scrape and the database disagree: desktops by pool and state,
    and each logon phase's count and sum of the ready logons."""
    engine = make_engine(f"sqlite:///{data_dir / 'deskpool.db'}")
    with UnitOfWork(make_session_factory(engine), read_only=True) as uow:
        by_state = Counter(state for (state,) in uow.session.execute(
            select(Desktop.state).where(Desktop.pool_id.is_not(None))))
        phases = {phase: [v for v in uow.session.scalars(select(column))
                          if v is not None]
                  for phase, column in (("queue", Logon.queue_ms), ("claim", Logon.claim_ms),
                                        ("power_on", Logon.power_on_ms),
                                        ("ready", Logon.ready_ms))}
    engine.dispose()
    scraped_states: Counter[str] = Counter()
    for (name, labels), value in metrics.items():
        if name == "deskpool_desktops" and dict(labels).get("pool") == POOL:
            scraped_states[dict(labels)["state"]] += int(value)
    wrong = 0
    for state in sorted(set(by_state) | set(scraped_states)):
        same = by_state[state] == scraped_states[state]
        wrong += not same
        print(f"  metrics desktops{{pool={POOL},state={state}}} {scraped_states[state]}  "
              f"database {by_state[state]}{'' if same else '  MISMATCH'}")
    for phase, values in phases.items():
        count = metrics.get(("deskpool_logon_phase_seconds_count", (("phase", phase),)), 0.0)
        total = metrics.get(("deskpool_logon_phase_seconds_sum", (("phase", phase),)), 0.0)
        same = int(count) == len(values) and math.isclose(total, sum(values) / 1000,
                                                          rel_tol=1e-6, abs_tol=1e-3)
        wrong += not same
        print(f"  metrics logon phase {phase}: count {int(count)} sum {total:.3f} s  "
              f"database {len(values)} / {sum(values) / 1000:.3f} s"
              f"{'' if same else '  MISMATCH'}")
    return wrong


def check_database(data_dir: Path, users: list[str],
                   answers: list[tuple[int, dict[str, object]]]) -> dict[str, int]:
    """Count double assignments from the answers and straight from the database."""
    engine = make_engine(f"sqlite:///{data_dir / 'deskpool.db'}")
    handed: dict[str, set[str]] = defaultdict(set)  # desktop id -> users it was named to
    for user, (status, body) in zip(users, answers, strict=True):
        if status == 200 and body.get("status") == "ready":
            handed[str(body["desktop_id"])].add(user)
    with UnitOfWork(make_session_factory(engine), read_only=True) as uow:
        held = {str(d_id): (user, state) for d_id, user, state in uow.session.execute(
            select(Desktop.id, Desktop.assigned_user, Desktop.state))}
        holders = Counter(user for user, state in held.values()
                          if user is not None and state in HELD_STATES)
        phases = {phase: [v for v in uow.session.scalars(select(column).where(
            Logon.outcome == "ready")) if v is not None]
            for phase, column in (("queue", Logon.queue_ms), ("claim", Logon.claim_ms),
                                  ("power_on", Logon.power_on_ms), ("ready", Logon.ready_ms))}
        logons = uow.session.scalar(select(func.count()).select_from(Logon)) or 0
    engine.dispose()
    shared = sum(1 for names in handed.values() if len(names) > 1)
    two_each = sum(1 for count in holders.values() if count > 1)
    mismatched = sum(1 for d_id, names in handed.items() for user in names
                     if held.get(d_id, (None, None))[0] != user
                     or held[d_id][1] not in HELD_STATES)
    print(f"logon rows {logons}; server-side phases of ready logons (ms, p50/p99): " + ", ".join(
        f"{k} {percentile(v, 50):.0f}/{percentile(v, 99):.0f}" for k, v in phases.items() if v))
    return {"desktops named to >1 user": shared, "users holding >1 desktop": two_each,
            "answers the database contradicts": mismatched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logons", type=int, default=1000, help="users, one logon each")
    parser.add_argument("--desktops", type=int, default=None,
                        help="ready desktops in the pool (default: as many as logons)")
    parser.add_argument("--pings", type=int, default=1,
                        help="ping storms before and after the logon storm (each)")
    parser.add_argument("--serve", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    desktops = args.desktops if args.desktops is not None else args.logons
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt):  # SIGINT is how the client stops us
            serve(args.serve, desktops, args.logons)
        return

    raise_file_limit()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deskpool-p3-") as tmp:
        workdir = Path(tmp)
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(workdir),
             "--logons", str(args.logons), "--desktops", str(desktops)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert server.stdout is not None
            port = 0
            for line in server.stdout:
                if line.startswith("READY "):
                    port = int(line.split()[1])
                    break
                print(line, end="", flush=True)
            if not port:
                raise SystemExit(f"the broker process ended before serving ({server.wait()})")
            tokens: list[str] = json.loads((workdir / "tokens.json").read_text())
            users = [f"user{n:04}" for n in range(len(tokens))]
            ping_times, logon_times, answers, ping_errors, metrics = asyncio.run(
                run_storms(port, server.pid, tokens, args.pings))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        statuses = Counter(s for s, _ in answers)
        outcomes = Counter(str(a.get("status", a.get("detail", "?")))[:80] for _, a in answers)
        doubles = check_database(workdir / "data", users, answers)
        metrics_wrong = check_metrics(workdir / "data", metrics)
    not_ready = sum(1 for s, a in answers if s != 200 or a.get("status") != "ready")
    print(f"logon answers: HTTP {dict(statuses)}; {dict(outcomes)}")
    for label, count in doubles.items():
        print(f"  {label}: {count}")
    ping_p99, logon_p99 = percentile(ping_times, 99), percentile(logon_times, 99)
    print(f"ping   p50 {percentile(ping_times, 50) * 1000:.1f} ms  p99 {ping_p99 * 1000:.1f} ms"
          f"  (mean {statistics.mean(ping_times) * 1000:.1f} ms, errors {ping_errors})")
    print(f"logon  p50 {percentile(logon_times, 50) * 1000:.1f} ms  "
          f"p99 {logon_p99 * 1000:.1f} ms  (mean {statistics.mean(logon_times) * 1000:.1f} ms, "
          f"errors {not_ready})")
    print(f"{args.logons} logons on {desktops} desktops; run time "
          f"{time.perf_counter() - began:.1f} s")
    print(f"double assignments: {sum(doubles.values())}")
    print(f"/metrics lines that disagree with the database: {metrics_wrong}")
    print(f"P3 {logon_p99 / ping_p99:.2f}")


if __name__ == "__main__":
    main()

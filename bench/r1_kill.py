"""R1: SIGKILL the broker at random moments while real guests are provisioned, recycled and
handed to users, restart it each time, and count what was lost or broken.

Per database (SQLite, then a private PostgreSQL this script starts), on this host's
``qemu:///system``:

* a pool of ``--pool-size`` console-flavor desktops (the image the project builds, cached) that
  reverts on logout, ``spare`` of them kept ready; ``--users`` users with API tokens;
* the broker is a real ``deskpool serve`` process (API, reconciler and session timers in one),
  with short leases so a restarted broker takes over what the killed one held;
* the users, threads of this process, log on and off through the HTTP API all the time
  (``connect``, now and then a reconnect, ``logoff``), retrying while the broker is down;
* ``--kills`` rounds: the broker runs a random time (seeded RNG, the seed is printed), gets a
  SIGKILL and is started again at once. Between rounds the database is read for a user
  holding two desktops.

After the last restart the users stop, each asks the API what it holds, and the broker runs
until the pool has settled (nothing half made, the pool at its size), then stops. Counted:

* orphans: our libvirt domains or volumes that no live desktop row owns, and rows whose state
  says they have a VM that is not there;
* lost desktops: a user's hand-over gone (the API said ready, no logoff, and the desktop is no
  longer theirs), a pool short of its size with nothing on its way;
* double assignments: a desktop held by two users at once, or a user given two desktops at
  once, from the database (rows, at every round and at the end) and from the API's answers;
* stuck desktops: rows in a transitional state (or error) past their leases after settling.

Per-database lines, then the last line:
    R1 <orphans + lost desktops + double assignments + stuck desktops>   (must be 0)

Every VM, volume, storage pool and database this script made is removed at the end, Ctrl-C
included. SIGUSR1 stops the kills early: the run then settles and counts what it did. Broker
logs are kept under ``--log-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from r1_checks import STABLE, Census, Hold, UserLog, World, count_final, db_doubles, desktop_rows

from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.libvirt import LibvirtDriver, forget_storage_pool
from deskpool.images.builder import build_guest_image
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService, resolved_domain_type
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService

POOL, GROUP, TEMPLATE = "r1", "r1-users", "r1-console"
ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# SIGUSR1 ends the kills early: the run settles and counts what it did (a deadline).
WRAP_UP = threading.Event()
LEASE_S = 3  # a killed broker's claims run out this soon: the next one takes over


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- a private PostgreSQL ------------------------------------------------------------------


@contextlib.contextmanager
def private_postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster (as tests/pg_server.py makes one): its own port and
    socket directory, trust on loopback, the ``postgres`` user's when run as root. Yields
    the SQLAlchemy URL of a new empty database."""
    if not (PG_BIN / "initdb").is_file():
        raise SystemExit(f"PostgreSQL server binaries are missing ({PG_BIN}); install "
                         "Debian's postgresql")
    as_root = os.geteuid() == 0
    home = Path(tempfile.mkdtemp(prefix="deskpool-r1-pg-"))  # its own: owned by postgres
    if as_root:
        shutil.chown(home, "postgres", "postgres")

    def run_as(argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if as_root else argv

    subprocess.run(run_as([str(PG_BIN / "initdb"), "-D", str(home / "data"), "-U", "postgres",
                           "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(run_as([
        str(PG_BIN / "postgres"), "-D", str(home / "data"), "-p", str(port),
        "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={home}",
        "-c", "max_connections=200"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the private PostgreSQL did not start")
            time.sleep(0.1)
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "postgres", "r1"], check=True, capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/r1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(home, ignore_errors=True)


# --- users, through the HTTP API ------------------------------------------------------------


class User(threading.Thread):
    """One user: connect until handed a desktop, keep it a while (now and then connecting
    again, which must give the same desktop back), log off; again, until told to stop."""

    def __init__(self, name: str, token: str, url: str, seed: int, stop: threading.Event
                 ) -> None:
        super().__init__(name=f"user-{name}", daemon=True)
        self.user, self.url, self.stop, self.token = name, url, stop, token
        self.rng = random.Random(seed)
        self.client = httpx.Client(base_url=url, timeout=150.0,
                                   headers={"authorization": f"Bearer {token}"})
        self.log = UserLog()
        self.current: Hold | None = None

    def call(self, method: str, path: str) -> tuple[int, dict[str, Any]] | None:
        """The API's answer, or None when the broker did not answer (down, or killed
        while it worked on the request)."""
        try:
            reply = self.client.request(method, path)
        except httpx.HTTPError:
            self.log.unanswered += 1
            return None
        try:
            body = reply.json()
        except ValueError:
            body = {"detail": reply.text[:200]}
        return reply.status_code, body if isinstance(body, dict) else {"items": body}

    def nap(self, low: float, high: float) -> None:
        self.stop.wait(self.rng.uniform(low, high))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.current is None:
                    self.get_one()
                else:
                    self.keep_then_leave()
            except Exception as exc:  # a bench bug: say so, keep the user going
                self.log.anomalies.append(f"{self.user}: bench error {exc!r}")
                self.nap(0.5, 1.0)

    def get_one(self) -> None:
        answer = self.call("POST", f"/api/v1/pools/{POOL}/connect")
        if answer is None:
            self.nap(0.2, 0.6)
            return
        status, body = answer
        if status == 200 and body.get("status") == "ready":
            self.current = Hold(self.user, str(body["desktop_id"]), time.monotonic())
            self.log.holds.append(self.current)
            self.log.served += 1
            self.hold_until = time.monotonic() + self.rng.uniform(2.0, 15.0)
            return
        self.nap(0.5, 2.0)  # pending (being made or prepared), exhausted, busy

    def keep_then_leave(self) -> None:
        assert self.current is not None
        if time.monotonic() < self.hold_until:
            if self.rng.random() < 0.25:
                self.reconnect()
            self.nap(0.5, 3.0)
            return
        self.leave()

    def reconnect(self) -> None:
        """Connecting again while holding a desktop must hand back the same one."""
        assert self.current is not None
        sent = time.monotonic()
        answer = self.call("POST", f"/api/v1/pools/{POOL}/connect")
        if answer is None:
            return
        status, body = answer
        if status == 200 and body.get("status") == "ready":
            self.log.reconnects += 1
            got = str(body["desktop_id"])
            if got != self.current.desktop:
                self.log.anomalies.append(
                    f"{self.user}: reconnect named {got}, holding {self.current.desktop}")
                self.current.ended = sent
                self.current = Hold(self.user, got, time.monotonic())
                self.log.holds.append(self.current)
        elif status == 200:
            self.log.anomalies.append(
                f"{self.user}: reconnect while holding {self.current.desktop} answered "
                f"{body.get('status')}: {body.get('message')}")
        # 503 (its readiness check failed, the host is busy) is the broker's word: a
        # failed desktop is replaced and the user told; the next logoff says whether it
        # is still theirs.

    def leave(self) -> None:
        assert self.current is not None
        hold, unsure = self.current, False
        while not self.stop.is_set():
            if hold.ended is None:
                hold.ended = time.monotonic()
            answer = self.call("POST", f"/api/v1/desktops/{hold.desktop}/logoff")
            if answer is None:
                unsure = True  # applied or not: asking again tells
                self.nap(0.2, 0.6)
                continue
            status, body = answer
            if status == 200:
                break
            if status == 403 and not unsure:
                self.log.anomalies.append(
                    f"{self.user}: logoff of {hold.desktop} refused ({body.get('detail')}): "
                    "the hand-over was lost")
                break
            if status == 403:
                break  # an earlier, unanswered logoff had done it
            self.nap(0.3, 1.0)  # a race with a step on it: try again
        else:
            return  # stopping: the hold stays as it is, checked at the end
        self.log.logoffs += 1
        self.current = None
        self.nap(0.2, 3.0)


# --- the broker process ---------------------------------------------------------------------


class BrokerProcess:
    def __init__(self, settings: Settings, port: int, log_path: Path) -> None:
        self.settings, self.port, self.log_path = settings, port, log_path
        self.console_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "DESKPOOL_CONFIG": "", "PYTHONPATH": str(ROOT),
               "DESKPOOL_DATA_DIR": str(self.settings.data_dir),
               "DESKPOOL_LEASE_S": str(LEASE_S), "DESKPOOL_RECONCILE_INTERVAL_S": "0.5",
               "DESKPOOL_TIMERS_INTERVAL_S": "1",
               # Generous: a console guest may take minutes to boot on a busy machine.
               "DESKPOOL_READY_TIMEOUT_S": "900"}
        if self.settings.database_url:
            env["DESKPOOL_DATABASE_URL"] = self.settings.database_url
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} at {datetime.now(UTC):%H:%M:%S.%f}\n"
                      .encode())
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from deskpool.cli.main import run; run()", "serve",
                 "--port", str(self.port), "--console-port", str(self.console_port),
                 "--spice-port", "0", "--rdp-port", "0"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            if self.process.returncode != -signal.SIGKILL:
                raise SystemExit(f"the broker ended with {self.process.returncode} before "
                                 "its SIGKILL (see its log)")
        self.process = None

    def stop(self) -> None:
        """A clean stop (SIGTERM) for the end of a run."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def up(self, token: str) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/api/v1/ping", timeout=2,
                             headers={"authorization": f"Bearer {token}"}).status_code == 200
        except httpx.HTTPError:
            return False


# --- one database --------------------------------------------------------------------------


def build_world(work: Path, database_url: str | None, label: str, pool_size: int,
                users: int) -> World:
    image = build_guest_image(Settings().image_cache_dir, recipe_for(Flavor.CONSOLE))
    settings = Settings(data_dir=work / "data", database_url=database_url)
    storage = work / "pool"
    spare = max(1, pool_size - 1)
    ctx = ServiceContext(settings)
    try:
        host = HostService(ctx).add("local", "qemu:///system", storage_dir=storage)
        # Whether KVM really boots a guest here is probed once per host, by the first desktop
        # made; the probe boots a kernel (long under TCG on a busy machine), so a broker
        # killed every few seconds would never finish it: it is done before the kills.
        resolved_domain_type(ctx, host.id, ctx.driver_for_name("local"), image.kernel)
        # Starved of CPU (TCG, a machine shared with other sessions' VMs), the guest kernel's
        # early check of the IO-APIC timer fails and it panics ("IO-APIC + timer doesn't
        # work"); VMs skip that check as a rule, the image's command line does not (yet).
        files = ImageFiles.from_guest_image(image)
        files = replace(files, cmdline=f"{files.cmdline or ''} no_timer_check".strip())
        TemplateService(ctx).publish(TEMPLATE, files,
                                     recipe_hash=image.recipe_hash,
                                     memory_mib=image.memory_mib)
        # Names start with the branch's: other sessions on this machine tell them apart.
        PoolService(ctx).create(PoolSpec(
            POOL, TEMPLATE, spare=spare, max_size=pool_size,
            naming_pattern=f"r1kill-{label}{{n:02}}", reservation_timeout_s=86400))
        EntitlementService(ctx).grant(POOL, "group", GROUP)
        accounts = AccountService(ctx)
        tokens = {}
        for n in range(users):
            name = f"r1user{n}"
            accounts.create_user(name, "r1-password-123", groups=[GROUP])
            tokens[name] = accounts.issue_api_token(name, "r1").token
        return World(settings, ctx.installation_id, storage, tokens, spare, pool_size)
    finally:
        ctx.close()


def clean_up(world: World | None, storage: Path) -> None:
    """Every VM of this run's deployment, every volume of its storage pool, the pool."""
    if world is not None and storage.exists():
        with contextlib.suppress(Exception):
            driver = LibvirtDriver("qemu:///system", storage_dir=storage)
            try:
                for vm in driver.list_vms():
                    if (vm.metadata is not None
                            and vm.metadata.installation_id == world.installation):
                        driver.delete_vm(vm.vm_id)
                for volume in driver.list_volumes():
                    driver.delete_volume(volume)
            finally:
                driver.close()
    forget_storage_pool(storage)


def wait_until(check: Any, timeout_s: float, poll_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def run_database(kind: str, args: argparse.Namespace, rng: random.Random) -> Census:
    log_dir: Path = args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    broker_log = log_dir / f"{kind}-broker.log"
    broker_log.write_bytes(b"")
    work = Path(tempfile.mkdtemp(prefix=f"deskpool-r1-{kind}-"))
    storage = work / "pool"
    world: World | None = None
    broker: BrokerProcess | None = None
    stop_users = threading.Event()
    users: list[User] = []
    try:
        with contextlib.ExitStack() as stack:
            url = (stack.enter_context(private_postgres()) if kind == "postgresql"
                   else None)
            world = build_world(work, url, kind[0], args.pool_size, args.users)
            ctx = ServiceContext(world.settings)
            stack.callback(ctx.close)
            broker = BrokerProcess(world.settings, free_port(), broker_log)
            any_token = next(iter(world.tokens.values()))
            began = time.monotonic()
            broker.start()
            if not wait_until(lambda: broker is not None and broker.up(any_token), 120, 0.3):
                raise SystemExit(f"[{kind}] the broker did not come up (see {broker_log})")
            # The kills start at once: the pool's guests are made (cloned, booted, confirmed)
            # under them, as are the users' hand-overs.
            print(f"[{kind}] broker up in {time.monotonic() - began:.0f} s; "
                  f"{args.kills} kills follow", flush=True)
            for n, (name, token) in enumerate(sorted(world.tokens.items())):
                user = User(name, token, f"http://127.0.0.1:{broker.port}",
                            rng.randrange(2**32) + n, stop_users)
                users.append(user)
                user.start()
            doubles_seen = kill_rounds(kind, args, rng, broker, ctx, users)
            # The last restart: users stop, then ask the API what they hold.
            stop_users.set()
            for user in users:
                user.join(timeout=200)
            if not wait_until(lambda: broker is not None and broker.up(any_token), 120, 0.3):
                raise SystemExit(f"[{kind}] the broker did not come up after the last kill")
            api_holds = {u.user: u.call("GET", "/api/v1/desktops") for u in users}
            settled = settle(ctx, world, args.settle_s)
            broker.stop()
            # Its leases run out first: a step it had in hand then counts as stuck if its
            # desktop is still half made.
            time.sleep(LEASE_S + 1)
            census = count_final(ctx, world, [u.log for u in users], api_holds, doubles_seen)
            census.notes.append(f"settled: {settled}")
            census.elapsed_s = time.monotonic() - began
            census.kills = broker.starts - 1
            return census
    finally:
        stop_users.set()
        if broker is not None:
            broker.kill()
        clean_up(world, storage)
        shutil.rmtree(work, ignore_errors=True)


def kill_rounds(kind: str, args: argparse.Namespace, rng: random.Random,
                broker: BrokerProcess, ctx: ServiceContext, users: list[User]) -> int:
    """``--kills`` rounds of run, SIGKILL, restart. Returns how many times the database
    showed a user holding two desktops between rounds."""
    doubles = 0
    started = time.monotonic()
    token = next(iter(users)).token
    for n in range(1, args.kills + 1):
        if WRAP_UP.is_set():
            print(f"[{kind}] SIGUSR1: no more kills after {n - 1}; settling", flush=True)
            break
        # A process takes seconds to start on a busy machine: a fifth of the kills land in
        # its start-up, the rest a random time after it answers, while it works.
        if rng.random() < 0.2:
            moment = "starting"
            time.sleep(rng.uniform(0.1, 3.0))
        else:
            moment = "serving"
            wait_until(lambda: broker.up(token) or not broker.alive(), 120, 0.2)
            time.sleep(rng.uniform(args.kill_min, args.kill_max))
        if not broker.alive():
            raise SystemExit(f"[{kind}] the broker died by itself before kill {n} "
                             f"(see {broker.log_path})")
        broker.kill()
        found = db_doubles(ctx)
        doubles += len(found)
        states = Counter(d.state for d in desktop_rows(ctx))
        served = sum(u.log.served for u in users)
        anomalies = sum(len(u.log.anomalies) for u in users)
        print(f"[{kind}] kill {n:3}/{args.kills} at {time.monotonic() - started:6.0f} s "
              f"({moment})  "
              f"{dict(sorted(states.items()))}  served {served} anomalies {anomalies}"
              + (f"  TWO DESKTOPS: {found}" if found else ""), flush=True)
        broker.start()
        if (found or anomalies) and not args.keep_going:
            print(f"[{kind}] stopping the kills at the first anomaly (--keep-going runs on)")
            break
    return doubles


def settle(ctx: ServiceContext, world: World, timeout_s: float) -> str:
    """Run the last broker until the pool holds only stable desktops at its size, twice in a
    row 5 s apart."""
    began = time.monotonic()
    quiet = 0
    while time.monotonic() - began < timeout_s:
        rows = desktop_rows(ctx)
        held = sum(1 for d in rows if d.state in {"reserved", "in_use", "idle"}
                   or (d.state == "ready" and d.assigned_user is not None))
        wanted = min(held + world.spare, world.max_size)
        stable = all(d.state in STABLE for d in rows) and len(rows) == wanted
        quiet = quiet + 1 if stable else 0
        if quiet == 2:
            return f"yes, after {time.monotonic() - began:.0f} s"
        time.sleep(5)
    return f"NO, still moving after {timeout_s:.0f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs per database")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    parser.add_argument("--pool-size", type=int, default=3,
                        help="the pool's maximum size (its spare is one less; default 3)")
    parser.add_argument("--users", type=int, default=4, help="users logging on and off")
    parser.add_argument("--kill-min", type=float, default=0.5,
                        help="shortest time the broker serves before its SIGKILL, s")
    parser.add_argument("--kill-max", type=float, default=6.0,
                        help="longest time the broker serves before its SIGKILL, s")
    parser.add_argument("--settle-s", type=float, default=600.0,
                        help="how long the last broker may take to settle the pool, s")
    parser.add_argument("--keep-going", action="store_true",
                        help="keep killing after an anomaly (default: stop the kills at the "
                             "first one, settle and count, with diagnostics)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/r1kill"),
                        help="where the broker logs are kept (default /tmp/r1kill)")
    args = parser.parse_args()
    if args.kills < 1 or args.pool_size < 2 or args.users < 1:
        parser.error("--kills and --users must be at least 1, --pool-size at least 2")
    if not 0 < args.kill_min <= args.kill_max:
        parser.error("--kill-min must be above 0 and at most --kill-max")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}", flush=True)
    rng = random.Random(seed)
    # Ctrl-C and SIGTERM alike end the run through the clean-up in ``run_database`` (SIGINT
    # too when a shell started this in the background, which ignores it there).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR1, lambda _signo, _frame: WRAP_UP.set())
    total = 0
    for kind in (("sqlite", "postgresql") if args.db == "both" else (args.db,)):
        census = run_database(kind, args, rng)
        census.print(kind)
        total += census.total
    print(f"R1 {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

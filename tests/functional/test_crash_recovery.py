"""Crashes at random points of provisioning and recycling, then a restart and reconcile passes.

The broker "dies" at a random hypervisor call: from then on nothing it does reaches the
hypervisor (as after SIGKILL), and the pass is abandoned. A fresh service context (a restarted
process) on the same database and the same hypervisor then reconciles. Afterwards: every
deskpool VM on the host is known to the database, every desktop that should have a VM has
one, no user's desktop was lost, and the pool is at its wanted size with all free desktops
ready. Runs against the fake driver and libvirt's test:/// driver; ``test_sigkill.py`` does
the same with a real SIGKILL of a separate process.
"""

from __future__ import annotations

import random
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deskpool.config import Settings
from deskpool.domain.models import ConsoleAddress, Customization
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store.models import Host
from tests.crash_invariants import check_invariants
from tests.pool_users import PoolUsers

SPARE, MAX = 3, 6  # SPARE >= len(USERS)
ROUNDS = 25
USERS = ("ann", "bob", "cid")


class SteppingClock:
    """Each reading is an hour after the last, so every backoff has expired by the next pass."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(hours=1)
        return self.now


class SimulatedCrash(BaseException):
    """The process died: not an error any layer may catch and handle."""


class CrashingDriver:
    """Passes calls to the real driver until call number ``crash_at``; then it and every
    later call raise ``SimulatedCrash``."""

    def __init__(self, inner: HypervisorDriver, crash_at: int) -> None:
        self._inner, self._crash_at, self._calls = inner, crash_at, 0
        self._lock = threading.Lock()
        self.crashed = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target) or name == "close":
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._calls += 1
                if self._calls >= self._crash_at:
                    self.crashed = True
                if self.crashed:
                    raise SimulatedCrash(f"crashed at hypervisor call {self._crash_at} ({name})")
            return target(*args, **kwargs)

        return call


class CrashingContext(ServiceContext):
    def __init__(self, settings: Settings, driver: HypervisorDriver, crash_at: int) -> None:
        super().__init__(settings)
        self.crashing = CrashingDriver(driver, crash_at)

    def driver_for(self, host: Host) -> HypervisorDriver:
        return self.crashing  # type: ignore[return-value]


@pytest.fixture(params=["fake", "libvirt-test"])
def setup(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Settings, HypervisorDriver]]:
    forget_fake_hosts()
    settings = Settings(data_dir=tmp_path / "data")
    ctx = ServiceContext(settings)
    uri = "fake://crash" if request.param == "fake" else "test:///default"
    # libvirt's test:/// host reports 3 GiB: overcommit its pretend memory to fit the pool.
    HostService(ctx).add("h1", uri, storage_dir=tmp_path / "pool",
                         limits=HostLimits(memory_overcommit=8.0))
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    # test:/// has no guest agent, so its template is one whose readiness is "running".
    customization = Customization.FWCFG if request.param == "fake" else Customization.NONE
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk), customization=customization)
    PoolService(ctx).create(PoolSpec("lab", "golden", spare=SPARE, max_size=MAX,
                                     naming_pattern="lab-{n:03}"))
    driver = ctx.driver_for_name("h1")
    ctx.close = lambda: None  # type: ignore[method-assign]  # keep the hypervisor connection
    yield settings, driver
    for vm in driver.list_vms():
        if vm.metadata is not None:
            driver.delete_vm(vm.vm_id)
    forget_fake_hosts()


def _user_events(broker: PoolUsers, rng: random.Random, users: dict[str, uuid.UUID]) -> None:
    """Some users log on, some log off (which sends their desktop to be recycled). The last
    round's restart left the pool settled, ``SPARE`` ready for as many users: each logon gets
    a desktop at once."""
    for name in USERS:
        if name in users and rng.random() < 0.5:
            broker.log_off(users.pop(name), name)
        elif name not in users and rng.random() < 0.5:
            users[name] = broker.connect(name)


def test_random_crashes_during_provisioning_and_recycling_are_recovered(
    setup: tuple[Settings, HypervisorDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, driver = setup
    rng = random.Random(20261123)
    users: dict[str, uuid.UUID] = {}
    crashes = 0
    clock = SteppingClock()
    # Users log on and off through a broker process of its own, which does not crash (its
    # hand-over checks reach the hypervisor, so it must not share the crashing driver).
    broker = PoolUsers(ServiceContext(settings), "lab", ready_timeout_s=2)
    broker.entitle(*USERS)
    if not isinstance(driver, FakeDriver):
        # test:/// gives a running domain no VNC port, so the broker's "the display listens"
        # check is pointed at a stand-in address (as its template expects no agent).
        monkeypatch.setattr(broker.ctx.driver_for_name("h1"), "console_address",
                            lambda vm_id, *_: ConsoleAddress("vnc", "127.0.0.1", 5900))
    for round_ in range(ROUNDS):
        crashing = CrashingContext(settings, driver, crash_at=rng.randint(1, 12))
        if round_:  # the first round starts from an empty pool, with nothing to hand out
            _user_events(broker, rng, users)
        try:
            Reconciler(crashing, workers=1, ready_timeout_s=2).run_pass()
        except SimulatedCrash:
            crashes += 1
        # The restarted process: passes until settled (the backoff clock is moved on).
        restarted = ServiceContext(settings)
        for _ in range(4):
            Reconciler(restarted, workers=2, ready_timeout_s=2, clock=clock).run_pass()
        check_invariants(settings, driver, users, pool="lab", spare=SPARE, max_size=MAX)
    assert crashes >= ROUNDS // 2  # most rounds really crashed somewhere

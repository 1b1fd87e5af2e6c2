"""libvirtd SIGKILLed in the middle of each provisioning step of a desktop, then restarted: no
orphan, no duplicate.

The pool's only host is a second libvirt daemon of its own (``tests/libvirt_hosts.py``), so its
daemon can be killed without touching the system one. A kill switch wraps the calls the
reconciler makes at each step of a desktop's making and, on entering the step it is armed for,
SIGKILLs the daemon (the call then goes on into the dead connection); the daemon comes back
after a short pause. The steps, in the order one desktop meets them, are armed one after the
other, so each attempt dies one step further on and one pool of one desktop covers them all:

* ``import``: while the template's disk is uploaded to the host (a half-written volume);
* ``clone``: while the desktop's overlay is written (its root volume half-made);
* ``define``: the volume made, the domain not yet defined;
* ``start``: as soon as the daemon has launched the guest's QEMU, before the start returns;
* ``agent``: while the factory waits for the booting guest's agent (QEMU lives on);
* ``snapshot``: on taking the factory snapshot of the booted guest.

After each kill, and once more when the pool is at its size, the host is checked: every domain
and volume belongs to a desktop row that is alive, nothing is made twice (one domain per row,
unique names and MACs, no QEMU process libvirt does not know), and at the end every desktop is
ready, its guest agent answers and nothing is left in a state on its way somewhere.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import owned_volume_names, root_volume_name
from deskpool.drivers.libvirt import driver as libvirt_driver
from deskpool.drivers.libvirt import overlays
from deskpool.drivers.libvirt.driver import default_pool_name
from deskpool.images.builder import GuestImage
from deskpool.images.layer_tree import sha256_of
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store.models import Desktop
from tests.libvirt_hosts import SecondLibvirtHost

pytestmark = pytest.mark.realvm
HOST, POOL = "lvkill-host", "lvkill"
POINTS = ("import", "clone", "define", "start", "agent", "snapshot")
RESTART_PAUSE_S = 1.5  # the daemon stays dead this long before it is started again
SETTLE_S = 420.0


class KillSwitch:
    """SIGKILLs the host's daemon when the call of the next point in ``points`` begins, and
    starts it again ``RESTART_PAUSE_S`` later on a thread of its own; then the point after
    is armed (several points may come in one step, e.g. the agent and the snapshot)."""

    def __init__(self, host: SecondLibvirtHost, points: tuple[str, ...]) -> None:
        self.host = host
        self.waiting = list(points)
        self.fired: list[str] = []
        self.notes: dict[str, str] = {}  # what each kill cut short, as the test saw it
        self._lock = threading.Lock()
        self._restarter: threading.Thread | None = None
        self._started = time.monotonic()

    @property
    def armed(self) -> str | None:
        return self.waiting[0] if self.waiting else None

    def hit(self, point: str) -> None:
        """Called on entering ``point``: the kill, if it is the next one (once)."""
        with self._lock:
            if self.armed != point:
                return
            self.wait_restarted()  # the last kill's daemon is back before the next dies
            self.waiting.pop(0)
            self.host.kill_daemon()
            self.fired.append(point)
            print(f"[{time.monotonic() - self._started:6.1f} s] libvirtd killed at {point}")
            self._restarter = threading.Thread(target=self._restart, daemon=True)
            self._restarter.start()

    def _restart(self) -> None:
        time.sleep(RESTART_PAUSE_S)
        if self.fired[-1] == "import":  # what the dead daemon left of the template's disk
            sizes = [p.stat().st_size for p in self.host.storage_dir.glob("tv-*.qcow2")]
            self.notes["import"] = f"the template disk on the host was {sizes} bytes"
        took = self.host.start_daemon()
        print(f"[{time.monotonic() - self._started:6.1f} s] libvirtd back after {took:.1f} s")

    def wait_restarted(self) -> None:
        if self._restarter is not None:
            self._restarter.join(60)
            assert not self._restarter.is_alive(), "libvirtd did not come back"
            assert self.host.daemon_running()


def install(monkeypatch: pytest.MonkeyPatch, switch: KillSwitch) -> None:
    """Wrap the calls at each step. Only the second host's daemon dies: the wrappers are the
    process's, but this test talks to no other daemon."""

    def before(owner: Any, name: str, point: str,
               when: Callable[[], bool] = lambda: True) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if when():
                switch.hit(point)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    # import: the template's upload, after its first 16 MiB went through (4 MiB chunks).
    sends = [0]

    def fifth_chunk() -> bool:
        sends[0] += 1
        return switch.armed == "import" and sends[0] >= 5

    before(libvirt.virStream, "send", "import", fifth_chunk)
    # clone: the overlay volume exists, its bytes are on their way.
    before(overlays.OverlayWriter, "_upload", "clone")
    before(libvirt.virConnect, "defineXML", "define")
    before(libvirt.virDomain, "snapshotCreateXML", "snapshot")
    before(libvirt_driver.LibvirtDriver, "agent_command", "agent")

    # start: killed as soon as the guest's QEMU process is there, while the start runs.
    original_create = libvirt.virDomain.create

    def create(dom: libvirt.virDomain) -> int:
        if switch.armed != "start":
            return int(original_create(dom))
        name = dom.name()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if qemu_processes(switch.host).get(name):
                    switch.hit("start")
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = int(original_create(dom))
            switch.notes["start"] = "the start returned"
            return result
        except libvirt.libvirtError as exc:
            switch.notes["start"] = f"the start failed: {exc.get_error_message()}"
            raise
        finally:
            done.set()
            watcher.join()

    monkeypatch.setattr(libvirt.virDomain, "create", create)


def qemu_processes(host: SecondLibvirtHost) -> dict[str, int]:
    """Every QEMU process of the host by its guest's name, found in /proc (not in libvirt's
    pid files: a process libvirt lost track of is what this looks for)."""
    base = str(host.base_dir).encode()
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if not argv or b"qemu-system" not in argv[0] or "\nState:\tZ" in status:
            continue
        if not any(base in arg for arg in argv):
            continue
        for flag, value in itertools.pairwise(argv):
            if flag == b"-name":
                name = value.decode().split(",")[0].removeprefix("guest=")
                found[name] = int(entry.name)
    return found


def rows(ctx: ServiceContext) -> list[Desktop]:
    with ctx.uow(read_only=True) as uow:
        found = [uow.desktops.get(d.id) for d in uow.desktops.summaries()]
        for desktop in found:
            uow.detach(desktop)
        return found


def check_host(ctx: ServiceContext, host: SecondLibvirtHost, *, final: bool) -> None:
    """No orphan, no duplicate; with ``final``, nothing half-made either."""
    desktops = {d.id: d for d in rows(ctx) if d.state != "retired"}
    conn = libvirt.open(host.uri)
    try:
        domains = {uuid.UUID(dom.UUIDString()): dom for dom in conn.listAllDomains(0)}
        pool = conn.storagePoolLookupByName(default_pool_name(host.storage_dir))
        pool.refresh(0)
        volumes = set(pool.listVolumes())
        active = {dom.name() for dom in domains.values() if dom.isActive()}
        snapshots = [n for dom in domains.values() for n in dom.snapshotListNames(0)]
        macs = [m for dom in domains.values()
                for m in _macs(dom.XMLDesc(0))]
    finally:
        conn.close()
    assert set(domains) <= set(desktops), (
        f"domains without a live desktop row: {set(domains) - set(desktops)}")
    names = [d.name for d in desktops.values()]
    assert len(names) == len(set(names)), f"two desktops share a name: {names}"
    row_macs = [d.mac for d in desktops.values()]
    assert len(row_macs) == len(set(row_macs)), f"two desktops share a MAC: {row_macs}"
    assert len(macs) == len(set(macs)), f"two domains share a MAC: {macs}"
    owned = {v for d in desktops for v in owned_volume_names(d)}
    template = {v for v in volumes if v.startswith("tv-")
                and not v.endswith(overlays.prototype_volume_name(""))}
    stray = volumes - owned - template
    assert not stray, f"volumes no live desktop owns: {sorted(stray)}"
    processes = qemu_processes(host)
    assert set(processes) <= active, (
        f"QEMU processes libvirt does not run: {set(processes) - active}")
    live = [d for d in desktops.values() if d.state not in ("retiring", "error", "deleting")]
    assert len(live) <= 1, f"more live desktops than the pool's size: {live}"
    if not final:
        return
    assert [d.state for d in desktops.values()] == ["ready"], [
        (d.name, d.state, d.last_error) for d in desktops.values()]
    (ready,) = desktops.values()
    assert set(domains) == {ready.id}
    assert volumes == template | (set(owned_volume_names(ready.id)) & volumes)
    # One factory snapshot, in libvirt's records and in the disk (a savevm the kill cut
    # short and the retry's are not two).
    assert ready.has_factory_snapshot
    assert snapshots == ["factory"], snapshots
    listed = subprocess.run(
        ["qemu-img", "snapshot", "-U", "-l", str(host.storage_dir / root_volume_name(ready.id))],
        capture_output=True, text=True, check=True).stdout.split()
    assert listed.count("factory") == 1, listed


def _macs(domain_xml: str) -> list[str]:
    import xml.etree.ElementTree as ET

    tree = ET.fromstring(domain_xml)
    return [m.get("address", "") for m in tree.iterfind("./devices/interface/mac")]


@pytest.fixture()
def killable(guest_image: GuestImage, tmp_path: Path
             ) -> Iterator[tuple[ServiceContext, SecondLibvirtHost]]:
    with SecondLibvirtHost() as host:
        ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
        try:
            HostService(ctx).add(HOST, host.uri, storage_dir=host.storage_dir)
            TemplateService(ctx).publish("golden", ImageFiles.from_guest_image(guest_image),
                                         recipe_hash=guest_image.recipe_hash, arch="x86_64")
            PoolService(ctx).create(PoolSpec(POOL, "golden", spare=1, max_size=1,
                                             naming_pattern=f"{POOL}-{{n:02}}"))
            yield ctx, host
        finally:
            ctx.close()  # the host's close() removes its domains and pools


def test_libvirtd_killed_in_each_provisioning_step_leaves_no_orphan_and_no_duplicate(
    killable: tuple[ServiceContext, SecondLibvirtHost], monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx, host = killable
    switch = KillSwitch(host, POINTS)
    install(monkeypatch, switch)
    reconciler = Reconciler(ctx, workers=2, ready_timeout_s=240)
    started = time.monotonic()
    seen = 0
    try:
        deadline = time.monotonic() + SETTLE_S
        while switch.waiting or [d.state for d in rows(ctx)] != ["ready"]:
            assert time.monotonic() < deadline, (
                f"still waiting for {switch.waiting}: "
                f"{[(d.name, d.state, d.last_error) for d in rows(ctx)]}")
            reconciler.run_pass()
            switch.wait_restarted()  # (the checks talk to the daemon too)
            check_host(ctx, host, final=False)
            if len(switch.fired) > seen:
                seen = len(switch.fired)
                print(f"[{time.monotonic() - started:6.1f} s] a pass after the kill at "
                      f"{switch.fired[-1]}: {[(d.name, d.state.value) for d in rows(ctx)]}")
            time.sleep(0.5)
    finally:
        reconciler.close()
        switch.wait_restarted()
    print(f"[{time.monotonic() - started:6.1f} s] pool at its size")
    assert switch.fired == list(POINTS)
    print(f"what the kills cut short: {switch.notes}")
    assert "failed" in switch.notes["start"], "the kill did not land while the VM started"
    (template_size,) = [p.stat().st_size for p in host.storage_dir.glob("tv-*.qcow2")]
    assert str([template_size]) not in switch.notes["import"], "the upload was not cut short"
    check_host(ctx, host, final=True)
    (ready,) = rows(ctx)
    driver = ctx.driver_for_name(HOST)
    assert GuestAgent(driver, ready.id).host_name() == ready.hostname
    # The template's disk on the host is whole: the upload the kill cut short was redone.
    with ctx.uow(read_only=True) as uow:
        version = uow.desktops.get(ready.id).template_version
        disk, expected = f"tv-{version.id}{Path(version.image_path).suffix}", version.image_sha256
    assert sha256_of(host.storage_dir / disk) == expected

"""A template version's customization on the fake driver: the admin's cloud-init user data in
each desktop's seed, and the join hook run once per desktop before it is ready, with its
identity, its failure recorded. (The fake guest runs no shell: a stand-in for the hook runner
answers here; tests/realvm/test_customization_hooks.py runs the real one in a real guest.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import Customization
from deskpool.domain.pools import OnLogout, PoolSpec
from deskpool.domain.states import DesktopState, transition
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.fake import guest as fake_guest
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.images.cloudinit import read_nocloud_seed
from deskpool.reconciler.loop import Reconciler
from deskpool.services import factory as factory_module
from deskpool.services.context import ServiceContext
from deskpool.services.customize import JOIN_MARKER_PATH, JoinHookFailed
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.functional.test_desktop_factory import make_qcow2

HOOK = "#!/bin/sh\necho joined\n"
FAILING_HOOK = "#!/bin/sh\necho 'realm: cannot reach the domain controller'\nexit 3\n"


class HookRuns:
    """What the stand-in runner saw: one (environment, hook text) per run."""

    def __init__(self) -> None:
        self.runs: list[tuple[dict[str, str], str]] = []


@pytest.fixture()
def hook_runs(monkeypatch: pytest.MonkeyPatch) -> HookRuns:
    """The fake guest runs ``/usr/bin/env -i VARS... /bin/sh -c RUNNER deskpool-join MARKER
    HOOK`` as the real runner would: the hook's ``exit N`` is its status, its output is
    ``joined`` or its echo, and only a success leaves the marker."""
    seen = HookRuns()
    original = fake_guest.FakeGuest._exec

    def exec_(self: Any, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("path") != "/usr/bin/env":
            return original(self, args)
        argv = [str(a) for a in args["arg"]]
        shell = argv.index("/bin/sh")
        env = dict(a.split("=", 1) for a in argv[1:shell])
        marker, hook = argv[shell + 4], argv[shell + 5]
        seen.runs.append((env, hook))
        exit_code = re.search(r"^exit (\d+)$", hook, re.M)
        code = int(exit_code[1]) if exit_code else 0
        out = "".join(f"{m}\n" for m in re.findall(r"^echo '?([^']*)'?$", hook, re.M))
        if code:
            out += f"deskpool: the join hook exited with status {code}\n"
        else:
            self._files[JOIN_MARKER_PATH] = f"{marker}\n".encode()
        self._next_id += 1
        self._procs[self._next_id] = fake_guest._Process(code, out.encode(), b"", True)
        return {"pid": self._next_id}

    monkeypatch.setattr(fake_guest.FakeGuest, "_exec", exec_)
    return seen


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    HostService(context).add("h1", "fake://h1")
    yield context
    context.close()
    forget_fake_hosts()


def publish(ctx: ServiceContext, tmp_path: Path, name: str = "golden", **kw: Any) -> None:
    TemplateService(ctx).publish(name, ImageFiles(disk=make_qcow2(tmp_path / f"{name}.qcow2")),
                                 **kw)


def test_the_join_hook_runs_once_with_the_desktops_identity(
        ctx: ServiceContext, tmp_path: Path, hook_runs: HookRuns) -> None:
    publish(ctx, tmp_path, join_hook=HOOK)
    desktops = DesktopService(ctx)
    desktop = desktops.create("golden", name="lab-1")
    assert desktop.state == DesktopState.READY.value
    ((env, hook),) = hook_runs.runs
    assert hook == HOOK
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "LANG": "C.UTF-8",
        "DESKPOOL_DESKTOP_ID": str(desktop.id), "DESKPOOL_DESKTOP_NAME": "lab-1",
        "DESKPOOL_HOSTNAME": "lab-1", "DESKPOOL_MAC": desktop.mac,
        "DESKPOOL_MACHINE_ID": desktop.machine_id, "DESKPOOL_POOL": "",
        "DESKPOOL_TEMPLATE": "golden", "DESKPOOL_TEMPLATE_VERSION": "1",
        "DESKPOOL_IDENTITY_METHOD": "fwcfg",
    }
    (ran,) = [e for e in recent_events(ctx) if e.kind == "join-hook-ran"]
    assert ran.desktop == "lab-1" and ran.message.endswith(": joined")

    # Repaired (error -> customizing -> ready) on the same disk: the marker says it ran.
    with ctx.uow() as uow:
        transition(uow.desktops, desktop.id, DesktopState.READY, DesktopState.ERROR)
        transition(uow.desktops, desktop.id, DesktopState.ERROR, DesktopState.CUSTOMIZING)
        uow.commit()
    desktops.factory.make_ready(desktop.id, timeout_s=5)
    assert desktops.get("lab-1").state == DesktopState.READY.value
    assert len(hook_runs.runs) == 1


def test_a_failing_hook_puts_the_desktop_in_error_with_its_output(
        ctx: ServiceContext, tmp_path: Path, hook_runs: HookRuns) -> None:
    publish(ctx, tmp_path, join_hook=FAILING_HOOK)
    desktops = DesktopService(ctx)
    with pytest.raises(JoinHookFailed, match="exit 3"):
        desktops.create("golden", name="lab-1")
    failed = desktops.get("lab-1")
    assert failed.state == DesktopState.ERROR.value
    assert failed.last_error is not None
    assert "cannot reach the domain controller" in failed.last_error
    (event,) = [e for e in recent_events(ctx) if e.kind == "join-hook-failed"]
    assert event.severity == "error" and event.desktop == "lab-1"
    assert "template golden v1 failed on lab-1 (exit 3): realm: cannot reach the domain " \
           "controller | deskpool: the join hook exited with status 3" in event.message
    driver = open_driver("fake://h1")
    assert isinstance(driver, FakeDriver)
    agent = GuestAgent(driver, failed.id)
    with pytest.raises(Exception, match="No such file"):
        agent.read_file(JOIN_MARKER_PATH)  # no marker: a retry would run it again


def test_the_factory_snapshot_is_taken_after_the_join(
        ctx: ServiceContext, tmp_path: Path, hook_runs: HookRuns) -> None:
    """A pool that recycles by reverting: the snapshot holds the joined disk, so a recycle
    returns to it and the hook does not run again."""
    publish(ctx, tmp_path, join_hook=HOOK)
    PoolService(ctx).create(PoolSpec(name="lab", template="golden", min_size=1, max_size=1,
                                     spare=0, naming_pattern="lab-{n}",
                                     on_logout=OnLogout.RECYCLE_REVERT))
    Reconciler(ctx, workers=1, ready_timeout_s=5).run_pass()
    (desktop,) = DesktopService(ctx).list()
    assert desktop.state == DesktopState.READY.value and len(hook_runs.runs) == 1
    driver = open_driver("fake://h1")
    assert isinstance(driver, FakeDriver)
    agent = GuestAgent(driver, desktop.id)
    agent.write_file("/home/user-file", b"the last user's")
    driver.revert_to_snapshot(desktop.id, factory_module.FACTORY_SNAPSHOT)
    assert f"desktop_id={desktop.id}" in agent.read_file(JOIN_MARKER_PATH).decode()
    with pytest.raises(Exception, match="No such file"):
        agent.read_file("/home/user-file")
    assert (env := hook_runs.runs[0][0])["DESKPOOL_POOL"] == "lab", env


def test_the_admins_user_data_goes_into_each_seed(
        ctx: ServiceContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_data = "#cloud-config\nruncmd:\n  - [touch, /var/tmp/admin-was-here]\n"
    publish(ctx, tmp_path, customization=Customization.CLOUD_INIT, user_data=user_data)
    seeds: list[dict[str, str]] = []
    real = factory_module.write_nocloud_seed

    def spy(path: Path, **kw: Any) -> Path:
        written = real(path, **kw)
        seeds.append(read_nocloud_seed(written))
        return written

    monkeypatch.setattr(factory_module, "write_nocloud_seed", spy)
    # A fake VM with a seed boots no guest (no fw_cfg identity): only the seed is checked.
    DesktopService(ctx).create("golden", name="ci-1", wait_ready=False)
    (seed,) = seeds
    assert 'local-hostname: "ci-1"' in seed["meta-data"]
    assert 'hostname: "ci-1"' in seed["user-data"]
    assert "[touch, /var/tmp/admin-was-here]" in seed["user-data"]


@pytest.mark.parametrize(("kw", "problem"), [
    ({"user_data": "#cloud-config\n"}, "needs the cloud-init customization"),
    ({"customization": Customization.CLOUD_INIT, "user_data": "runcmd: []"},
     "must start with #cloud-config"),
    ({"join_hook": "echo hi"}, "must start with an interpreter line"),
    ({"join_hook": "#!/bin/sh\n" + "#" * 70000}, "at most 65536"),
    ({"join_hook": "   "}, "the join hook is empty"),
    ({"customization": Customization.NONE, "join_hook": HOOK}, "customization none"),
])
def test_bad_customization_is_refused_at_publish(
        ctx: ServiceContext, tmp_path: Path, kw: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        publish(ctx, tmp_path, **kw)
    assert TemplateService(ctx).list_versions() == []


def test_the_listing_says_which_versions_are_customized(
        ctx: ServiceContext, tmp_path: Path) -> None:
    publish(ctx, tmp_path, "plain")
    publish(ctx, tmp_path, "joined", customization=Customization.CLOUD_INIT,
            user_data="#cloud-config\n", join_hook=HOOK)
    listed = {v.template: (v.has_user_data, v.has_join_hook)
              for v in TemplateService(ctx).list_versions()}
    assert listed == {"plain": (False, False), "joined": (True, True)}

"""The fake guest, through GuestAgent, and its saved state: snapshots, save, instant clones."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, cast

import pytest

from deskpool.domain.errors import AgentUnavailable, DriverError, InvalidInput, NotFound
from deskpool.domain.identity import GUEST_MARKER_PATH, DesktopIdentity
from deskpool.domain.models import CloneMode, PowerState, VmSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.fake import FakeDriver
from tests.unit.fake_driver_helpers import (
    assert_nothing_left,
    base_image_fixture,  # noqa: F401
    booted,
    fake_fixture,  # noqa: F401
    make_identity,
    make_spec,
)

# --- the fake guest, through GuestAgent -----------------------------------------------------


def test_guest_carries_the_identity_it_was_given(fake: FakeDriver) -> None:
    identity = make_identity()
    spec, agent = booted(fake, identity)
    assert agent.host_name() == "lab-001"
    marker = agent.read_file(GUEST_MARKER_PATH).decode()
    assert marker == spec.identity_text
    assert DesktopIdentity.from_guest_text(marker) == identity
    assert agent.read_file("/etc/machine-id") == f"{identity.machine_id}\n".encode()
    assert agent.read_file("/etc/hostname") == b"lab-001\n"
    assert agent.interfaces() == {"lo": "00:00:00:00:00:00", "eth0": identity.mac}


def test_exec_capture_runs_cat(fake: FakeDriver) -> None:
    identity = make_identity()
    _, agent = booted(fake, identity)
    code, out, err = agent.exec_capture(["cat", "/etc/hostname"], timeout_s=5, poll_s=0.001)
    assert (code, out, err) == (0, "lab-001\n", "")
    code, out, err = agent.exec_capture(["/bin/cat", "/nope"], timeout_s=5, poll_s=0.001)
    assert code == 1 and "No such file" in err and out == ""
    with pytest.raises(DriverError, match="Failed to execute"):
        agent.exec_capture(["no-such-program"])


def test_agent_errors_are_driver_errors(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    with pytest.raises(DriverError, match="has not been found") as exc:
        fake.agent_command(spec.vm_id, "guest-frobnicate")
    assert not isinstance(exc.value, AgentUnavailable)
    with pytest.raises(DriverError, match="No such file"):
        agent.read_file("/etc/shadow-not-there")
    with pytest.raises(DriverError, match="missing"):
        fake.agent_command(spec.vm_id, "guest-file-open", {})


def test_file_read_sets_eof_like_feof(fake: FakeDriver) -> None:
    spec, _ = booted(fake)
    size = len(b"lab-001\n")
    handle = fake.agent_command(spec.vm_id, "guest-file-open", {"path": "/etc/hostname"})
    first = fake.agent_command(spec.vm_id, "guest-file-read", {"handle": handle, "count": size})
    second = fake.agent_command(spec.vm_id, "guest-file-read", {"handle": handle, "count": size})
    assert (first["count"], first["eof"]) == (size, False)
    assert (second["count"], second["eof"]) == (0, True)
    fake.agent_command(spec.vm_id, "guest-file-close", {"handle": handle})
    with pytest.raises(DriverError, match="not been found"):
        fake.agent_command(spec.vm_id, "guest-file-close", {"handle": handle})


def test_read_file_closes_the_handle_when_a_read_fails(fake: FakeDriver) -> None:
    _, agent = booted(fake)
    calls: list[str] = []
    real = fake.agent_command

    def flaky(vm_id: uuid.UUID, command: str, arguments: Any = None, timeout_s: int = 5) -> Any:
        calls.append(command)
        if command == "guest-file-read":
            raise DriverError("read failed")
        return real(vm_id, command, arguments, timeout_s)

    fake.agent_command = flaky  # type: ignore[method-assign]
    with pytest.raises(DriverError, match="read failed"):
        agent.read_file("/etc/hostname")
    assert calls == ["guest-file-open", "guest-file-read", "guest-file-close"]


def test_set_time_is_accepted(fake: FakeDriver) -> None:
    _, agent = booted(fake)
    agent.set_time()
    agent.set_time(1_700_000_000_000_000_000)


def test_bad_identity_text_boots_with_image_defaults_and_no_marker(fake: FakeDriver) -> None:
    spec = make_spec(identity_text="not an identity")
    fake.create_vm(spec)
    fake.start_vm(spec.vm_id)
    agent = GuestAgent(fake, spec.vm_id)
    assert agent.host_name() == "localhost"
    with pytest.raises(DriverError):
        agent.read_file(GUEST_MARKER_PATH)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_agent_answers_after_the_boot_delay(base_image: Path) -> None:
    fake = FakeDriver(agent_delay_polls=3)
    fake.import_volume("base.qcow2", base_image)
    spec, agent = booted(fake)
    clock = FakeClock()
    waited = agent.wait_until_ready(10, poll_s=0.5, clock=clock, sleep=clock.sleep)
    assert waited == pytest.approx(1.5)  # three silent pings, half a second apart
    fake.stop_vm(spec.vm_id, force=True)
    fake.start_vm(spec.vm_id)  # a new boot: silent again
    assert not agent.ping()


def test_wait_until_ready_gives_up_naming_the_vm(fake: FakeDriver) -> None:
    spec = make_spec()  # no OS: the agent never comes
    fake.create_vm(spec)
    fake.start_vm(spec.vm_id)
    clock = FakeClock()
    agent = GuestAgent(fake, spec.vm_id, clock=clock, sleep=clock.sleep)
    with pytest.raises(AgentUnavailable, match=rf"{spec.vm_id}.*within 2 s"):
        agent.wait_until_ready(2, poll_s=0.5)
    assert clock.now == pytest.approx(102.0)


def test_guest_agent_of_an_off_vm_is_unavailable(fake: FakeDriver) -> None:
    spec = make_spec(make_identity())
    fake.create_vm(spec)
    with pytest.raises(AgentUnavailable):
        GuestAgent(fake, spec.vm_id).host_name()


# --- saved guest state: snapshots, managed save, instant clones -------------------------------


def _sh(agent: GuestAgent, script: str) -> tuple[int, str, str]:
    return agent.exec_capture(["sh", "-c", script], timeout_s=5, poll_s=0.001)


def _exists(agent: GuestAgent, path: str) -> bool:
    return agent.exec_capture(["cat", path], timeout_s=5, poll_s=0.001)[0] == 0


def test_the_guest_writes_files_with_sh_echo_only(fake: FakeDriver) -> None:
    _, agent = booted(fake)
    assert _sh(agent, "echo hello world > /root/note")[0] == 0
    assert _sh(agent, "echo again >> /root/note")[0] == 0
    assert agent.read_file("/root/note") == b"hello world\nagain\n"
    code, _, err = _sh(agent, "rm -rf /")
    assert code == 127 and "cannot run" in err


def test_revert_brings_back_files_power_and_memory_without_a_boot(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    _sh(agent, "echo before > /run/tmpfs-before")
    fake.create_snapshot(spec.vm_id, "factory")
    _sh(agent, "echo x > /root/after")
    fake.stop_vm(spec.vm_id, force=True)
    fake.revert_to_snapshot(spec.vm_id, "factory")
    assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING
    assert agent.ping()  # at once: the agent was running in the snapshot's memory
    assert not _exists(agent, "/root/after")
    assert _exists(agent, "/run/tmpfs-before")  # memory came back, not a fresh boot
    assert fake.guest_clock_stale(spec.vm_id)
    agent.set_time()
    assert not fake.guest_clock_stale(spec.vm_id)


def test_snapshot_of_a_vm_that_is_off_reverts_its_disk_only(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    fake.stop_vm(spec.vm_id, force=True)
    fake.create_snapshot(spec.vm_id, "cold")
    fake.start_vm(spec.vm_id)
    _sh(agent, "echo x > /root/after")
    fake.revert_to_snapshot(spec.vm_id, "cold")
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF
    fake.start_vm(spec.vm_id)
    assert not _exists(agent, "/root/after")
    assert not fake.guest_clock_stale(spec.vm_id)  # a boot reads the clock


def test_suspend_keeps_the_tmpfs_and_a_reboot_empties_it(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    _sh(agent, "echo kept > /run/in-memory")
    fake.suspend_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SAVED
    assert not agent.ping()
    fake.start_vm(spec.vm_id)
    assert agent.read_file("/run/in-memory") == b"kept\n"
    assert fake.guest_clock_stale(spec.vm_id)
    fake.stop_vm(spec.vm_id, force=True)
    fake.start_vm(spec.vm_id)
    assert not _exists(agent, "/run/in-memory")


def test_a_paused_vm_suspends_and_start_resumes_it_running(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    fake.set_power_state(spec.vm_id, PowerState.PAUSED)
    fake.suspend_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SAVED
    fake.start_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING
    assert agent.ping()


def test_a_pm_suspended_guest_cannot_be_saved(fake: FakeDriver) -> None:
    spec, _ = booted(fake)
    fake.set_power_state(spec.vm_id, PowerState.SUSPENDED)
    with pytest.raises(DriverError, match="pmsuspended"):
        fake.suspend_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SUSPENDED


def _captured(fake: FakeDriver) -> tuple[VmSpec, GuestAgent, str, str]:
    template, agent = booted(fake)
    _sh(agent, "echo warm > /run/template-was-here")
    disk, memory = fake.capture_memory_state(template.vm_id)
    return template, agent, disk, memory


def _instant(disk: str, memory: str, **changes: Any) -> VmSpec:
    return make_spec(clone_mode=CloneMode.INSTANT, base_volume=disk,
                     memory_state_volume=memory, **changes)


def test_instant_clones_run_the_template_guest_with_their_own_mac(fake: FakeDriver) -> None:
    template, _, disk, memory = _captured(fake)
    clones = [_instant(disk, memory) for _ in range(2)]
    for spec in clones:
        assert fake.create_vm(spec).power_state is PowerState.RUNNING
    agents = [GuestAgent(fake, spec.vm_id) for spec in clones]
    for spec, agent in zip(clones, agents, strict=True):
        assert agent.ping()
        assert agent.interfaces()["eth0"] == spec.mac  # the swapped NIC
        assert agent.read_file("/run/template-was-here") == b"warm\n"  # its memory
        # The identity is still the template's: changing it is the caller's work.
        assert agent.read_file(GUEST_MARKER_PATH).decode() == template.identity_text
        assert fake.guest_clock_stale(spec.vm_id)  # the caller sets it, with the identity
        defined = fake.defined_spec(spec.vm_id)
        assert defined is not None
        assert (defined.name, defined.mac, defined.metadata) == (
            spec.name, spec.mac, spec.metadata)
        assert defined.identity_text == template.identity_text  # the fw_cfg it was saved with
    assert clones[0].mac != clones[1].mac
    _sh(agents[0], "echo mine > /root/only-in-clone-0")
    assert not _exists(agents[1], "/root/only-in-clone-0")  # disks are separate overlays
    fake.delete_vm(clones[0].vm_id)
    assert_nothing_left(fake, clones[0])
    assert agents[1].ping()
    assert {disk, memory} <= set(fake.list_volumes())


def test_instant_clone_of_a_template_without_an_os_runs_without_an_agent(
    fake: FakeDriver,
) -> None:
    template = make_spec()
    fake.create_vm(template)
    fake.start_vm(template.vm_id)
    disk, memory = fake.capture_memory_state(template.vm_id)
    spec = _instant(disk, memory)
    fake.create_vm(spec)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING
    assert not GuestAgent(fake, spec.vm_id).ping()


@pytest.mark.parametrize(
    "point", ["create_vm", "create_vm.root_volume", "create_vm.memory_volume",
              "create_vm.restore", "create_vm.nic_swap"],
)
def test_instant_clone_failing_at_any_step_leaves_nothing(fake: FakeDriver, point: str) -> None:
    _, _, disk, memory = _captured(fake)
    spec = _instant(disk, memory)
    before = fake.list_volumes()
    fake.fail_next(point)
    with pytest.raises(DriverError, match=point):
        fake.create_vm(spec)
    assert_nothing_left(fake, spec)
    assert fake.list_volumes() == before
    fake.create_vm(spec)  # and a retry then works
    assert GuestAgent(fake, spec.vm_id).ping()


def test_instant_clone_refuses_a_seed_and_a_deleted_memory_state(
    fake: FakeDriver, tmp_path: Path
) -> None:
    _, _, disk, memory = _captured(fake)
    seed = tmp_path / "seed.img"
    seed.write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidInput, match="seed"):
        fake.create_vm(_instant(disk, memory, seed_image=seed))
    fake.delete_volume(memory)
    spec = _instant(disk, memory)
    with pytest.raises(NotFound, match=memory):
        fake.create_vm(spec)
    assert_nothing_left(fake, spec)


def test_an_instant_clone_booted_cold_takes_the_identity_given_for_it(
    fake: FakeDriver,
) -> None:
    template, _, disk, memory = _captured(fake)
    identity = make_identity()
    given = _instant(disk, memory, vm_id=identity.desktop_id,
                     identity_text=identity.to_guest_text())
    without = _instant(disk, memory)
    for spec in (given, without):
        fake.create_vm(spec)
        fake.stop_vm(spec.vm_id, force=True)
        fake.start_vm(spec.vm_id)  # a cold boot: the guest hook reads fw_cfg again
    agent = GuestAgent(fake, given.vm_id)
    assert agent.read_file(GUEST_MARKER_PATH).decode() == identity.to_guest_text()
    assert agent.interfaces()["eth0"] == given.mac
    assert not _exists(agent, "/run/template-was-here")  # a boot: the tmpfs is empty
    other = GuestAgent(fake, without.vm_id)  # nothing given: the fw_cfg it was saved with
    assert other.read_file(GUEST_MARKER_PATH).decode() == template.identity_text


def test_the_guest_agent_writes_files(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    agent.write_file("/run/note", b"one")
    agent.write_file("/run/note", b"two")  # "w" truncates
    assert agent.read_file("/run/note") == b"two"
    handle = fake.agent_command(spec.vm_id, "guest-file-open", {"path": "/run/note", "mode": "a"})
    fake.agent_command(spec.vm_id, "guest-file-write", {"handle": handle, "buf-b64": "IQ=="})
    fake.agent_command(spec.vm_id, "guest-file-close", {"handle": handle})
    assert agent.read_file("/run/note") == b"two!"
    handle = fake.agent_command(spec.vm_id, "guest-file-open", {"path": "/run/note"})
    with pytest.raises(DriverError, match="Bad file descriptor"):
        fake.agent_command(spec.vm_id, "guest-file-write", {"handle": handle, "buf-b64": "IQ=="})
    with pytest.raises(DriverError, match="open mode"):
        fake.agent_command(spec.vm_id, "guest-file-open", {"path": "/x", "mode": "rw"})


class _SlowCommandAgent:
    """A driver whose guest runs one command that exits after ``polls`` status questions."""

    def __init__(self, polls: int) -> None:
        self.polls = polls
        self.asked = 0

    def agent_command(self, vm_id: object, command: str, arguments: object,
                      timeout_s: int) -> object:
        if command == "guest-exec":
            return {"pid": 7}
        self.asked += 1
        if self.asked < self.polls:
            return {"exited": False}
        return {"exited": True, "exitcode": 0, "out-data": "", "err-data": ""}


def test_a_long_command_is_asked_about_less_and_less_often() -> None:
    # A session starting on one vCPU should not share it with twenty agent questions a second.
    driver = _SlowCommandAgent(polls=40)
    clock = FakeClock()
    agent = GuestAgent(cast(HypervisorDriver, driver), uuid.uuid4(), clock=clock,
                       sleep=clock.sleep)
    sleeps: list[float] = []
    agent._sleep = lambda s: (sleeps.append(s), clock.sleep(s))[1]  # type: ignore[method-assign]
    assert agent.exec_capture(["true"], timeout_s=60)[0] == 0
    assert sleeps[0] == pytest.approx(0.05)
    assert sleeps == sorted(sleeps) and max(sleeps) == pytest.approx(0.5)
    assert sleeps.count(pytest.approx(0.5)) > len(sleeps) // 2

"""What only the fake has, on the host side: fault injection, storage checks, hypervisor changes
behind our back, graceful stops. The fake guest is in test_fake_guest.py; the shared contract is
in tests/contract/."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from deskpool.domain.errors import (
    Conflict,
    DriverError,
    HypervisorUnreachable,
    InvalidInput,
    VmNotFound,
)
from deskpool.domain.models import CloneMode, DomainType, PowerState
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name, seed_volume_name
from deskpool.drivers.fake import FakeDriver
from tests.unit.fake_driver_helpers import (
    assert_nothing_left,
    base_image_fixture,  # noqa: F401
    booted,
    fake_fixture,  # noqa: F401
    make_identity,
    make_spec,
)

MiB = 1024 * 1024


# --- fault injection --------------------------------------------------------------------


def test_fail_next_fails_exactly_the_next_call(fake: FakeDriver) -> None:
    spec = make_spec()
    fake.create_vm(spec)
    fake.fail_next("start_vm")
    with pytest.raises(DriverError, match="injected failure in start_vm"):
        fake.start_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF
    fake.start_vm(spec.vm_id)  # the fault was used up
    assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING


def test_fail_next_raises_the_given_error_and_queues(fake: FakeDriver, base_image: Path) -> None:
    fake.fail_next("import_volume", HypervisorUnreachable("host down"))
    fake.fail_next("import_volume")
    with pytest.raises(HypervisorUnreachable, match="host down"):
        fake.import_volume("x.qcow2", base_image)
    with pytest.raises(DriverError):
        fake.import_volume("x.qcow2", base_image)
    assert fake.import_volume("x.qcow2", base_image).name == "x.qcow2"


def test_fail_next_refuses_unknown_points() -> None:
    with pytest.raises(InvalidInput, match=r"create_vm\.define"):
        FakeDriver().fail_next("create_vm.defin")


@pytest.mark.parametrize(
    "point", ["create_vm", "create_vm.root_volume", "create_vm.seed_volume", "create_vm.define"]
)
def test_create_failing_at_any_step_leaves_nothing(
    fake: FakeDriver, tmp_path: Path, point: str
) -> None:
    seed = tmp_path / "seed.img"
    seed.write_bytes(b"\0" * 4096)
    spec = make_spec(seed_image=seed)
    before = fake.list_volumes()
    fake.fail_next(point)
    with pytest.raises(DriverError, match=point):
        fake.create_vm(spec)
    assert_nothing_left(fake, spec)
    assert fake.list_volumes() == before
    fake.create_vm(spec)  # and a retry then works
    assert seed_volume_name(spec.vm_id) in fake.list_volumes()


@pytest.mark.parametrize(
    "changes", [{"name": "a/b"}, {"mac": "52:54:00:zz:00:01"}, {"vcpus": 0}],
    ids=["slash-in-name", "bad-mac", "no-vcpu"],
)
def test_definitions_libvirt_rejects_fail_after_the_volumes_and_roll_back(
    fake: FakeDriver, changes: dict[str, Any]
) -> None:
    spec = make_spec(**changes)
    with pytest.raises(DriverError, match="XML error"):
        fake.create_vm(spec)
    assert_nothing_left(fake, spec)


def test_qcow2_reports_its_virtual_size_and_raw_its_file_size(
    fake: FakeDriver, tmp_path: Path
) -> None:
    assert fake.volume_info("base.qcow2").capacity_bytes == 64 * MiB
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\1" * 12345)
    info = fake.import_volume("raw.img", raw)
    assert (info.capacity_bytes, info.allocation_bytes) == (12345, 12345)


def test_free_storage_shrinks_as_volumes_are_added(fake: FakeDriver) -> None:
    free0 = fake.capacity().storage_free_bytes
    fake.create_vm(make_spec(clone_mode=CloneMode.LINKED))
    free1 = fake.capacity().storage_free_bytes
    fake.create_vm(make_spec(clone_mode=CloneMode.FULL))
    free2 = fake.capacity().storage_free_bytes
    assert free0 > free1 > free2
    base = fake.volume_info("base.qcow2")
    assert free1 - free2 == base.allocation_bytes  # a full clone copies the base's data


def test_a_full_host_refuses_volumes(base_image: Path) -> None:
    fake = FakeDriver(storage_bytes=base_image.stat().st_size + 1000)
    fake.import_volume("base.qcow2", base_image)
    spec = make_spec(clone_mode=CloneMode.FULL)
    with pytest.raises(DriverError, match="no space"):
        fake.create_vm(spec)
    assert_nothing_left(fake, spec)


def test_start_fails_when_the_backing_volume_was_deleted(fake: FakeDriver) -> None:
    spec = make_spec()
    fake.create_vm(spec)
    fake.delete_volume("base.qcow2")  # allowed, as in a libvirt dir pool
    with pytest.raises(DriverError, match="backing"):
        fake.start_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF


def test_domain_types_follow_what_the_host_offers() -> None:
    qemu_only, with_kvm = FakeDriver(), FakeDriver(domain_types=("qemu", "kvm"))
    with pytest.raises(InvalidInput, match="kvm"):
        qemu_only.resolve_domain_type(DomainType.KVM, None)
    assert qemu_only.resolve_domain_type(DomainType.AUTO, Path("/k")) is DomainType.QEMU
    assert with_kvm.resolve_domain_type(DomainType.AUTO, Path("/k")) is DomainType.KVM


def test_create_refuses_a_domain_type_the_host_lacks(fake: FakeDriver) -> None:
    spec = make_spec(domain_type=DomainType.KVM)
    with pytest.raises(InvalidInput):
        fake.create_vm(spec)
    assert_nothing_left(fake, spec)


# --- the host changing behind deskpool's back ---------------------------------------------


def test_a_crash_is_reported_and_silences_the_agent(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    fake.set_power_state(spec.vm_id, PowerState.CRASHED)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.CRASHED
    assert not agent.ping()
    with pytest.raises(DriverError):
        fake.console_address(spec.vm_id)
    fake.start_vm(spec.vm_id)
    assert agent.ping()


def test_started_behind_our_back_boots_the_guest(fake: FakeDriver) -> None:
    spec = make_spec(make_identity())
    fake.create_vm(spec)
    fake.set_power_state(spec.vm_id, PowerState.RUNNING)
    assert GuestAgent(fake, spec.vm_id).host_name() == "lab-001"


def test_a_paused_vm_is_silent_and_start_resumes_it(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    fake.set_power_state(spec.vm_id, PowerState.PAUSED)
    assert not agent.ping()
    assert fake.console_address(spec.vm_id).port >= 5900  # QEMU still runs
    fake.start_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING
    assert agent.ping()


def test_removed_behind_our_back_keeps_volumes_until_delete_vm(fake: FakeDriver) -> None:
    spec = make_spec()
    fake.create_vm(spec)
    fake.remove_vm_behind_our_back(spec.vm_id)
    with pytest.raises(VmNotFound):
        fake.get_vm(spec.vm_id)
    assert root_volume_name(spec.vm_id) in fake.list_volumes()
    fake.delete_vm(spec.vm_id)
    assert_nothing_left(fake, spec)


def test_foreign_vms_have_no_metadata_and_names_stay_unique(fake: FakeDriver) -> None:
    vm_id = fake.add_foreign_vm("someone-elses", power_state=PowerState.RUNNING)
    record = fake.get_vm(vm_id)
    assert (record.metadata, record.power_state) == (None, PowerState.RUNNING)
    with pytest.raises(Conflict):
        fake.create_vm(make_spec(name="someone-elses"))


def test_unreachable_and_closed_hosts_refuse_calls() -> None:
    with pytest.raises(HypervisorUnreachable):
        FakeDriver("qemu:///system")
    fake = FakeDriver()
    fake.set_reachable(False)
    with pytest.raises(HypervisorUnreachable):
        fake.list_vms()
    fake.set_reachable(True)
    fake.close()
    with pytest.raises(DriverError, match="closed"):
        fake.list_vms()


def test_concurrent_creates_of_one_name_let_exactly_one_win(fake: FakeDriver) -> None:
    results: list[str] = []

    def create() -> None:
        try:
            fake.create_vm(make_spec(name="contested"))
            results.append("won")
        except Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 7 + ["won"]
    assert len(fake.list_volumes()) == 2  # the base and the winner's root


# --- power: graceful stops --------------------------------------------------------------


def test_graceful_stop_of_a_booted_guest_completes_later(fake: FakeDriver) -> None:
    spec, agent = booted(fake)
    fake.stop_vm(spec.vm_id)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING  # still going down
    assert not agent.ping()
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF


def test_a_vm_without_an_os_ignores_a_graceful_stop(fake: FakeDriver) -> None:
    spec = make_spec()  # no identity: nothing boots, as with an empty disk
    fake.create_vm(spec)
    fake.start_vm(spec.vm_id)
    fake.stop_vm(spec.vm_id)
    for _ in range(3):
        assert fake.get_vm(spec.vm_id).power_state is PowerState.RUNNING
    assert not GuestAgent(fake, spec.vm_id).ping()
    fake.stop_vm(spec.vm_id, force=True)
    assert fake.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF

"""The driver contract for saved guest state (snapshots, managed save, instant clones), run
against every driver like ``test_driver_contract.py``."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from deskpool.domain.errors import (
    AgentUnavailable,
    Conflict,
    DriverError,
    InvalidInput,
    NotFound,
    VmNotFound,
)
from deskpool.domain.models import CloneMode, PowerState, VmSpec
from deskpool.drivers.base import (
    HypervisorDriver,
    memory_state_volume_name,
    root_volume_name,
)

from .conftest import ContractEnv, assert_nothing_left, power_of, write_file


class TestSnapshotContract:
    """Internal snapshots: the factory state a recycled desktop reverts to. Without a guest OS
    here, "the guest's files are gone after a revert" is checked by the fake's unit tests and
    tests/realvm/test_instant_clone_driver.py; this checks names, power states and errors."""

    def test_snapshot_of_running_vm_reverts_to_running(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.create_snapshot(spec.vm_id, "factory")
        assert env.driver.list_snapshots(spec.vm_id) == ["factory"]
        env.driver.stop_vm(spec.vm_id, force=True)
        env.driver.revert_to_snapshot(spec.vm_id, "factory")
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING
        env.driver.revert_to_snapshot(spec.vm_id, "factory")  # from running, again
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING

    def test_snapshot_of_vm_that_is_off_reverts_to_off(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.create_snapshot(spec.vm_id, "cold")
        env.driver.start_vm(spec.vm_id)
        env.driver.revert_to_snapshot(spec.vm_id, "cold")
        assert power_of(env.driver, spec.vm_id) is PowerState.SHUTOFF

    def test_list_is_sorted_and_a_taken_name_is_conflict(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.create_snapshot(spec.vm_id, "b-second")
        env.driver.create_snapshot(spec.vm_id, "a-first")
        with pytest.raises(Conflict):
            env.driver.create_snapshot(spec.vm_id, "a-first")
        assert env.driver.list_snapshots(spec.vm_id) == ["a-first", "b-second"]

    def test_revert_to_missing_snapshot_is_not_found_naming_it(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        with pytest.raises(NotFound, match="no-such-snap"):
            env.driver.revert_to_snapshot(spec.vm_id, "no-such-snap")
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING

    def test_delete_snapshot_is_idempotent(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.create_snapshot(spec.vm_id, "factory")
        env.driver.delete_snapshot(spec.vm_id, "factory")
        assert env.driver.list_snapshots(spec.vm_id) == []
        env.driver.delete_snapshot(spec.vm_id, "factory")
        with pytest.raises(NotFound):
            env.driver.revert_to_snapshot(spec.vm_id, "factory")

    @pytest.mark.parametrize("name", ["", "a/b", "../up", "-dash", "x" * 65, "<x>"])
    def test_bad_snapshot_name_is_invalid_input(self, env: ContractEnv, name: str) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        with pytest.raises(InvalidInput):
            env.driver.create_snapshot(spec.vm_id, name)
        assert env.driver.list_snapshots(spec.vm_id) == []

    def test_snapshots_of_unknown_vm_are_vm_not_found(self, driver: HypervisorDriver) -> None:
        unknown = uuid.uuid4()
        acts: list[Callable[[], object]] = [
            lambda: driver.create_snapshot(unknown, "s"),
            lambda: driver.revert_to_snapshot(unknown, "s"),
            lambda: driver.list_snapshots(unknown),
            lambda: driver.delete_snapshot(unknown, "s"),
        ]
        for act in acts:
            with pytest.raises(VmNotFound):
                act()

    def test_foreign_vm_snapshots_are_refused(self, env: ContractEnv) -> None:
        name = env.add_foreign_vm()
        foreign = next(vm for vm in env.driver.list_vms() if vm.name == name)
        acts: list[Callable[[], object]] = [
            lambda: env.driver.create_snapshot(foreign.vm_id, "s"),
            lambda: env.driver.revert_to_snapshot(foreign.vm_id, "s"),
            lambda: env.driver.delete_snapshot(foreign.vm_id, "s"),
        ]
        for act in acts:
            with pytest.raises(Conflict, match="not created by deskpool"):
                act()
        assert env.driver.list_snapshots(foreign.vm_id) == []

    def test_delete_vm_with_snapshots_leaves_nothing(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.create_snapshot(spec.vm_id, "cold")
        env.driver.start_vm(spec.vm_id)
        env.driver.create_snapshot(spec.vm_id, "warm")
        env.driver.delete_vm(spec.vm_id)
        assert_nothing_left(env.driver, spec)


class TestManagedSaveContract:
    """``suspend_vm``: the "suspend" power policy; ``SAVED`` until ``start_vm``."""

    def test_suspend_saves_and_start_resumes(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.suspend_vm(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.SAVED
        listed = {vm.vm_id: vm for vm in env.driver.list_vms()}
        assert listed[spec.vm_id].power_state is PowerState.SAVED
        with pytest.raises(AgentUnavailable):  # no process, so no agent
            env.driver.agent_command(spec.vm_id, "guest-ping")
        with pytest.raises(DriverError):
            env.driver.console_address(spec.vm_id)
        env.driver.start_vm(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING

    def test_suspend_of_vm_that_is_off_or_saved_does_nothing(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.suspend_vm(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.SHUTOFF
        env.driver.start_vm(spec.vm_id)
        env.driver.suspend_vm(spec.vm_id)
        env.driver.suspend_vm(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.SAVED

    def test_stop_of_saved_vm_keeps_it_saved(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.suspend_vm(spec.vm_id)
        env.driver.stop_vm(spec.vm_id, force=True)
        env.driver.stop_vm(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.SAVED

    def test_snapshot_of_saved_vm_is_conflict(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.suspend_vm(spec.vm_id)
        with pytest.raises(Conflict):
            env.driver.create_snapshot(spec.vm_id, "factory")
        assert env.driver.list_snapshots(spec.vm_id) == []

    def test_revert_discards_the_saved_state(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.create_snapshot(spec.vm_id, "factory")
        env.driver.suspend_vm(spec.vm_id)
        env.driver.revert_to_snapshot(spec.vm_id, "factory")
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING
        # Off now, it is plainly off: no stale save image waits to be restored over the disk.
        env.driver.stop_vm(spec.vm_id, force=True)
        assert power_of(env.driver, spec.vm_id) is PowerState.SHUTOFF

    def test_delete_of_saved_vm_leaves_nothing(self, env: ContractEnv) -> None:
        spec = env.running_vm()
        env.driver.suspend_vm(spec.vm_id)
        env.driver.delete_vm(spec.vm_id)
        assert_nothing_left(env.driver, spec)

    def test_suspend_of_unknown_or_foreign_vm_is_refused(self, env: ContractEnv) -> None:
        with pytest.raises(VmNotFound):
            env.driver.suspend_vm(uuid.uuid4())
        name = env.add_foreign_vm()
        foreign = next(vm for vm in env.driver.list_vms() if vm.name == name)
        with pytest.raises(Conflict, match="not created by deskpool"):
            env.driver.suspend_vm(foreign.vm_id)


def _capture(env: ContractEnv) -> tuple[VmSpec, str, str]:
    """A running template captured (not on test:///, which cannot)."""
    template = env.running_vm()
    disk, memory = env.driver.capture_memory_state(template.vm_id)
    return template, disk, memory


class TestInstantCloneContract:
    """``capture_memory_state`` and ``CloneMode.INSTANT``. The VMs run no OS here, so the NIC
    swap and clock are checked in tests/realvm/test_instant_clone_driver.py."""

    def test_capture_keeps_disk_and_memory_and_removes_the_vm(self, env: ContractEnv) -> None:
        if env.kind == "libvirt-test":
            template = env.running_vm()
            with pytest.raises(DriverError, match="not supported by this hypervisor"):
                env.driver.capture_memory_state(template.vm_id)
            assert power_of(env.driver, template.vm_id) is PowerState.RUNNING
            assert memory_state_volume_name(template.vm_id) not in env.driver.list_volumes()
            return
        base = env.driver.volume_info(env.base_volume())
        template, disk, memory = _capture(env)
        assert (disk, memory) == (root_volume_name(template.vm_id),
                                  memory_state_volume_name(template.vm_id))
        with pytest.raises(VmNotFound):
            env.driver.get_vm(template.vm_id)
        assert template.vm_id not in {vm.vm_id for vm in env.driver.list_vms()}
        assert env.driver.volume_info(disk).backing_volume_path == base.path  # base <- disk
        assert env.driver.volume_info(memory).allocation_bytes > 0

    def test_capture_needs_a_running_vm_of_deskpool(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        with pytest.raises(Conflict):
            env.driver.capture_memory_state(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.SHUTOFF
        with pytest.raises(VmNotFound):
            env.driver.capture_memory_state(uuid.uuid4())
        name = env.add_foreign_vm()
        foreign = next(vm for vm in env.driver.list_vms() if vm.name == name)
        with pytest.raises(Conflict, match="not created by deskpool"):
            env.driver.capture_memory_state(foreign.vm_id)
        assert memory_state_volume_name(spec.vm_id) not in env.driver.list_volumes()

    def test_capture_of_vm_with_a_seed_is_conflict(self, env: ContractEnv) -> None:
        seed = write_file(env.tmp / "seed.img", b"\0" * 64 * 1024)
        spec = env.running_vm(seed_image=seed)
        with pytest.raises(Conflict, match="seed"):
            env.driver.capture_memory_state(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING

    def test_instant_clone_runs_on_the_captured_disk(self, env: ContractEnv) -> None:
        if env.kind == "libvirt-test":
            base = env.base_volume()  # any volume: the driver refuses before using them
            spec = env.instant_spec(base, base)
            with pytest.raises(DriverError, match="not supported by this hypervisor"):
                env.driver.create_vm(spec)
            assert_nothing_left(env.driver, spec)
            return
        _template, disk, memory = _capture(env)
        disk_info = env.driver.volume_info(disk)
        spec = env.instant_spec(disk, memory)
        record = env.driver.create_vm(spec)
        assert (record.vm_id, record.name, record.metadata) == (
            spec.vm_id, spec.name, spec.metadata)
        assert record.power_state is PowerState.RUNNING  # unlike other clone modes
        assert env.driver.get_vm(spec.vm_id).metadata == spec.metadata
        root = env.driver.volume_info(root_volume_name(spec.vm_id))
        assert root.backing_volume_path == disk_info.path  # base <- captured disk <- clone
        assert memory_state_volume_name(spec.vm_id) in env.driver.list_volumes()
        # A persistent VM like any other: it stops, boots cold, snapshots and goes.
        env.driver.create_snapshot(spec.vm_id, "factory")
        env.driver.stop_vm(spec.vm_id, force=True)
        assert power_of(env.driver, spec.vm_id) is PowerState.SHUTOFF
        env.driver.start_vm(spec.vm_id)
        assert power_of(env.driver, spec.vm_id) is PowerState.RUNNING
        env.driver.delete_vm(spec.vm_id)
        assert_nothing_left(env.driver, spec)
        assert {disk, memory} <= set(env.driver.list_volumes())  # the template's stay
        assert env.driver.volume_info(disk) == disk_info

    def test_instant_clone_without_memory_state_is_invalid_input(self, env: ContractEnv) -> None:
        base = env.base_volume()
        spec = env.spec(clone_mode=CloneMode.INSTANT, base_volume=base)
        with pytest.raises(InvalidInput, match="memory"):
            env.driver.create_vm(spec)
        assert_nothing_left(env.driver, spec)

    def test_instant_clone_of_a_volume_that_is_no_memory_state_leaves_nothing(
        self, env: ContractEnv
    ) -> None:
        base = env.base_volume()
        spec = env.instant_spec(base, base)
        with pytest.raises(DriverError):
            env.driver.create_vm(spec)
        assert_nothing_left(env.driver, spec)

    def test_instant_clone_failing_after_the_restore_leaves_nothing(
        self, env: ContractEnv
    ) -> None:
        if env.kind == "libvirt-test":  # it cannot capture; it refuses before the restore
            disk = memory = env.base_volume()
        else:
            _template, disk, memory = _capture(env)
        # The restored VM runs when its new NIC is refused: the rollback must stop it too.
        spec = env.instant_spec(disk, memory, mac="52:54:00:zz:00:01")
        with pytest.raises(DriverError):
            env.driver.create_vm(spec)
        assert_nothing_left(env.driver, spec)
        assert {disk, memory} <= set(env.driver.list_volumes())

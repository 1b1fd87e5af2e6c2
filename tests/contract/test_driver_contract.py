"""The driver contract of ``deskpool/drivers/base.py``, run against every driver.

The ``driver`` fixture (see conftest) gives the fake, libvirt on ``test:///default`` and libvirt
on ``qemu:///system``. VMs here never boot an OS: an empty disk is enough to run, so the real
QEMU tier stays fast. Guest-agent answers are tested elsewhere; here only "off means silent".
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deskpool.domain.errors import (
    AgentUnavailable,
    Conflict,
    DriverError,
    InvalidInput,
    NotFound,
    VmNotFound,
)
from deskpool.domain.models import (
    CloneMode,
    ConsoleProtocol,
    DomainType,
    PowerState,
    StopReason,
)
from deskpool.drivers.base import (
    HypervisorDriver,
    root_volume_name,
    seed_volume_name,
)
from deskpool.drivers.fake import FakeDriver
from tests.conftest import kill_qemu_of

from .conftest import ContractEnv, assert_nothing_left, make_base_qcow2, write_file


class TestDriverContract:
    # --- host ---------------------------------------------------------------------------

    def test_capacity_reports_resources_and_domain_types(self, driver: HypervisorDriver) -> None:
        cap = driver.capacity()
        assert cap.hypervisor
        assert cap.vcpus > 0
        assert cap.memory_mib > 0
        assert cap.storage_free_bytes > 0
        assert cap.domain_types and all(isinstance(t, str) and t for t in cap.domain_types)

    # --- volumes ------------------------------------------------------------------------

    def test_imported_volume_is_described_and_listed(self, env: ContractEnv) -> None:
        info = env.driver.import_volume("imported.qcow2", env.base_image)
        assert info.name == "imported.qcow2"
        assert info.path and info.capacity_bytes > 0
        assert info.backing_volume_path is None
        again = env.driver.volume_info("imported.qcow2")
        assert (again.name, again.path, again.capacity_bytes) == (
            info.name, info.path, info.capacity_bytes)
        assert "imported.qcow2" in env.driver.list_volumes()

    def test_import_of_missing_file_is_not_found_and_creates_nothing(
        self, env: ContractEnv
    ) -> None:
        before = env.driver.list_volumes()
        with pytest.raises(NotFound):
            env.driver.import_volume("ghost.qcow2", env.tmp / "does-not-exist.qcow2")
        assert env.driver.list_volumes() == before
        with pytest.raises(NotFound):
            env.driver.volume_info("ghost.qcow2")

    def test_import_with_wrong_sha256_fails_and_leaves_no_volume(self, env: ContractEnv) -> None:
        with pytest.raises(DriverError):
            env.driver.import_volume("bad-sum.qcow2", env.base_image, sha256="0" * 64)
        assert "bad-sum.qcow2" not in env.driver.list_volumes()

    def test_import_with_matching_sha256_succeeds(self, env: ContractEnv) -> None:
        digest = hashlib.sha256(env.base_image.read_bytes()).hexdigest()
        info = env.driver.import_volume("good-sum.qcow2", env.base_image, sha256=digest)
        assert info.name in env.driver.list_volumes()

    def test_import_of_existing_name_returns_it_unchanged(self, env: ContractEnv) -> None:
        first = env.driver.import_volume("immutable.img", env.base_image)
        # Another file of the same size: not looked into again (template images are immutable).
        other = write_file(env.tmp / "other.img", b"x" * env.base_image.stat().st_size)
        second = env.driver.import_volume("immutable.img", other)
        assert (second.path, second.capacity_bytes) == (first.path, first.capacity_bytes)
        assert env.driver.volume_info("immutable.img").capacity_bytes == first.capacity_bytes

    def test_an_import_cut_short_is_made_again(self, env: ContractEnv) -> None:
        """A volume of the name that is not the source's size is an upload a crash or a lost
        connection interrupted: the next import replaces it."""
        if env.kind == "libvirt-test":
            pytest.skip("test:/// keeps no volume data: nothing to tell a cut-short import by")
        data = env.base_image.read_bytes()
        cut = write_file(env.tmp / "cut.qcow2", data[: len(data) // 2])
        half = env.driver.import_volume("template.qcow2", cut)
        again = env.driver.import_volume("template.qcow2", env.base_image)
        if env.kind == "libvirt-qemu":  # this machine's storage: the file itself is read
            assert Path(again.path).read_bytes() == data
        else:
            assert (half.allocation_bytes, again.allocation_bytes) == (len(data) // 2,
                                                                       len(data))
        assert env.driver.list_volumes().count("template.qcow2") == 1

    def test_volume_info_of_missing_volume_is_not_found(self, driver: HypervisorDriver) -> None:
        with pytest.raises(NotFound):
            driver.volume_info("no-such-volume.qcow2")

    def test_delete_volume_removes_it_and_is_idempotent(self, env: ContractEnv) -> None:
        env.driver.import_volume("doomed.qcow2", env.base_image)
        env.driver.delete_volume("doomed.qcow2")
        assert "doomed.qcow2" not in env.driver.list_volumes()
        env.driver.delete_volume("doomed.qcow2")  # a missing volume is not an error

    # --- create -------------------------------------------------------------------------

    def test_linked_clone_root_is_backed_by_the_base_volume(self, env: ContractEnv) -> None:
        base = env.driver.volume_info(env.base_volume())
        spec = env.spec(clone_mode=CloneMode.LINKED)
        env.driver.create_vm(spec)
        root = env.driver.volume_info(root_volume_name(spec.vm_id))
        assert root.backing_volume_path == base.path
        assert env.driver.volume_info(base.name).path == base.path  # the base is untouched

    def test_full_clone_is_independent_with_the_base_capacity(self, env: ContractEnv) -> None:
        base = env.driver.volume_info(env.base_volume())
        spec = env.spec(clone_mode=CloneMode.FULL)
        env.driver.create_vm(spec)
        root = env.driver.volume_info(root_volume_name(spec.vm_id))
        assert root.backing_volume_path is None
        assert root.path != base.path
        assert root.capacity_bytes == base.capacity_bytes

    def test_created_vm_is_shut_off(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        record = env.driver.create_vm(spec)
        assert (record.vm_id, record.name) == (spec.vm_id, spec.name)
        assert record.power_state is PowerState.SHUTOFF
        assert env.driver.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF

    def test_duplicate_vm_id_is_conflict_and_first_vm_untouched(self, env: ContractEnv) -> None:
        env.base_volume()
        first = env.spec()
        env.driver.create_vm(first)
        root_before = env.driver.volume_info(root_volume_name(first.vm_id))
        clash = env.spec(vm_id=first.vm_id, name=f"{first.name}-other")
        with pytest.raises(Conflict):
            env.driver.create_vm(clash)
        record = env.driver.get_vm(first.vm_id)
        assert (record.name, record.metadata) == (first.name, first.metadata)
        assert env.driver.volume_info(root_volume_name(first.vm_id)) == root_before
        assert clash.name not in {vm.name for vm in env.driver.list_vms()}

    def test_duplicate_name_is_conflict_and_first_vm_untouched(self, env: ContractEnv) -> None:
        env.base_volume()
        first = env.spec()
        env.driver.create_vm(first)
        env.driver.start_vm(first.vm_id)
        clash = env.spec(name=first.name)
        with pytest.raises(Conflict):
            env.driver.create_vm(clash)
        assert_nothing_left(env.driver, clash, name_free=False)  # the name is first's
        record = env.driver.get_vm(first.vm_id)
        assert record.metadata == first.metadata
        assert record.power_state is PowerState.RUNNING
        assert root_volume_name(first.vm_id) in env.driver.list_volumes()

    def test_missing_base_volume_is_not_found_and_leaves_nothing(self, env: ContractEnv) -> None:
        spec = env.spec(base_volume="no-such-base.qcow2")
        with pytest.raises(NotFound):
            env.driver.create_vm(spec)
        assert_nothing_left(env.driver, spec)

    def test_failed_create_leaves_no_vm_and_no_volume(self, env: ContractEnv) -> None:
        env.base_volume()
        seed = write_file(env.tmp / "seed.img", b"\0" * 64 * 1024)
        spec = env.spec(seed_image=seed)  # root and seed volumes are made before the define
        if isinstance(env.driver, FakeDriver):
            env.driver.fail_next("create_vm.define")
        else:
            # libvirt refuses a domain name containing '/' when the VM is defined, after the
            # driver has made its volumes: a real failure at the last step.
            spec = env.spec(vm_id=spec.vm_id, seed_image=seed, name=f"bad/{spec.name}")
        with pytest.raises(DriverError):
            env.driver.create_vm(spec)
        assert_nothing_left(env.driver, spec)

    def test_seed_image_becomes_a_volume_deleted_with_the_vm(self, env: ContractEnv) -> None:
        env.base_volume()
        seed = write_file(env.tmp / "seed.img", b"\0" * 64 * 1024)
        spec = env.spec(seed_image=seed)
        env.driver.create_vm(spec)
        info = env.driver.volume_info(seed_volume_name(spec.vm_id))
        assert info.backing_volume_path is None
        env.driver.delete_vm(spec.vm_id)
        assert seed_volume_name(spec.vm_id) not in env.driver.list_volumes()

    def test_layer_volume_is_attached_and_outlives_the_vm(self, env: ContractEnv) -> None:
        env.base_volume()
        layer = make_base_qcow2(env.tmp / "layer.qcow2", "16M")
        spec = env.spec(layer_volume=f"{uuid.uuid4()}-layer.qcow2")
        with pytest.raises(NotFound, match="layer"):
            env.driver.create_vm(spec)  # the caller makes the layer first
        assert_nothing_left(env.driver, spec)
        env.driver.import_volume(spec.layer_volume or "", layer)
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        # A rebase boot's spec: the version the layer was made on, read-only beside it.
        based = env.spec(layer_volume=spec.layer_volume,
                         layer_base_volume=f"{uuid.uuid4()}-old-base.qcow2")
        with pytest.raises(NotFound, match="base"):
            env.driver.create_vm(based)
        env.driver.import_volume(based.layer_base_volume or "", layer)
        env.driver.create_vm(based)
        env.driver.delete_vm(based.vm_id)
        assert {spec.layer_volume, based.layer_base_volume} <= set(env.driver.list_volumes())
        env.driver.delete_volume(based.layer_base_volume or "")
        assert env.driver.get_vm(spec.vm_id).power_state is PowerState.RUNNING
        # Not a hot-plugged disk: it is the VM's own, in its definition, at every boot.
        assert env.driver.attached_disks(spec.vm_id) == {}
        env.driver.delete_vm(spec.vm_id)
        assert spec.layer_volume in env.driver.list_volumes()  # the user's changes stay
        env.driver.delete_volume(spec.layer_volume or "")

    # --- power --------------------------------------------------------------------------

    def test_start_runs_the_vm_and_a_second_start_does_nothing(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        assert env.driver.get_vm(spec.vm_id).power_state is PowerState.RUNNING
        has_console = env.kind != "libvirt-test"  # test:/// has no VNC port (see below)
        console = env.driver.console_address(spec.vm_id) if has_console else None
        env.driver.start_vm(spec.vm_id)
        assert env.driver.get_vm(spec.vm_id).power_state is PowerState.RUNNING
        if has_console:  # the same QEMU process still runs, on the same port
            assert env.driver.console_address(spec.vm_id) == console

    def test_force_stop_shuts_off_and_stopping_an_off_vm_succeeds(
        self, env: ContractEnv
    ) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        env.driver.stop_vm(spec.vm_id, force=True)
        assert env.driver.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF
        env.driver.stop_vm(spec.vm_id, force=True)
        env.driver.stop_vm(spec.vm_id)
        assert env.driver.get_vm(spec.vm_id).power_state is PowerState.SHUTOFF

    def test_stop_reason_is_none_while_running_and_destroyed_after_a_forced_stop(
        self, env: ContractEnv
    ) -> None:
        spec = env.running_vm()
        assert env.driver.get_vm(spec.vm_id).stop_reason is None
        env.driver.stop_vm(spec.vm_id, force=True)
        record = env.driver.get_vm(spec.vm_id)
        assert record.stop_reason is StopReason.DESTROYED
        assert record.crash_description() is None  # asked for: not a crash

    def test_killed_qemu_reads_shut_off_crashed(self, env: ContractEnv) -> None:
        if env.kind == "libvirt-test":
            pytest.skip("test:/// runs no QEMU process to kill")
        spec = env.running_vm()
        if isinstance(env.driver, FakeDriver):
            env.driver.crash_vm(spec.vm_id)
        else:
            kill_qemu_of(spec.name)
        (listed,) = [r for r in env.driver.list_vms() if r.vm_id == spec.vm_id]
        for record in (env.driver.get_vm(spec.vm_id), listed):
            assert record.power_state is PowerState.SHUTOFF
            assert record.stop_reason is StopReason.CRASHED
            assert record.crash_description() == (
                "its VM stopped unexpectedly: QEMU ended (crashed)")
        env.driver.start_vm(spec.vm_id)  # nothing of it was lost: it starts again
        assert env.driver.get_vm(spec.vm_id).stop_reason is None

    def test_graceful_stop_returns_without_waiting(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        env.driver.stop_vm(spec.vm_id)
        # No OS here to act on the request: it may or may not have gone off, nothing else.
        assert env.driver.get_vm(spec.vm_id).power_state in (
            PowerState.RUNNING, PowerState.SHUTOFF)

    # --- reading VMs ----------------------------------------------------------------------

    def test_get_vm_returns_deskpool_id_name_and_metadata(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        record = env.driver.get_vm(spec.vm_id)
        assert record.vm_id == spec.vm_id
        assert record.name == spec.name
        assert record.metadata == spec.metadata

    def test_list_vms_gives_metadata_for_own_vms_and_none_for_others(
        self, env: ContractEnv
    ) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        foreign = env.add_foreign_vm()
        by_name = {vm.name: vm for vm in env.driver.list_vms()}
        own = by_name[spec.name]
        assert own.vm_id == spec.vm_id
        assert own.metadata is not None
        assert own.metadata.desktop_id == spec.metadata.desktop_id
        assert own.metadata.desktop_name == spec.metadata.desktop_name
        assert own.metadata.template_version_id == spec.metadata.template_version_id
        assert by_name[foreign].metadata is None

    def test_unknown_vm_raises_vm_not_found(self, driver: HypervisorDriver) -> None:
        unknown = uuid.uuid4()
        with pytest.raises(VmNotFound):
            driver.get_vm(unknown)
        with pytest.raises(VmNotFound):
            driver.start_vm(unknown)
        with pytest.raises(VmNotFound):
            driver.console_address(unknown)
        with pytest.raises(VmNotFound):
            driver.agent_command(unknown, "guest-ping")

    def test_console_of_running_vm_is_vnc_on_the_listen_address(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        if env.kind == "libvirt-test":
            # test:/// runs no QEMU, so no VNC server picks a port: its XML says port -1. The
            # driver may report that or refuse (DriverError); either is honest, nothing else is.
            try:
                console = env.driver.console_address(spec.vm_id)
            except DriverError:
                return
            assert console.protocol == "vnc"
            return
        console = env.driver.console_address(spec.vm_id)
        assert console.protocol == "vnc"
        assert console.host == spec.vnc_listen
        assert console.port > 0

    def test_console_of_vm_that_is_off_is_driver_error(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        with pytest.raises(DriverError):
            env.driver.console_address(spec.vm_id)

    def test_spice_display_listens_beside_vnc_and_takes_a_password(
        self, env: ContractEnv
    ) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        until = datetime.now(UTC) + timedelta(seconds=60)
        if env.kind == "libvirt-test":
            # test:/// runs no QEMU: no display port, and it cannot change a live device.
            with pytest.raises(DriverError):
                env.driver.set_console_password(spec.vm_id, ConsoleProtocol.SPICE, "pw", until)
            return
        spice = env.driver.console_address(spec.vm_id, ConsoleProtocol.SPICE)
        vnc = env.driver.console_address(spec.vm_id, ConsoleProtocol.VNC)
        assert (spice.protocol, spice.host) == ("spice", spec.vnc_listen)
        assert spice.port > 0 and spice.port != vnc.port
        env.driver.set_console_password(spec.vm_id, ConsoleProtocol.SPICE, "t1cket", until)
        # The display keeps its port: a password change is no new QEMU display.
        assert env.driver.console_address(spec.vm_id, ConsoleProtocol.SPICE) == spice

    def test_rdp_port_is_forwarded_on_the_listen_address_once(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        with pytest.raises(DriverError):  # off: nothing to forward to
            env.driver.console_address(spec.vm_id, ConsoleProtocol.RDP)
        env.driver.start_vm(spec.vm_id)
        if env.kind == "libvirt-test":
            # test:/// runs no QEMU: no display, no network to forward through.
            with pytest.raises(DriverError):
                env.driver.console_address(spec.vm_id, ConsoleProtocol.RDP)
            return
        rdp = env.driver.console_address(spec.vm_id, ConsoleProtocol.RDP)
        displays = {env.driver.console_address(spec.vm_id, p).port
                    for p in (ConsoleProtocol.VNC, ConsoleProtocol.SPICE)}
        assert (rdp.protocol, rdp.host) == ("rdp", spec.vnc_listen)
        assert rdp.port > 0 and rdp.port not in displays
        # Asked again, the same forward: one port per running VM.
        assert env.driver.console_address(spec.vm_id, ConsoleProtocol.RDP) == rdp

    def test_display_password_of_vm_that_is_off_is_driver_error(
        self, env: ContractEnv
    ) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        until = datetime.now(UTC) + timedelta(seconds=60)
        with pytest.raises(DriverError):
            env.driver.set_console_password(spec.vm_id, ConsoleProtocol.SPICE, "pw", until)
        with pytest.raises(VmNotFound):
            env.driver.set_console_password(uuid.uuid4(), ConsoleProtocol.SPICE, "pw", until)

    def test_agent_of_vm_that_is_off_is_unavailable(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        with pytest.raises(AgentUnavailable):
            env.driver.agent_command(spec.vm_id, "guest-ping")

    # --- hot-plugged disks ----------------------------------------------------------------

    def test_hot_plugged_disk_is_listed_by_serial_and_goes_with_the_process(
        self, env: ContractEnv
    ) -> None:
        spec = env.running_vm()
        disk = make_base_qcow2(env.tmp / "profile.qcow2", "16M")
        if env.kind == "libvirt-test":
            # test:/// cannot change a live VM's devices.
            with pytest.raises(DriverError, match="not supported"):
                env.driver.attach_disk(spec.vm_id, disk, "dp-profile1")
            assert env.driver.attached_disks(spec.vm_id) == {}
            return
        env.driver.attach_disk(spec.vm_id, disk, "dp-profile1")
        assert env.driver.attached_disks(spec.vm_id) == {"dp-profile1": str(disk)}
        with pytest.raises(Conflict, match="dp-profile1"):
            env.driver.attach_disk(spec.vm_id, disk, "dp-profile1")
        env.driver.stop_vm(spec.vm_id, force=True)
        assert env.driver.attached_disks(spec.vm_id) == {}
        env.driver.start_vm(spec.vm_id)  # live only: the definition never held it
        assert env.driver.attached_disks(spec.vm_id) == {}

    def test_detach_waits_for_the_guest_and_power_off_releases_for_sure(
        self, env: ContractEnv
    ) -> None:
        spec = env.running_vm()
        if env.kind == "libvirt-test":
            return  # nothing can be attached there (see above)
        disk = make_base_qcow2(env.tmp / "profile.qcow2", "16M")
        env.driver.attach_disk(spec.vm_id, disk, "dp-profile2")
        # No OS runs in these VMs to answer the PCI unplug: the disk stays, said so.
        try:
            env.driver.detach_disk(spec.vm_id, "dp-profile2", timeout_s=1.0)
        except DriverError as exc:
            assert "did not release" in str(exc)
            assert "dp-profile2" in env.driver.attached_disks(spec.vm_id)
        env.driver.stop_vm(spec.vm_id, force=True)
        assert env.driver.attached_disks(spec.vm_id) == {}
        env.driver.detach_disk(spec.vm_id, "dp-profile2")  # off: nothing attached, succeeds

    def test_attach_refuses_bad_input_and_vms_that_are_off(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        disk = make_base_qcow2(env.tmp / "profile.qcow2", "16M")
        with pytest.raises(InvalidInput, match="serial"):
            env.driver.attach_disk(spec.vm_id, disk, "has space")
        with pytest.raises(InvalidInput, match="serial"):
            env.driver.attach_disk(spec.vm_id, disk, "x" * 21)
        with pytest.raises(DriverError):  # off (or, on test:///, never supported)
            env.driver.attach_disk(spec.vm_id, disk, "dp-off")
        with pytest.raises(VmNotFound):
            env.driver.attach_disk(uuid.uuid4(), disk, "dp-unknown")
        env.driver.start_vm(spec.vm_id)
        missing = (NotFound, DriverError) if env.kind == "libvirt-test" else NotFound
        with pytest.raises(missing):
            env.driver.attach_disk(spec.vm_id, env.tmp / "missing.qcow2", "dp-missing")
        assert env.driver.attached_disks(spec.vm_id) == {}
        env.driver.detach_disk(spec.vm_id, "dp-never-attached")

    # --- delete -------------------------------------------------------------------------

    def test_delete_vm_removes_running_vm_and_its_volumes(self, env: ContractEnv) -> None:
        base = env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.start_vm(spec.vm_id)
        env.driver.delete_vm(spec.vm_id)
        assert_nothing_left(env.driver, spec)
        assert base in env.driver.list_volumes()  # the template image is not the VM's

    def test_delete_of_unknown_vm_succeeds(self, driver: HypervisorDriver) -> None:
        driver.delete_vm(uuid.uuid4())

    def test_delete_vm_removes_leftover_volumes_without_a_vm(self, env: ContractEnv) -> None:
        vm_id = uuid.uuid4()
        env.vm_ids.append(vm_id)
        # A crash between making the root volume and defining the VM leaves just this.
        env.driver.import_volume(root_volume_name(vm_id), env.base_image)
        env.driver.delete_vm(vm_id)
        assert root_volume_name(vm_id) not in env.driver.list_volumes()


class TestDriverContractDecisions:
    """Points the first contract left open, settled in base.py."""

    def test_foreign_vms_are_listed_but_never_touched(self, env: ContractEnv) -> None:
        name = env.add_foreign_vm()
        foreign = next(vm for vm in env.driver.list_vms() if vm.name == name)
        for act in (env.driver.start_vm, env.driver.delete_vm,
                    lambda vm_id: env.driver.stop_vm(vm_id, force=True)):
            with pytest.raises(Conflict, match="not created by deskpool"):
                act(foreign.vm_id)
        assert name in {vm.name for vm in env.driver.list_vms()}

    def test_create_replaces_volumes_left_by_a_crash(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec()
        env.driver.import_volume(root_volume_name(spec.vm_id), env.base_image)  # the leftover
        env.driver.create_vm(spec)
        root = env.driver.volume_info(root_volume_name(spec.vm_id))
        assert root.backing_volume_path is not None  # the new linked clone, not the leftover

    def test_unresolved_domain_type_is_refused(self, env: ContractEnv) -> None:
        env.base_volume()
        spec = env.spec(domain_type=DomainType.AUTO)
        with pytest.raises(InvalidInput, match="auto"):
            env.driver.create_vm(spec)
        assert root_volume_name(spec.vm_id) not in env.driver.list_volumes()

    def test_stop_of_unknown_vm_is_vm_not_found(self, driver: HypervisorDriver) -> None:
        with pytest.raises(VmNotFound):
            driver.stop_vm(uuid.uuid4())

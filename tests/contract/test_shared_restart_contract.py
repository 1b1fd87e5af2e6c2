"""The driver contract's HA restart (``restart_on_shared_storage``, ``forget_vm``), run against
every driver: two fake hosts on one shared storage; libvirt ``test:///``, which cannot fence
(refused, nothing changed); and ``qemu:///system``, where the disk a lost host left is held
by a real QEMU image lock (a ``qemu-io`` process standing for a QEMU that outlived its
libvirtd): the restart is refused while it holds the disk and works once it is gone."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from deskpool.domain.errors import Conflict, DiskInUse, DriverError, InvalidInput, NotFound
from deskpool.domain.models import CloneMode, PowerState
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import owned_volume_names, root_volume_name
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.fake.shared import forget_shared_storage
from tests.contract.conftest import BASE_VOLUME, ContractEnv


@contextmanager
def fake_pair() -> Iterator[tuple[FakeDriver, FakeDriver]]:
    storage = f"nas-{uuid.uuid4().hex[:8]}"
    yield (FakeDriver(f"fake://lost?shared_storage={storage}"),
           FakeDriver(f"fake://spare?shared_storage={storage}"))
    forget_shared_storage()


@contextmanager
def disk_held(path: str) -> Iterator[None]:
    """A process holding the image open for writing, with QEMU's lock on it."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["qemu-img", "info", path], capture_output=True).returncode == 0:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-io never took the image's lock"
            time.sleep(0.1)
        yield
    finally:
        proc.kill()
        proc.wait()


def test_a_lost_hosts_vm_restarts_on_a_host_sharing_its_storage(env: ContractEnv) -> None:
    if env.kind == "libvirt-test":
        env.base_volume()
        spec = env.spec()
        env.driver.create_vm(spec)
        env.driver.delete_vm(spec.vm_id)
        with pytest.raises(DriverError, match="not supported"):
            env.driver.restart_on_shared_storage(spec)
        assert spec.vm_id not in {vm.vm_id for vm in env.driver.list_vms()}
        return
    if env.kind == "fake":
        with fake_pair() as (lost, spare):
            lost.import_volume(BASE_VOLUME, env.base_image)
            spec = env.spec(identity_text="desk\n")  # a guest OS: its files are its disk
            lost.create_vm(spec)
            lost.start_vm(spec.vm_id)
            GuestAgent(lost, spec.vm_id).write_file("/home/u/work", b"kept")
            with pytest.raises(DiskInUse, match="locked by a running QEMU"):
                spare.restart_on_shared_storage(spec)  # its QEMU runs on the lost host
            assert spec.vm_id not in {vm.vm_id for vm in spare.list_vms()}
            lost.lose_power()
            record = spare.restart_on_shared_storage(spec)
            assert record.power_state is PowerState.RUNNING
            assert GuestAgent(spare, spec.vm_id).read_file("/home/u/work") == b"kept"
            with pytest.raises(Conflict):
                spare.restart_on_shared_storage(spec)  # defined here already
            lost.set_reachable(True)
            lost.forget_vm(spec.vm_id)  # the old host's stale definition, disks kept
            assert spec.vm_id not in {vm.vm_id for vm in lost.list_vms()}
            assert root_volume_name(spec.vm_id) in spare.list_volumes()
            with pytest.raises(Conflict, match="only a VM that is off"):
                spare.forget_vm(spec.vm_id)
        return
    # qemu:///system: the disk as a lost host left it (defined there, then forgotten).
    env.base_volume()
    spec = env.spec()
    env.driver.create_vm(spec)
    env.driver.forget_vm(spec.vm_id)
    env.driver.forget_vm(spec.vm_id)  # an unknown VM is no error
    root = env.driver.volume_info(root_volume_name(spec.vm_id))
    with disk_held(root.path), pytest.raises(DiskInUse, match="locked by another QEMU"):
        env.driver.restart_on_shared_storage(spec)
    assert spec.vm_id not in {vm.vm_id for vm in env.driver.list_vms()}
    assert root_volume_name(spec.vm_id) in env.driver.list_volumes()  # never touched
    record = env.driver.restart_on_shared_storage(spec)
    assert record.power_state is PowerState.RUNNING
    assert env.driver.get_vm(spec.vm_id).power_state is PowerState.RUNNING
    with pytest.raises(Conflict, match="only a VM that is off"):
        env.driver.forget_vm(spec.vm_id)


def test_what_cannot_be_restarted_is_refused_and_nothing_is_made(env: ContractEnv) -> None:
    driver = env.driver
    env.base_volume()
    no_disk = env.spec()
    if env.kind == "libvirt-test":
        with pytest.raises(DriverError, match="not supported"):
            driver.restart_on_shared_storage(no_disk)
        return
    with pytest.raises(NotFound, match="not shared with the VM's host"):
        driver.restart_on_shared_storage(no_disk)
    with pytest.raises(InvalidInput, match="instant clone"):
        driver.restart_on_shared_storage(replace(no_disk, clone_mode=CloneMode.INSTANT))
    assert not set(owned_volume_names(no_disk.vm_id)) & set(driver.list_volumes())
    assert no_disk.vm_id not in {vm.vm_id for vm in driver.list_vms()}
    defined = env.spec()
    driver.create_vm(defined)
    with pytest.raises(Conflict):
        driver.restart_on_shared_storage(defined)
    assert driver.get_vm(defined.vm_id).power_state is PowerState.SHUTOFF

"""The driver contract's live migration (``HypervisorDriver.migrate_vm``), run against every
driver: two fake hosts; libvirt ``test:///``, which cannot (refused, nothing changed); and
``qemu:///system`` with a second, independent libvirt daemon on this machine
(``tests/libvirt_hosts.py``) as the target. The VMs run no OS (an empty disk), so a move
takes seconds; a real guest moving with its work is shown in ``tests/realvm``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain.errors import Conflict, DeskpoolError, DriverError, InvalidInput
from deskpool.domain.models import PowerState
from deskpool.drivers.base import HypervisorDriver, owned_volume_names, root_volume_name
from deskpool.drivers.fake import FakeDriver
from tests.contract.conftest import BASE_VOLUME, POOL_PREFIX, ContractEnv
from tests.libvirt_hosts import SecondLibvirtHost


@pytest.fixture(scope="module")
def second_daemon() -> Iterator[list[SecondLibvirtHost]]:
    """Started by the first qemu test that asks, stopped with the module."""
    started: list[SecondLibvirtHost] = []
    yield started
    for host in started:
        host.close()


@pytest.fixture
def peer(env: ContractEnv, second_daemon: list[SecondLibvirtHost],
         tmp_path: Path) -> Iterator[HypervisorDriver]:
    """A second host of the same kind, with the base volume on it as a clone would need."""
    if env.kind == "fake":
        target: HypervisorDriver = FakeDriver(f"fake://peer-{uuid.uuid4().hex[:8]}")
    else:
        from deskpool.drivers.libvirt import LibvirtDriver

        if env.kind == "libvirt-test":
            target = LibvirtDriver("test:///default", storage_dir=tmp_path / "peer-pool",
                                   pool_name=f"{POOL_PREFIX}{uuid.uuid4().hex[:10]}")
        else:
            if not second_daemon:
                second_daemon.append(SecondLibvirtHost().__enter__())
            host = second_daemon[0]
            target = LibvirtDriver(host.uri, storage_dir=host.storage_dir)
    target.import_volume(BASE_VOLUME, env.base_image)
    try:
        yield target
    finally:
        for vm_id in env.vm_ids:
            target.delete_vm(vm_id)
        target.delete_volume(BASE_VOLUME)
        target.close()


def _refused_unless_supported(env: ContractEnv) -> bool:
    return env.kind == "libvirt-test"


def assert_runs_only_on(here: HypervisorDriver, there: HypervisorDriver,
                        vm_id: uuid.UUID) -> None:
    assert here.get_vm(vm_id).power_state is PowerState.RUNNING
    if here.uri == there.uri:
        return  # test:///default: one hypervisor behind both drivers; it refused to move
    assert vm_id not in {vm.vm_id for vm in there.list_vms()}
    assert not set(owned_volume_names(vm_id)) & set(there.list_volumes())


def test_a_running_vm_moves_with_its_identity_and_leaves_nothing_behind(
    env: ContractEnv, peer: HypervisorDriver
) -> None:
    spec = env.running_vm()
    if _refused_unless_supported(env):
        with pytest.raises(DriverError, match="not supported"):
            env.driver.migrate_vm(spec.vm_id, peer, base_volume=BASE_VOLUME)
        assert_runs_only_on(env.driver, peer, spec.vm_id)
        return
    seen: list[tuple[int, int]] = []
    stats = env.driver.migrate_vm(spec.vm_id, peer, base_volume=BASE_VOLUME,
                                  progress=lambda done, total: seen.append((done, total)))
    assert_runs_only_on(peer, env.driver, spec.vm_id)
    moved = peer.get_vm(spec.vm_id)
    assert (moved.name, moved.metadata) == (spec.name, spec.metadata)
    root = peer.volume_info(root_volume_name(spec.vm_id))
    assert root.backing_volume_path == peer.volume_info(BASE_VOLUME).path  # its own base
    assert stats.memory_bytes > 0 and stats.disk_bytes >= 0 and seen

    # And back: the same call from the other side.
    env.driver.import_volume(BASE_VOLUME, env.base_image)  # there still; only checked
    peer.migrate_vm(spec.vm_id, env.driver, base_volume=BASE_VOLUME)
    assert_runs_only_on(env.driver, peer, spec.vm_id)
    assert env.driver.get_vm(spec.vm_id).metadata == spec.metadata


def test_what_cannot_move_is_refused_before_anything_starts(
    env: ContractEnv, peer: HypervisorDriver
) -> None:
    spec = env.running_vm()
    stopped = env.spec()
    env.driver.create_vm(stopped)
    with pytest.raises((Conflict, DriverError)):  # not running (test:/// refuses it all)
        env.driver.migrate_vm(stopped.vm_id, peer, base_volume=BASE_VOLUME)
    with pytest.raises((InvalidInput, DriverError)):
        env.driver.migrate_vm(spec.vm_id, env.driver, base_volume=BASE_VOLUME)
    env.driver.create_snapshot(spec.vm_id, "factory")
    with pytest.raises((Conflict, DriverError), match=r"snapshot|not supported"):
        env.driver.migrate_vm(spec.vm_id, peer, base_volume=BASE_VOLUME)
    assert_runs_only_on(env.driver, peer, spec.vm_id)
    assert env.driver.get_vm(stopped.vm_id).power_state is PowerState.SHUTOFF
    if peer.uri != env.driver.uri:
        assert stopped.vm_id not in {vm.vm_id for vm in peer.list_vms()}


def test_a_failed_migration_leaves_it_running_where_it_was(
    env: ContractEnv, peer: HypervisorDriver
) -> None:
    spec = env.running_vm()
    # The target lacks the base: nothing can be made there.
    with pytest.raises(DeskpoolError):
        env.driver.migrate_vm(spec.vm_id, peer, base_volume="no-such-base.qcow2")
    assert_runs_only_on(env.driver, peer, spec.vm_id)
    if _refused_unless_supported(env):
        return
    # Cut short once the target's disk exists: a fault on the fake, a deadline on QEMU
    # (cancelled within the first half second of a move that takes a few).
    if isinstance(env.driver, FakeDriver):
        env.driver.fail_next("migrate_vm.transfer")
        with pytest.raises(DriverError):
            env.driver.migrate_vm(spec.vm_id, peer, base_volume=BASE_VOLUME)
    else:
        with pytest.raises(DriverError, match="cancelled"):
            env.driver.migrate_vm(spec.vm_id, peer, base_volume=BASE_VOLUME, timeout_s=0.01)
    assert_runs_only_on(env.driver, peer, spec.vm_id)
    env.driver.migrate_vm(spec.vm_id, peer, base_volume=BASE_VOLUME)  # a later try works
    assert_runs_only_on(peer, env.driver, spec.vm_id)

"""The driver contract's load sample (``HypervisorDriver.load_sample``), run against every
driver: what the balancer reads of a host. libvirt ``test:///`` reports fixed counters (its
CPU time does not move), so only the fake and real hosts show a CPU load from two samples."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from deskpool.domain.errors import DriverError
from deskpool.domain.identity import new_mac
from deskpool.domain.models import CloneMode, LoadSample, VmMetadata, VmSpec
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.fake.load import SAMPLE_STEP_S
from tests.contract.conftest import ContractEnv


def test_a_sample_reports_the_hosts_memory_and_cpus(env: ContractEnv) -> None:
    sample = env.driver.load_sample()
    capacity = env.driver.capacity()
    assert sample.memory_total_mib == capacity.memory_mib
    assert 0 <= sample.memory_used_mib <= sample.memory_total_mib
    assert sample.cpu_count == capacity.vcpus
    assert 0 <= sample.cpu_busy_ns <= sample.cpu_total_ns


def test_running_vms_are_in_the_sample_and_stopped_ones_are_not(env: ContractEnv) -> None:
    running = env.running_vm()
    env.base_volume()
    stopped = env.spec()
    env.driver.create_vm(stopped)
    sample = env.driver.load_sample()
    assert running.vm_id in sample.vms
    assert stopped.vm_id not in sample.vms
    assert sample.vms[running.vm_id].memory_used_mib > 0
    assert sample.vms[running.vm_id].cpu_time_ns >= 0


def test_counters_never_go_back_between_two_samples(env: ContractEnv) -> None:
    spec = env.running_vm()
    first = env.driver.load_sample()
    second = env.driver.load_sample()
    assert second.taken_at_s >= first.taken_at_s
    assert second.cpu_busy_ns >= first.cpu_busy_ns
    assert second.cpu_total_ns >= first.cpu_total_ns
    assert second.vms[spec.vm_id].cpu_time_ns >= first.vms[spec.vm_id].cpu_time_ns
    load = second.cpu_load_since(first)
    assert load is None or 0.0 <= load <= 1.0
    if env.kind == "libvirt-test":
        assert load is None  # its counters are fixed: no load can be told


# --- the fake's own controls: the loads tests set are the loads it reports -------------------


def test_the_fake_reports_the_loads_a_test_sets(tmp_path: Path) -> None:
    host = FakeDriver("fake://loaded?vcpus=8&memory_mib=16384")
    image = tmp_path / "base.img"
    image.write_bytes(b"\0" * 4096)
    host.import_volume("base", image)
    vm_id = uuid.uuid4()
    host.create_vm(VmSpec(vm_id=vm_id, name="busy", base_volume="base",
                          clone_mode=CloneMode.LINKED, mac=new_mac(),
                          metadata=VmMetadata(desktop_id=vm_id, desktop_name="busy"),
                          memory_mib=2048, vcpus=2))
    host.start_vm(vm_id)
    host.set_host_load(memory_mib=1024, cpus_busy=1.0)
    first = host.load_sample()
    assert first.memory_used_mib == 1024 + 2048  # a VM holds its spec's memory by default
    host.set_vm_load(vm_id, memory_mib=3072, cpus_busy=2.0)
    second = host.load_sample()
    assert second.memory_used_mib == 1024 + 3072
    assert second.taken_at_s - first.taken_at_s == SAMPLE_STEP_S
    assert second.cpu_load_since(first) == pytest.approx(3.0 / 8)
    assert second.vm_cpus_since(first, vm_id) == pytest.approx(2.0)
    host.stop_vm(vm_id, force=True)
    third = host.load_sample()
    assert vm_id not in third.vms and third.memory_used_mib == 1024
    assert third.vm_cpus_since(second, vm_id) is None


def test_an_injected_failure_makes_the_fake_sample_fail_once() -> None:
    host = FakeDriver("fake://flaky")
    host.fail_next("load_sample")
    with pytest.raises(DriverError, match="injected failure in load_sample"):
        host.load_sample()
    assert isinstance(host.load_sample(), LoadSample)


"""The fake host's measured load (``HypervisorDriver.load_sample``), set by tests.

Deterministic: the fake keeps its own clock, which each sample moves ``SAMPLE_STEP_S``
forward, and its counters grow over that step at the rates set now. A running VM holds its
spec's memory unless a test says otherwise (``set_vm_load``); the host's memory in use is its
own use (``set_host_load``) plus its running VMs', so a VM that moves away takes its share
with it, as on a real host.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING

from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import LoadSample, VmLoad
from deskpool.drivers.fake.faults import api
from deskpool.drivers.fake.saved_state import ACTIVE_STATES
from deskpool.drivers.fake.state import FakeVm

SAMPLE_STEP_S = 10.0  # how far the fake's clock moves per sample
_NS = 1_000_000_000


class FakeLoadMixin:
    if TYPE_CHECKING:  # provided by FakeDriver
        uri: str
        _lock: threading.RLock
        _vms: dict[uuid.UUID, FakeVm]
        _vcpus: int
        _memory_mib: int

        def _check_usable(self) -> None: ...
        def _maybe_fail(self, point: str) -> None: ...
        def _vm(self, vm_id: uuid.UUID) -> FakeVm: ...

    # The host's own use besides its VMs, the fake's clock and its cumulative counters.
    _own_memory_mib: float = 0.0
    _own_cpus_busy: float = 0.0
    _clock_s: float = 0.0
    _cpu_busy_ns: int = 0
    _cpu_total_ns: int = 0

    def set_host_load(self, *, memory_mib: float = 0.0, cpus_busy: float = 0.0) -> None:
        """Test control: what the host itself (not its VMs) uses: memory, and CPUs busy."""
        if memory_mib < 0 or cpus_busy < 0:
            raise InvalidInput("a host's load cannot be negative")
        with self._lock:
            self._own_memory_mib, self._own_cpus_busy = memory_mib, cpus_busy

    def set_vm_load(self, vm_id: uuid.UUID, *, memory_mib: float | None = None,
                    cpus_busy: float | None = None) -> None:
        """Test control: what a VM uses (memory None: its spec's memory). It keeps the load
        when it moves to another host, as its guest's work would go on there."""
        if (memory_mib is not None and memory_mib < 0) or (cpus_busy is not None
                                                           and cpus_busy < 0):
            raise InvalidInput("a VM's load cannot be negative")
        with self._lock:
            vm = self._vm(vm_id)
            vm.load_memory_mib = memory_mib
            if cpus_busy is not None:
                vm.load_cpus_busy = cpus_busy

    @api
    def load_sample(self) -> LoadSample:
        self._clock_s += SAMPLE_STEP_S
        running = [vm for vm in self._vms.values() if vm.power in ACTIVE_STATES]
        vms: dict[uuid.UUID, VmLoad] = {}
        for vm in running:
            vm.cpu_time_ns += round(vm.load_cpus_busy * SAMPLE_STEP_S * _NS)
            vms[vm.vm_id] = VmLoad(memory_used_mib=vm_memory_mib(vm), cpu_time_ns=vm.cpu_time_ns)
        busy = min(float(self._vcpus),
                   self._own_cpus_busy + sum(vm.load_cpus_busy for vm in running))
        self._cpu_busy_ns += round(busy * SAMPLE_STEP_S * _NS)
        self._cpu_total_ns += round(self._vcpus * SAMPLE_STEP_S * _NS)
        used = self._own_memory_mib + sum(load.memory_used_mib for load in vms.values())
        return LoadSample(taken_at_s=self._clock_s, memory_total_mib=self._memory_mib,
                          memory_used_mib=min(float(self._memory_mib), used),
                          cpu_count=self._vcpus, cpu_busy_ns=self._cpu_busy_ns,
                          cpu_total_ns=self._cpu_total_ns, vms=vms)

    def _memory_free_mib(self) -> float:
        """Memory no one uses: the host's less its own use and its running VMs'."""
        used = self._own_memory_mib + sum(vm_memory_mib(vm) for vm in self._vms.values()
                                          if vm.power in ACTIVE_STATES)
        return self._memory_mib - used


def vm_memory_mib(vm: FakeVm) -> float:
    """What a running VM's memory takes: its measured load, else its spec's memory."""
    if vm.load_memory_mib is not None:
        return vm.load_memory_mib
    return float(vm.spec.memory_mib) if vm.spec is not None else 0.0

"""A libvirt host's measured load (``HypervisorDriver.load_sample``): node memory and CPU
time from the host's own statistics, each running domain's memory and CPU time.

A mixin of ``LibvirtDriver``. Memory in use is what ``free`` calls used: total less free,
buffers and page cache (the kernel gives those back under pressure). A domain's memory in use
is its QEMU process's RSS from the balloon statistics, else the balloon's current size, else
the memory ``virDomainGetInfo`` reports. libvirt's ``test:///`` has no node memory statistics:
its ``getInfo`` and free memory stand in.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import libvirt

from deskpool.domain.errors import DriverError
from deskpool.domain.models import LoadSample, VmLoad
from deskpool.drivers.libvirt.connection import error_code

KiB_PER_MiB = 1024



class LoadSampleMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock

        @property
        def _conn(self) -> libvirt.virConnect: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...

    def load_sample(self) -> LoadSample:
        with self._lock, self._translate("sampling the host's load"):
            conn = self._conn
            taken_at = time.monotonic()
            _model, memory_mib, cpus, *_ = conn.getInfo()
            busy_ns, total_ns = self._node_cpu_ns(conn)
            used_mib = self._node_memory_used_mib(conn, int(memory_mib))
            vms: dict[uuid.UUID, VmLoad] = {}
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    vms[uuid.UUID(dom.UUIDString())] = self._domain_load(dom)
                except libvirt.libvirtError as exc:
                    if error_code(exc) not in (libvirt.VIR_ERR_NO_DOMAIN,
                                          libvirt.VIR_ERR_OPERATION_INVALID):
                        raise
                    # ended between the list and the read: not running any more
        return LoadSample(taken_at_s=taken_at, memory_total_mib=int(memory_mib),
                          memory_used_mib=used_mib, cpu_count=int(cpus), cpu_busy_ns=busy_ns,
                          cpu_total_ns=total_ns, vms=vms)

    def _node_cpu_ns(self, conn: libvirt.virConnect) -> tuple[int, int]:
        """(busy, total) nanoseconds of all the host's CPUs, cumulative."""
        stats = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS, 0)
        if not {"user", "kernel", "idle"} <= set(stats):
            raise DriverError(f"sampling the host's load failed on {self.uri}: its CPU "
                              f"statistics give {sorted(stats)}, not user, kernel and idle "
                              "time (not supported by this hypervisor)")
        busy = int(stats["user"]) + int(stats["kernel"])
        return busy, busy + int(stats["idle"]) + int(stats.get("iowait", 0))

    @staticmethod
    def _node_memory_used_mib(conn: libvirt.virConnect, total_mib: int) -> float:
        try:
            stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
        except libvirt.libvirtError as exc:
            if error_code(exc) != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            # test:/// has no node memory statistics: the free memory it reports instead.
            free_mib = int(conn.getFreeMemory()) / (1024 * 1024)
            return max(0.0, total_mib - free_mib)
        reclaimable = sum(int(stats.get(key, 0)) for key in ("free", "buffers", "cached"))
        return max(0, int(stats["total"]) - reclaimable) / KiB_PER_MiB

    @staticmethod
    def _domain_load(dom: libvirt.virDomain) -> VmLoad:
        _state, _max_kib, memory_kib, _vcpus, cpu_time_ns = dom.info()
        try:
            balloon = dom.memoryStats()
        except libvirt.libvirtError as exc:
            if error_code(exc) not in (libvirt.VIR_ERR_NO_SUPPORT,
                                  libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                raise
            balloon = {}
        used_kib = balloon.get("rss") or balloon.get("actual") or memory_kib
        return VmLoad(memory_used_mib=int(used_kib) / KiB_PER_MiB, cpu_time_ns=int(cpu_time_ns))

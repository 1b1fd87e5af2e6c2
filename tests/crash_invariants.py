"""After a crash and a restart: what must hold between the database and the hypervisor."""

from __future__ import annotations

import uuid

from deskpool.config import Settings
from deskpool.domain.states import HAS_VM_STATES
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.pools import PoolService


def check_invariants(settings: Settings, driver: HypervisorDriver, users: dict[str, uuid.UUID],
                     *, pool: str, spare: int, max_size: int) -> None:
    """Every VM of this deployment is known to the database, every desktop that should have a
    VM has one, no user's desktop was lost, and the pool is at its wanted size, free ones ready.

    Other deployments' VMs on a shared host (another broker's, a demo left defined) are theirs:
    the reconciler leaves them alone, and so does this check."""
    ctx = ServiceContext(settings)
    try:
        rows = {d.id: d for d in DesktopService(ctx).list()}
        ours = {vm.vm_id for vm in driver.list_vms()
                if vm.metadata is not None and vm.metadata.installation_id == ctx.installation_id}
        assert ours <= set(rows), f"VMs unknown to the database: {ours - set(rows)}"
        for row in rows.values():
            if row.state in HAS_VM_STATES:
                assert row.id in ours, f"{row.name} is {row.state} but has no VM"
        for user, desktop_id in users.items():
            assert desktop_id in rows, f"{user}'s desktop was lost"
        view = PoolService(ctx).get(pool)
        held = sum(view.counts.get(s, 0) for s in ("reserved", "in_use", "idle"))
        assert view.counts.get("ready", 0) == min(spare, max_size - held), view.counts
        assert set(view.counts) <= {"ready", "reserved", "in_use", "idle"}, view.counts
    finally:
        ctx.close()

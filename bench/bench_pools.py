"""What the real-VM benches share: taking down the pool and host storage they made."""

from __future__ import annotations

from pathlib import Path

from deskpool.drivers.libvirt import forget_storage_pool
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.pools import PoolService


def tear_down(ctx: ServiceContext, pool: str, storage_dir: Path) -> None:
    """Every desktop of the bench deleted (the pool first shrunk to nothing, so the
    reconciler makes no more), the context closed, libvirt's storage pool forgotten."""
    PoolService(ctx).resize(pool, min_size=0, spare=0)
    for d in DesktopService(ctx).list():
        DesktopService(ctx).delete(str(d.id))
    ctx.close()
    forget_storage_pool(storage_dir)

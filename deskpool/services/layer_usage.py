"""How full a running desktop's user layer is, asked of its guest (issue 14).

The layer disk is mounted in the guest at ``/run/deskpool/layer`` (the initramfs's
deskpool-layer script); ``df`` there gives its use, and the files under the current
generation's ``upper`` are the user's changes. Measured when the user logs off, stored as the
desktop's layer status, and a layer past ``NEARLY_FULL`` of its disk is told to the
administrator and to its user before it runs out: a full layer refuses the user's next write,
and a rebase needs room for the next generation beside the current one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from deskpool.domain.errors import DeskpoolError, DriverError
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.user_layers import UserLayerViews

NEARLY_FULL = 0.85
_MEASURE = ("df -P -B1 /run/deskpool/layer | tail -n 1; "
            "find /run/deskpool/layer/current/upper -xdev ! -type d | wc -l")


@dataclass(frozen=True)
class LayerUsage:
    size_bytes: int
    used_bytes: int
    changed_files: int

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.size_bytes if self.size_bytes else 0.0


def parse_usage(out: str) -> LayerUsage:
    """``_MEASURE``'s output: df's POSIX line (device, size, used, available, use%, mount)
    and the number of changed files."""
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        fields = lines[0].split()
        return LayerUsage(size_bytes=int(fields[1]), used_bytes=int(fields[2]),
                          changed_files=int(lines[1].strip()))
    except (IndexError, ValueError):
        raise DriverError(f"the guest's measure of its user layer is unreadable: {out!r}") \
            from None


def measure_layer(ctx: ServiceContext, driver: HypervisorDriver, desktop_id: uuid.UUID,
                  version: int) -> LayerUsage:
    """Ask the running guest how full its layer is; store it, and warn when nearly full.
    ``DeskpoolError`` when the guest cannot tell (the caller goes on without it)."""
    code, out, err = GuestAgent(driver, desktop_id).exec_capture(["sh", "-c", _MEASURE])
    if code != 0:
        raise DriverError(f"the guest could not measure its user layer: {err.strip() or code}")
    usage = parse_usage(out)
    view = UserLayerViews(ctx).record_layer_status(desktop_id, version, usage.used_bytes,
                                                   usage.changed_files)
    if usage.fraction >= NEARLY_FULL:
        with ctx.uow() as uow:
            record_event(uow, "layer-nearly-full",
                         f"The user layer of desktop {view.desktop} is {usage.fraction:.0%} "
                         f"full ({usage.used_bytes / 2**20:.0f} of "
                         f"{usage.size_bytes / 2**20:.0f} MiB): when it is full the desktop "
                         "refuses new changes to the system, and an update cannot be applied "
                         "to it; free room in it, or move the user to a pool with a larger "
                         "layer", severity="warning", user=view.user, pool=view.pool,
                         desktop_id=desktop_id, desktop=view.desktop)
            uow.commit()
    return usage


def try_measure_layer(ctx: ServiceContext, driver: HypervisorDriver, desktop_id: uuid.UUID,
                      version: int) -> LayerUsage | None:
    """``measure_layer``, or None when the guest does not answer (nothing is stored)."""
    try:
        return measure_layer(ctx, driver, desktop_id, version)
    except DeskpoolError:
        return None

"""R4's short-lived processes, each started by ``bench/r4_profile_cuts.py`` and SIGKILLed
(or not) at a moment it chooses. The hypervisor is a shared fake one in its own process
(``deskpool.drivers.fake.remote``), so a killed broker leaves the disk attached or detached
exactly as it was, as libvirtd would.

``broker``: deskpool's logoff of one session layer, as ``ProfileDesktops.close`` does it:
when the guest answered ``session-hook end`` (its write-back finished) ``end_session``
detaches, checks and commits by compare-and-swap; when it did not (its QEMU was killed) the
desktop is powered off and the layer set aside (``abandon_session``). It prints ``ready``,
waits for ``go`` on stdin (so the cut's clock starts at the logoff, not at Python's start),
then ``done SECONDS``.

``copy``: the copy of the user's chain (top layer ``--layer``) to host ``--host-b``, as a
logon there does it (``ProfileCopies.bring_chain``), over a slowed link (``--chunk-ms`` per
256 KiB: the layers are small, and a copy must last long enough to be cut). It prints
``ready``, waits for ``go``, then ``done SECONDS LAYERS BYTES``.

``recover``: the restarted broker's crash recovery: ``recover_sessions`` with the disks the
hypervisor still has plugged in, then, for a layer still open and still plugged in (the
broker died before detaching), the reconciler's logoff again (``end_session``); and the
copies between hosts whose process died (``ProfileCopies.recover``, run as the reconciler
would once their records are stale).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deskpool.config import Settings
from deskpool.domain.profiles import LayerState, disk_serial
from deskpool.drivers.fake.remote import RemoteFakeDriver
from deskpool.drivers.registry import open_driver
from deskpool.services.context import ServiceContext
from deskpool.services.profile_copies import STALE_AFTER, ProfileCopies
from deskpool.services.profiles import ProfileService, attached_serials

USER = "ann"


def broker(ctx: ServiceContext, service: ProfileService, args: argparse.Namespace) -> None:
    driver = open_driver(args.hypervisor)
    layer_id, vm_id = uuid.UUID(args.layer), uuid.UUID(args.vm)
    with ctx.uow(read_only=True) as uow:
        uow.profiles.layer(layer_id)  # warm the database connection before the cut window
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    if args.guest_answered:
        logoff = service.end_session(layer_id, driver, vm_id)
    else:
        driver.stop_vm(vm_id, force=True)  # QEMU is gone already; this makes it official
        logoff = service.abandon_session(
            layer_id, "its guest did not answer session-hook end; the desktop was powered off")
    print(f"done {time.monotonic() - started:.3f} committed={logoff.committed}", flush=True)


def copy(ctx: ServiceContext, service: ProfileService, args: argparse.Namespace) -> None:
    top, host_b = uuid.UUID(args.layer), uuid.UUID(args.host_b)
    plain = RemoteFakeDriver.read_volume

    def slowed(self: RemoteFakeDriver, name: str, *, chunk_bytes: int = 0) -> Iterator[bytes]:
        for chunk in plain(self, name, chunk_bytes=256 * 1024):
            time.sleep(args.chunk_ms / 1000)
            yield chunk

    RemoteFakeDriver.read_volume = slowed  # type: ignore[method-assign]
    copies = ProfileCopies(ctx)
    copies.lacking(USER, top, host_b)  # warm the database connection before the cut window
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    result = copies.bring_chain(USER, top, host_b)
    print(f"done {time.monotonic() - started:.3f} {len(result.layers)} {result.bytes_copied}",
          flush=True)


def recover(ctx: ServiceContext, service: ProfileService, args: argparse.Namespace) -> None:
    # A killed copy's record is stale after STALE_AFTER; the reconciler's later pass is
    # played now.
    ProfileCopies(ctx).recover(now=datetime.now(UTC) + STALE_AFTER + timedelta(seconds=1))
    driver = open_driver(args.hypervisor)
    layer_id, vm_id = uuid.UUID(args.layer), uuid.UUID(args.vm)
    # The reconciler only counts layers older than a minute (a hand-over may be plugging a
    # disk in); nothing is being handed over here, so every open layer counts.
    service.recover_sessions(attached_serials([driver]),
                             started_before=datetime.now(UTC) + timedelta(seconds=5))
    with ctx.uow(read_only=True) as uow:
        state = uow.profiles.layer(layer_id).state
    outcome = "recovered"
    if state is LayerState.SESSION and disk_serial(layer_id) in driver.attached_disks(vm_id):
        logoff = service.end_session(layer_id, driver, vm_id)
        outcome = "logged off again: " + ("committed" if logoff.committed else "set aside")
    print(outcome, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("broker", "recover", "copy"))
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--profile-dir", type=Path, required=True)
    parser.add_argument("--hypervisor", required=True)
    parser.add_argument("--vm", required=True)
    parser.add_argument("--layer", required=True)
    parser.add_argument("--guest-answered", type=int, default=1)
    parser.add_argument("--host-b", default="")
    parser.add_argument("--chunk-ms", type=float, default=20.0)
    args = parser.parse_args()
    ctx = ServiceContext(Settings(data_dir=args.data_dir, database_url=args.database_url))
    service = ProfileService(ctx, args.profile_dir)
    try:
        {"broker": broker, "recover": recover, "copy": copy}[args.role](ctx, service, args)
    finally:
        ctx.close()


if __name__ == "__main__":
    main()

"""P4: an offline desktop's check-in against rsync of the same image.

A desktop checked out on the fake driver (no VM) gets an encrypted layer of about
``--layer-mib`` MiB (written through ``qemu-io`` and synced, so both ends hold it), then the
"guest" changes about ``--changed-mib`` MiB: half as scattered 4 KiB writes, half as new
files' worth of contiguous 256 KiB writes. The check-in runs through the real code path
(``deskpool offline checkin``: plan, HTTP upload to a real server in this process, the
server's verification and atomic commit); rsync (``--no-whole-file --inplace``: its delta
algorithm, its best case for bytes) copies the same laptop layer onto a copy of the
server's layer, between the same two directories.

Prints ``P4t <check-in seconds / rsync seconds>`` (target <= 0.3), then last
``P4 <bytes sent at check-in / bytes the guest changed>`` (target <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from offline_world import LAPTOP, OFFLINE_PASSWORD, offline_bench

from deskpool.cli import offline_user
from deskpool.cli.laptop.store import LaptopDir
from deskpool.domain.offline_keys import KeyBinding, UserWrappedKey, unwrap_for_user
from deskpool.images.offline_layers import layer_spec

MiB = 2**20
BLOCK = 4096
FILE_RUN = 256 * 1024


def qemu_io(layer: Path, key: bytes, commands: list[str]) -> None:
    for start in range(0, len(commands), 400):  # one process per write would dominate
        read_fd, write_fd = os.pipe()
        os.write(write_fd, key.hex().encode())
        os.close(write_fd)
        args = [a for c in commands[start : start + 400] for a in ("-c", c)]
        try:
            subprocess.run(
                [
                    "qemu-io",
                    "--object",
                    f"secret,id=layerkey0,file=/dev/fd/{read_fd}",
                    *args,
                    layer_spec(layer, with_backing=True),
                ],
                check=True,
                pass_fds=(read_fd,),
                capture_output=True,
            )
        finally:
            os.close(read_fd)


def guest_changes(disk: int, changed: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) of half scattered 4 KiB writes, half 256 KiB file runs, distinct."""
    rnd = random.Random(seed)
    runs = rnd.sample(range(disk // FILE_RUN), (changed // 2) // FILE_RUN)
    writes = [(r * FILE_RUN, FILE_RUN) for r in runs]
    taken = {r * (FILE_RUN // BLOCK) + b for r in runs for b in range(FILE_RUN // BLOCK)}
    free = [
        b for b in rnd.sample(range(disk // BLOCK), 4 * (changed // 2) // BLOCK) if b not in taken
    ]
    writes += [(b * BLOCK, BLOCK) for b in free[: (changed // 2) // BLOCK]]
    return sorted(writes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-mib", type=int, default=1024)
    parser.add_argument("--changed-mib", type=int, default=20)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="work here (default: a temp dir)")
    args = parser.parse_args()
    disk = 2 * args.layer_mib * MiB
    print(f"seed {args.seed}")
    with (
        tempfile.TemporaryDirectory(prefix="p4-", dir=args.dir) as tmp,
        offline_bench(Path(tmp) / "world", disk_bytes=disk) as b,
    ):
        b.offline("checkout", "home-01", "--laptop", LAPTOP, "--quiet", password=True)
        here = LaptopDir(b.laptop_dir)
        rec = here.load("home-01")
        key = unwrap_for_user(
            UserWrappedKey.from_json(rec.wrapped_key),
            OFFLINE_PASSWORD,
            KeyBinding(rec.user, uuid.UUID(rec.desktop_id), rec.laptop),
        )
        layer = here.layer(rec)
        qemu_io(
            layer,
            key,
            [f"write -q -P 0x3c {o} {64 * MiB}" for o in range(0, args.layer_mib * MiB, 64 * MiB)],
        )
        b.offline("sync", "home-01", "--quiet", "--libvirt-uri", "test:///default")
        print(f"layer {layer.stat().st_size / MiB:.0f} MiB on both ends after the first sync")

        writes = guest_changes(disk, args.changed_mib * MiB, args.seed)
        rnd = random.Random(args.seed)
        qemu_io(layer, key, [f"write -q -P {rnd.randrange(1, 255)} {o} {n}" for o, n in writes])
        changed = sum(n for _, n in writes)

        # rsync: the laptop's layer onto a copy of the server's, beside it.
        server = b.server_layer()
        target = server.parent.parent / "rsync-copy" / "layer.qcow2"
        target.parent.mkdir()
        shutil.copyfile(server, target)
        started = time.perf_counter()
        rsync = subprocess.run(
            ["rsync", "--no-whole-file", "--inplace", "--stats", str(layer), str(target)],
            check=True,
            capture_output=True,
            text=True,
        )
        rsync_s = time.perf_counter() - started
        rsync_sent = next(
            line for line in rsync.stdout.splitlines() if line.startswith("Total bytes sent")
        )

        sent: list[Any] = []
        real_upload = offline_user.upload

        def counting_upload(*a: Any, **kw: Any) -> Any:
            result = real_upload(*a, **kw)
            sent.append(result)
            return result

        offline_user.upload = counting_upload  # type: ignore[assignment]
        started = time.perf_counter()
        b.offline("checkin", "home-01", "--quiet", "--libvirt-uri", "test:///default")
        checkin_s = time.perf_counter() - started
        (result,) = sent
        print(
            f"guest changed {changed / MiB:.1f} MiB in {len(writes)} writes over a "
            f"{disk // MiB} MiB disk"
        )
        print(
            f"check-in: {checkin_s:.2f} s, sent {result.bytes_sent} B "
            f"({result.bytes_sent / MiB:.2f} MiB)"
        )
        print(f"rsync --no-whole-file: {rsync_s:.2f} s, {rsync_sent}")
        print(f"P4t {checkin_s / rsync_s:.3f}")
        print(f"P4 {result.bytes_sent / changed:.3f}")


if __name__ == "__main__":
    main()

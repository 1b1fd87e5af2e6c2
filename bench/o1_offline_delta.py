"""O1: bytes an offline desktop's check-in sends against the bytes the guest changed.

An encrypted offline layer (``deskpool.images.offline_layers``: LUKS, 128 KiB clusters with
4 KiB subclusters) is checked in as the changed 4 KiB blocks of its file (``layer_delta``).
Besides the data, each check-in carries the qcow2 metadata pages the writes changed (one L2
page per 32 MiB of disk touched, zlib-compressed) and a 49-byte entry per chunk. This bench
writes seeded 4 KiB patterns with ``qemu-io`` in three shapes and prints sent / changed:

* clustered: files of 32 consecutive blocks (what a guest writing files mostly does);
* uniform: blocks spread at random over the whole disk;
* worst: one block in each of N distinct 32 MiB regions (every write needs its own L2 page).

Not a timed test; no VM. Last line: ``O1 <ratio>`` for the clustered shape (issue 15's
target: <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from deskpool.domain.offline_keys import new_data_key
from deskpool.images.layer_delta import BLOCK_SIZE, block_manifest, plan_delta
from deskpool.images.offline_layers import create_encrypted_layer, layer_spec

GiB = 2**30
REGION = 32 * 2**20


def qemu_io(layer: Path, key: bytes, commands: list[str]) -> None:
    for start in range(0, len(commands), 200):  # one process per write would dominate
        read_fd, write_fd = os.pipe()
        os.write(write_fd, key.hex().encode())
        os.close(write_fd)
        args = [a for c in commands[start:start + 200] for a in ("-c", c)]
        try:
            subprocess.run(["qemu-io", "--object",
                            f"secret,id=layerkey0,file=/dev/fd/{read_fd}", *args,
                            layer_spec(layer, with_backing=True)],
                           check=True, pass_fds=(read_fd,), capture_output=True)
        finally:
            os.close(read_fd)


def shapes(disk: int, writes: int, seed: int) -> dict[str, list[int]]:
    rnd = random.Random(seed)
    starts = rnd.sample(range(disk // (32 * BLOCK_SIZE)), writes // 32)
    clustered = sorted((s * 32 + b) * BLOCK_SIZE for s in starts for b in range(32))
    uniform = sorted(o * BLOCK_SIZE for o in rnd.sample(range(disk // BLOCK_SIZE), writes))
    regions = rnd.sample(range(disk // REGION), min(writes, disk // REGION))
    worst = sorted(r * REGION + rnd.randrange(REGION // BLOCK_SIZE) * BLOCK_SIZE
                   for r in regions)
    return {"clustered": clustered, "uniform": uniform, "worst": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-gib", type=int, default=8)
    parser.add_argument("--writes", type=int, default=512)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    disk = args.disk_gib * GiB
    with tempfile.TemporaryDirectory(prefix="o1-") as tmp:
        root = Path(tmp)
        base, made = root / "base.qcow2", root / "made.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(disk)],
                       check=True)
        key = new_data_key()
        create_encrypted_layer(made, base, key)
        ratios = {}
        for name, offsets in shapes(disk, args.writes, args.seed).items():
            layer = root / f"{name}.qcow2"
            shutil.copyfile(made, layer)
            qemu_io(layer, key, [f"write -q -P 0x5c {o} {BLOCK_SIZE}" for o in offsets])
            delta = plan_delta(layer, block_manifest(made), "0" * 64)
            changed = len(offsets) * BLOCK_SIZE
            ratios[name] = delta.wire_bytes() / changed
            print(f"{name:10} {len(offsets):6} writes over {args.disk_gib} GiB: changed "
                  f"{changed:>9} B, sent {delta.wire_bytes():>9} B "
                  f"({len(delta.chunks)} chunks), ratio {ratios[name]:.3f}")
    print(f"O1 {ratios['clustered']:.3f}")


if __name__ == "__main__":
    main()

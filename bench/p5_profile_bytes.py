"""P5b, block level: bytes a profile session overlay holds against the bytes the guest changed.

A profile layer is committed in place and copied between hosts as a file, so what a logoff
"writes back" (and a later copy carries) is the session overlay's allocated bytes. This bench
writes the same scattered 4 KiB writes (``qemu-io -c 'write ...'``, seeded offsets, each in a
cluster of its own) into overlays of three layouts, on one backing file full of data (a
profile that has content, so a partial cluster write must copy or avoid copying real data):

* 64 KiB clusters (qcow2's default): each 4 KiB write copies its whole cluster;
* 64 KiB clusters with ``extended_l2=on`` (what ``deskpool.images.profile_disks`` uses);
* 4 KiB clusters.

Bytes held = the overlay's allocated size (``st_blocks``) after the writes minus before.
Not a timed test: it prints ratios. Last line: ``P5b <held / changed>`` for deskpool's layout
(issue 13's target: <= 1.3).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
from pathlib import Path

from deskpool.images.profile_disks import QCOW2_OPTIONS, allocated_bytes, create_overlay

MiB = 2**20
LAYOUTS = {
    "64k": "cluster_size=65536",
    "64k+subclusters": QCOW2_OPTIONS,
    "4k": "cluster_size=4096",
}


def qemu_io(path: Path, commands: list[str]) -> None:
    # Batches of commands per process: one qemu-io per write would dominate the run time.
    for start in range(0, len(commands), 200):
        argv = ["qemu-io", "-f", "qcow2"]
        for command in commands[start:start + 200]:
            argv += ["-c", command]
        subprocess.run([*argv, str(path)], check=True, capture_output=True)


def overlay(base: Path, path: Path, options: str) -> Path:
    if options == QCOW2_OPTIONS:
        return create_overlay(base, path)  # the project's own code path
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name,
                    "-o", options, str(path)], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="profile size")
    parser.add_argument("--writes", type=int, default=2000, help="scattered 4 KiB writes")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    size = args.size_mib * MiB
    clusters = size // 65536
    if args.writes > clusters:
        parser.error(f"--writes {args.writes} exceeds the {clusters} 64 KiB clusters")
    rng = random.Random(args.seed)
    # One write per 64 KiB cluster at a random 4 KiB slot in it: scattered, never merged.
    offsets = [c * 65536 + rng.randrange(16) * 4096
               for c in rng.sample(range(clusters), args.writes)]
    writes = [f"write -P 0x5a {offset} 4k" for offset in offsets]
    changed = len(writes) * 4096
    with tempfile.TemporaryDirectory(prefix="p5-profile-") as scratch:
        base = Path(scratch) / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", QCOW2_OPTIONS,
                        str(base), str(size)], check=True)
        qemu_io(base, [f"write -P 0x11 {o} 16M" for o in range(0, size, 16 * MiB)])
        print(f"profile {args.size_mib} MiB (all data), {len(writes)} scattered 4 KiB writes "
              f"= {changed} bytes changed")
        ratios: dict[str, float] = {}
        for name, options in LAYOUTS.items():
            layer = overlay(base, Path(scratch) / f"{name}.qcow2", options)
            before = allocated_bytes(layer)
            qemu_io(layer, writes)
            held = allocated_bytes(layer) - before
            ratios[name] = held / changed
            print(f"{name:>16}: overlay holds {held} bytes, {ratios[name]:.2f}x changed")
    print(f"P5b {ratios['64k+subclusters']:.2f}")


if __name__ == "__main__":
    main()

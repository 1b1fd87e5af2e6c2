"""Which blocks of a laptop's layer file may have changed since its last sync, without reading
the layer (nor decrypting anything: qcow2 metadata is plain, only guest data is LUKS).

Every layer carries a persistent dirty bitmap, ``deskpool-sync`` (4 KiB granularity, added
when the layer is made, see ``offline_layers``): QEMU, whether the laptop's libvirt domain
or ``qemu-io``, loads it when it opens the layer and sets a bit for every guest 4 KiB it
writes or discards, and stores it back when it closes. After each sync the laptop clears it
(``clear_sync_bitmap``), and keeps the guest-to-file cluster map of the layer as synced
(``cluster_map``). The blocks that may differ are then:

* every block of the file that is not a guest data cluster (headers, the LUKS header, L1/L2
  tables, refcounts, the bitmaps themselves, free space): a few MiB, always read;
* each dirty 4 KiB, where the guest cluster lies in the file now and where it lay at the sync;
* every cluster whose place in the file moved since the sync (both places).

A data cluster still in its place with no dirty bit in it was not written through QEMU, the
only writer of the layer. Whenever that cannot be known — no bitmap, a bitmap QEMU marks
in use or inconsistent (a crash), bitmaps the header says are stale, compressed clusters, no
map of the last sync — ``changed_ranges`` says None and the laptop reads the whole layer.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

SYNC_BITMAP = "deskpool-sync"
BLOCK = 4096
_QCOW_MAGIC = 0x514649FB
_BITMAPS_EXT = 0x23852875
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COMPRESSED = 1 << 62
_INCOMPAT_EXTL2 = 1 << 4
_IN_USE = 1


@dataclass(frozen=True)
class Qcow2Header:
    cluster_size: int
    size: int
    l1_offset: int
    l1_size: int
    l2_entry: int  # bytes per L2 entry: 16 with extended L2
    bitmaps_valid: bool  # the autoclear bit: the bitmaps extension is to be trusted
    bitmap_dir: tuple[int, int] | None  # offset, size


def read_header(f: os.PathLike[str] | Path) -> Qcow2Header | None:
    with open(f, "rb") as fh:
        head = fh.read(4096)
    if len(head) < 104 or struct.unpack_from(">I", head)[0] != _QCOW_MAGIC:
        return None
    (_, version, _, _, cluster_bits, size, _, l1_size, l1_offset, _, _, _, _
     ) = struct.unpack_from(">IIQIIQIIQQIIQ", head)
    if version < 3:
        return None
    incompat, _, autoclear, _, header_length = struct.unpack_from(">QQQII", head, 72)
    bitmap_dir = None
    at = header_length
    while at + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, at)
        if kind == 0:
            break
        if kind == _BITMAPS_EXT and length >= 24:
            _, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", head, at + 8)
            bitmap_dir = (dir_offset, dir_size)
        at += 8 + (length + 7) // 8 * 8
    return Qcow2Header(cluster_size=1 << cluster_bits, size=size, l1_offset=l1_offset,
                       l1_size=l1_size, l2_entry=16 if incompat & _INCOMPAT_EXTL2 else 8,
                       bitmaps_valid=bool(autoclear & 1), bitmap_dir=bitmap_dir)


def cluster_map(layer: Path) -> bytes | None:
    """The file offset of each guest cluster (0: not in this layer), as little-endian
    uint64s; None for a layer this cannot read (compressed clusters, not qcow2 v3)."""
    header = read_header(layer)
    if header is None:
        return None
    per_l2 = header.cluster_size // header.l2_entry
    guest_clusters = -(-header.size // header.cluster_size)
    found = array("Q", bytes(8 * guest_clusters))
    with layer.open("rb") as f:
        f.seek(header.l1_offset)
        l1 = f.read(8 * header.l1_size)
        for i in range(header.l1_size):
            (entry,) = struct.unpack_from(">Q", l1, 8 * i)
            l2_offset = entry & _OFFSET_MASK
            if not l2_offset:
                continue
            f.seek(l2_offset)
            l2 = f.read(header.cluster_size)
            for k in range(per_l2):
                c = i * per_l2 + k
                if c >= guest_clusters:
                    break
                (desc,) = struct.unpack_from(">Q", l2, k * header.l2_entry)
                if desc & _COMPRESSED:
                    return None
                found[c] = desc & _OFFSET_MASK
    return found.tobytes()


@dataclass(frozen=True)
class _Bitmap:
    granularity: int
    table: list[int]  # bitmap table entries
    table_offset: int
    in_use: bool


def _sync_bitmap(layer: Path, header: Qcow2Header) -> _Bitmap | None:
    if header.bitmap_dir is None:
        return None
    offset, size = header.bitmap_dir
    with layer.open("rb") as f:
        f.seek(offset)
        directory = f.read(size)
        at = 0
        while at + 24 <= len(directory):
            (table_offset, table_size, flags, _, gran_bits, name_size, extra
             ) = struct.unpack_from(">QIIBBHI", directory, at)
            name = directory[at + 24 + extra:at + 24 + extra + name_size].decode("utf-8",
                                                                                "replace")
            if name == SYNC_BITMAP:
                f.seek(table_offset)
                raw = f.read(8 * table_size)
                table = [struct.unpack_from(">Q", raw, 8 * i)[0] for i in range(table_size)]
                return _Bitmap(granularity=1 << gran_bits, table=table,
                               table_offset=table_offset, in_use=bool(flags & _IN_USE))
            at += (24 + extra + name_size + 7) // 8 * 8
    return None


def _dirty_bits(layer: Path, header: Qcow2Header, bitmap: _Bitmap) -> bytes:
    """The bitmap's bits end to end (bit i of byte j: granule 8j+i)."""
    out = bytearray()
    with layer.open("rb") as f:
        for entry in bitmap.table:
            host = entry & _OFFSET_MASK
            if host:
                f.seek(host)
                out += f.read(header.cluster_size).ljust(header.cluster_size, b"\0")
            else:
                out += (b"\xff" if entry & 1 else b"\0") * header.cluster_size
    return bytes(out)


def changed_ranges(layer: Path, synced_map: bytes | None, synced_size: int,
                   now_map: bytes | None = None) -> list[tuple[int, int]] | None:
    """(first block, count) ranges of ``layer`` that may differ from the layer as last
    synced (``synced_size`` bytes, whose ``cluster_map`` is ``synced_map``); None: read it
    all. Past ``synced_size`` the file grew: a new cluster there holds zeros (a hole) except
    where the guest wrote, so only its dirty granules are named (the plan takes the rest as
    zeros, as the server's copy grown to the new size has them). ``now_map``: the layer's
    ``cluster_map``, if the caller has it."""
    header = read_header(layer)
    if header is None or synced_map is None or not header.bitmaps_valid:
        return None
    bitmap = _sync_bitmap(layer, header)
    now_map = now_map or cluster_map(layer)
    if bitmap is None or bitmap.in_use or now_map is None or len(now_map) != len(synced_map):
        return None
    cs = header.cluster_size
    new, old = array("Q"), array("Q")
    new.frombytes(now_map)
    old.frombytes(synced_map)
    size = os.stat(layer).st_size
    per_cluster = cs // BLOCK
    blocks: set[int] = set()
    # Every block that is no data cluster of the guest's.
    data = sorted({h for h in new if h})
    at = 0
    for host in [*data, -(-size // cs) * cs]:
        blocks.update(range(at // BLOCK, min(host, size + BLOCK - 1) // BLOCK))
        at = host + cs
    # Clusters that moved: both places (a new one in the grown part: its dirty granules).
    for c in range(len(new)):
        if new[c] != old[c]:
            for host in (new[c], old[c]):
                if host and host < synced_size:
                    blocks.update(range(host // BLOCK, host // BLOCK + per_cluster))
    # Dirty granules, where they lie now and where they lay.
    bits = _dirty_bits(layer, header, bitmap)
    gran = bitmap.granularity
    for j, byte in enumerate(bits):
        if not byte:
            continue
        for i in range(8):
            if not byte >> i & 1:
                continue
            start = (8 * j + i) * gran
            for guest in range(start - start % BLOCK, min(start + gran, header.size), BLOCK):
                c, within = divmod(guest, cs)
                if c >= len(new):
                    break
                for host in (new[c], old[c]):
                    if host:
                        blocks.add((host + within) // BLOCK)
    last = -(-size // BLOCK)
    ranges: list[tuple[int, int]] = []
    for b in sorted(n for n in blocks if 0 <= n < last):
        if ranges and ranges[-1][0] + ranges[-1][1] == b:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((b, 1))
    return ranges


def clear_sync_bitmap(layer: Path) -> bool:
    """Zero the sync bitmap's bits in place (the layer closed, as synced). False, leaving the
    file alone, when it has no usable bitmap. Zeroing its data clusters changes no
    allocation: the clusters stay the bitmap's, now all zeros."""
    header = read_header(layer)
    if header is None or not header.bitmaps_valid:
        return False
    bitmap = _sync_bitmap(layer, header)
    if bitmap is None or bitmap.in_use:
        return False
    fd = os.open(layer, os.O_RDWR)
    try:
        for i, entry in enumerate(bitmap.table):
            host = entry & _OFFSET_MASK
            if host:
                os.pwrite(fd, bytes(header.cluster_size), host)
            elif entry & 1:  # "all ones" without a cluster: make it "all zeros"
                os.pwrite(fd, bytes(8), bitmap.table_offset + 8 * i)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True

"""Check-in of an offline desktop's layer: the changed 4 KiB blocks travel, the server applies
them in place under an undo journal (``layer_apply``), and only a verified copy is committed.

What travels is the laptop's encrypted layer file itself, block by block (ciphertext), not the
decrypted guest data. Why:

* the laptop never writes or sends plaintext: no spool, journal or stream holds the guest's
  data in the clear, whatever the transport;
* the server keeps the layer exactly as the laptop has it, byte for byte, so "both ends agree"
  is one digest (``BlockManifest.digest``), and the next check-out hands out that same file;
* the server can still open it (``qemu-img check`` before committing, recovery by an admin):
  it holds the escrowed data key.
The price is qcow2 metadata: a 4 KiB page of L2 table or refcounts changes with the data it
maps (one L2 page per 32 MiB of disk with ``offline_layers``' geometry). Those pages are
mostly zeros, so chunks that compress well travel zlib-compressed: writes scattered one per
32 MiB then cost 1.02x the bytes written instead of 2.0x (``bench/o1_offline_delta.py``).

Which blocks changed is decided against a ``BlockManifest`` (sha256 per 4 KiB block) of the
server's current copy: the laptop keeps the one of its last sync, and reads only the blocks
that may have changed since (``layer_changes``: the layer's own dirty bitmap), or all of them
when it cannot know. A block the manifest does not know, or
whose hash differs, is sent; runs of zeros past the server copy's end are not (growing the
file makes them). Every check-in names the copy it was made against (``since_sha256``) and
the base under it, and is refused, leaving the server's copy untouched, if either differs.

Resuming: the server journals each applied chunk after its bytes are on disk (and the bytes
it overwrote before), so a transfer cut anywhere goes on with the chunks the journal lacks, or
is undone (``layer_apply``). A chunk whose checksum does not match is refused before anything
is written, and is sent again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from deskpool.domain.errors import InvalidInput, PermanentError, TemporaryError

BLOCK_SIZE = 4096
MAX_CHUNK = 1024 * 1024
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_HASH = hashlib.sha256(_ZERO_BLOCK).digest()
_MANIFEST_MAGIC = b"DPMANIF2"
_DELTA_MAGIC = b"DPDELTA1"
# offset, length, bytes on the wire, flags, sha256: 49 bytes per chunk in the plan
_CHUNK = struct.Struct("<QIIB32s")
_FLAG_ZERO = 1
_FLAG_ZLIB = 2
# Compress a chunk only when that saves at least this share: ciphertext never compresses,
# qcow2 metadata pages (a few 16-byte L2 entries in 4 KiB) shrink to tens of bytes.
_WORTH_COMPRESSING = 0.75
_DIGEST_TAG = b"DPLAYER1"  # what a layer digest hashes first: its kind


class CheckinRefused(PermanentError):
    """The check-in cannot apply as sent (another base, another starting copy, a mismatch);
    the server's copy was left as it was."""


class ChunkRejected(TemporaryError):
    """One chunk arrived damaged; nothing of it was written. Send it again."""


class LayerChangedDuringCheckin(PermanentError):
    """The laptop's layer changed after the check-in was planned (the desktop is running?)."""


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(BLOCK_SIZE):
            yield block


def _pack_meta(magic: bytes, meta: dict[str, object]) -> bytes:
    text = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return magic + struct.pack("<I", len(text)) + text


def _unpack_meta(magic: bytes, data: bytes, what: str) -> tuple[dict[str, object], bytes]:
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        raise InvalidInput(f"this is not a {what}")
    (size,) = struct.unpack_from("<I", data, len(magic))
    start = len(magic) + 4
    try:
        meta = json.loads(data[start:start + size])
    except ValueError:
        raise InvalidInput(f"the {what}'s header is not JSON") from None
    if not isinstance(meta, dict):
        raise InvalidInput(f"the {what}'s header is not an object")
    return meta, data[start + size:]


def _int(meta: dict[str, object], key: str) -> int:
    value = meta.get(key)
    if type(value) is not int or value < 0:
        raise InvalidInput(f"field {key} must be a non-negative integer")
    return value


def _hex64(meta: dict[str, object], key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or len(value) != 64:
        raise InvalidInput(f"field {key} must be a sha256 in hex")
    bytes.fromhex(value)
    return value


@dataclass(frozen=True)
class BlockManifest:
    """A layer file's size and the sha256 of each 4 KiB block (the last one may be short),
    packed end to end: 32 bytes per 4 KiB of file (0.8%), one bytes object, so a large
    layer's manifest is not millions of Python objects.

    Its ``digest`` names the file's content as well as a whole-file sha256 would (it hashes
    the size and every block's sha256), but can be brought up to date from the blocks that
    changed alone: neither end of a check-in reads the whole layer to know what it is."""

    file_size: int
    hashes: bytes

    @property
    def digest(self) -> str:
        return layer_digest_of(self.file_size, self.hashes)

    def block_hash(self, number: int) -> bytes | None:
        """Block ``number``'s sha256, or None past the end of the file."""
        if not 0 <= number < len(self.hashes) // 32:
            return None
        return self.hashes[number * 32:number * 32 + 32]

    def encode(self) -> bytes:
        return _pack_meta(_MANIFEST_MAGIC, {"file_size": self.file_size,
                                            "block_size": BLOCK_SIZE}) + self.hashes

    @classmethod
    def decode(cls, data: bytes) -> BlockManifest:
        meta, rest = _unpack_meta(_MANIFEST_MAGIC, data, "block manifest")
        if meta.get("block_size") != BLOCK_SIZE:
            raise InvalidInput(f"the block manifest is not in {BLOCK_SIZE}-byte blocks")
        size = _int(meta, "file_size")
        if len(rest) != 32 * -(-size // BLOCK_SIZE):
            raise InvalidInput("the block manifest's hash list does not match its file size")
        return cls(file_size=size, hashes=rest)


def layer_digest_of(size: int, hashes: bytes) -> str:
    return hashlib.sha256(_DIGEST_TAG + size.to_bytes(8, "little") + hashes).hexdigest()


def block_manifest(path: Path) -> BlockManifest:
    hashes = bytearray()
    size = 0
    for block in _blocks(path):
        hashes += hashlib.sha256(block).digest()
        size += len(block)
    return BlockManifest(file_size=size, hashes=bytes(hashes))


def layer_digest(path: Path) -> str:
    """What a layer file is, as check-out, download and check-in name it (a whole read)."""
    return block_manifest(path).digest


def file_sha256(path: Path) -> str:
    whole = hashlib.sha256()
    for block in _blocks(path):
        whole.update(block)
    return whole.hexdigest()


@dataclass(frozen=True)
class DeltaChunk:
    index: int
    offset: int
    length: int
    sha256: bytes  # of the chunk's bytes as they land (zeros for a zero chunk)
    zero: bool  # no payload travels: the server writes ``length`` zero bytes
    compressed: bool = False  # the payload is zlib; the server inflates it to ``length``
    wire_length: int = -1  # payload bytes that travel; -1: ``length`` (or 0 when zero)

    def __post_init__(self) -> None:
        if self.wire_length == -1:
            object.__setattr__(self, "wire_length", 0 if self.zero else self.length)


@dataclass(frozen=True)
class LayerDelta:
    """The plan of one check-in: what the server's copy must become and the chunks that make
    it so. Its encoded form is what travels first; the chunks' bytes follow one by one."""

    base_sha256: str
    since_sha256: str  # the server copy this applies to
    target_sha256: str  # the laptop's layer file, whole
    target_size: int
    chunks: tuple[DeltaChunk, ...]

    def encode(self) -> bytes:
        meta = {"base_sha256": self.base_sha256, "since_sha256": self.since_sha256,
                "target_sha256": self.target_sha256, "target_size": self.target_size,
                "chunks": len(self.chunks)}
        return _pack_meta(_DELTA_MAGIC, meta) + b"".join(
            _CHUNK.pack(c.offset, c.length, c.wire_length,
                        (_FLAG_ZERO if c.zero else 0) | (_FLAG_ZLIB if c.compressed else 0),
                        c.sha256)
            for c in self.chunks)

    @classmethod
    def decode(cls, data: bytes) -> LayerDelta:
        meta, rest = _unpack_meta(_DELTA_MAGIC, data, "layer delta")
        count = _int(meta, "chunks")
        if len(rest) != count * _CHUNK.size:
            raise InvalidInput("the layer delta's chunk table is truncated")
        target_size = _int(meta, "target_size")
        chunks = []
        for index in range(count):
            offset, length, wire, flags, digest = _CHUNK.unpack_from(rest,
                                                                     index * _CHUNK.size)
            if not 0 < length <= MAX_CHUNK or offset + length > target_size:
                raise InvalidInput(f"chunk {index} lies outside the layer")
            zero, compressed = bool(flags & _FLAG_ZERO), bool(flags & _FLAG_ZLIB)
            if (zero and (compressed or wire != 0)) or (compressed and not 0 < wire < length) \
                    or (not zero and not compressed and wire != length):
                raise InvalidInput(f"chunk {index} has an impossible size on the wire")
            chunks.append(DeltaChunk(index=index, offset=offset, length=length,
                                     sha256=digest, zero=zero, compressed=compressed,
                                     wire_length=wire))
        return cls(base_sha256=_hex64(meta, "base_sha256"),
                   since_sha256=_hex64(meta, "since_sha256"),
                   target_sha256=_hex64(meta, "target_sha256"), target_size=target_size,
                   chunks=tuple(chunks))

    def identity(self) -> str:
        """Names this exact check-in in the server's journal."""
        return _sha256_hex(self.encode())

    def payload_bytes(self) -> int:
        return sum(c.wire_length for c in self.chunks)

    def wire_bytes(self) -> int:
        """Everything the laptop uploads: the plan and the chunks' bytes."""
        return len(self.encode()) + self.payload_bytes()


def plan_delta(layer: Path, since: BlockManifest, base_sha256: str) -> LayerDelta:
    """The chunks that turn the server's copy (described by ``since``) into ``layer``."""
    return plan_with_manifest(layer, since, base_sha256)[0]


def plan_with_manifest(layer: Path, since: BlockManifest, base_sha256: str,
                       candidates: list[tuple[int, int]] | None = None,
                       ) -> tuple[LayerDelta, BlockManifest]:
    """``plan_delta`` and the manifest of ``layer`` as planned (the server's copy once the
    plan is committed): the laptop's next ``since``.

    ``candidates``: the only block ranges (first block, count) that may differ from
    ``since`` (``layer_changes`` knows them without reading the layer); every other block is
    taken as ``since`` has it, or as zeros past its end (the server grows its copy with
    zeros). None: read the whole file. Either way the blocks at the old and the new end are
    read."""
    size = os.stat(layer).st_size
    count, old_count = -(-size // BLOCK_SIZE), -(-since.file_size // BLOCK_SIZE)
    hashes = bytearray(since.hashes[:32 * min(count, old_count)])
    hashes += _ZERO_HASH * (count - len(hashes) // 32)
    reads = [(0, count)] if candidates is None else _with_the_end(candidates, old_count, count)
    chunks: list[DeltaChunk] = []
    run: list[bytes] = []
    run_start = run_len = 0
    run_zero = False

    def close_run() -> None:
        nonlocal run_len
        if run:
            data = b"".join(run)
            # Ciphertext never compresses: a run whose first block does not is sent as it is
            # (compressing 20 MiB of it cost more than planning the rest).
            packed = b"" if run_zero or _incompressible(run[0]) else zlib.compress(data, 1)
            compressed = bool(packed) and len(packed) <= _WORTH_COMPRESSING * len(data)
            chunks.append(DeltaChunk(
                index=len(chunks), offset=run_start, length=len(data),
                sha256=hashlib.sha256(data).digest(), zero=run_zero, compressed=compressed,
                wire_length=len(packed) if compressed else -1))
            run.clear()
            run_len = 0

    with layer.open("rb") as f:
        for number, block in _read_ranges(f, reads):
            offset = number * BLOCK_SIZE
            digest = hashlib.sha256(block).digest()
            hashes[32 * number:32 * number + 32] = digest
            known = since.block_hash(number) == digest
            zero = not known and (block == _ZERO_BLOCK if len(block) == BLOCK_SIZE
                                  else not any(block))
            # Zeros past the server copy's end appear when it grows to the new size.
            if known or (zero and offset >= since.file_size):
                close_run()
                continue
            if run and (run_zero != zero or run_start + run_len != offset
                        or run_len + len(block) > MAX_CHUNK):
                close_run()
            if not run:
                run_start, run_zero = offset, zero
            run.append(block)
            run_len += len(block)
    close_run()
    manifest = BlockManifest(file_size=size, hashes=bytes(hashes))
    return (LayerDelta(base_sha256=base_sha256, since_sha256=since.digest,
                       target_sha256=manifest.digest, target_size=size, chunks=tuple(chunks)),
            manifest)


def _incompressible(block: bytes) -> bool:
    """Looks like ciphertext: 256 random bytes hold about 162 distinct values, text or
    sparse data far fewer. (Asking zlib cost 35-50 µs a block, most of planning; a wrong
    guess only sends a run uncompressed.)"""
    sample = block[:256]
    return len(sample) == 256 and len(set(sample)) >= 128


def _with_the_end(ranges: list[tuple[int, int]], old_count: int,
                  count: int) -> list[tuple[int, int]]:
    """``ranges`` and the last block of the old and the new file, merged, sorted, within it."""
    wanted = sorted([*ranges, (max(old_count - 1, 0), 1), (max(count - 1, 0), 1)])
    merged: list[tuple[int, int]] = []
    for first, n in wanted:
        end = min(first + n, count)
        if end <= first:
            continue
        if merged and first <= merged[-1][0] + merged[-1][1]:
            last_first, last_n = merged[-1]
            merged[-1] = (last_first, max(last_n, end - last_first))
        else:
            merged.append((first, end - first))
    return merged


def _read_ranges(f: BinaryIO, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(block number, block) of each range, read 1 MiB at a time."""
    step = MAX_CHUNK // BLOCK_SIZE
    for first, n in ranges:
        for at in range(first, first + n, step):
            f.seek(at * BLOCK_SIZE)
            data = f.read(min(step, first + n - at) * BLOCK_SIZE)
            for k in range(0, len(data), BLOCK_SIZE):
                yield at + k // BLOCK_SIZE, data[k:k + BLOCK_SIZE]


def read_chunk(layer: Path, chunk: DeltaChunk) -> bytes:
    """A chunk's payload as it travels, its bytes checked against the plan first: the
    laptop's end of the checksums."""
    if chunk.zero:
        return b""
    with layer.open("rb") as f:
        f.seek(chunk.offset)
        data = f.read(chunk.length)
    if hashlib.sha256(data).digest() != chunk.sha256:
        raise LayerChangedDuringCheckin(
            f"the layer changed at byte {chunk.offset} after the check-in was planned; "
            "shut the desktop down and check in again")
    # zlib may pack the same bytes differently elsewhere; the server checks what it inflates.
    return zlib.compress(data, 1) if chunk.compressed else data


def inflate_chunk(data: bytes, chunk: DeltaChunk) -> bytes:
    """At most ``chunk.length`` bytes, whatever the payload claims (no zip bomb)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, chunk.length)
    except zlib.error:
        raise ChunkRejected(f"chunk {chunk.index} arrived damaged (it does not inflate); "
                            "nothing was written, send it again") from None
    if not inflater.eof or inflater.unconsumed_tail:
        raise ChunkRejected(f"chunk {chunk.index} arrived damaged (wrong inflated size); "
                            "nothing was written, send it again")
    return out


class ChunkReceiver(Protocol):
    """The server's end as the laptop sees it (in-process here, an API call later)."""

    def missing(self) -> list[int]: ...

    def apply_chunk(self, index: int, data: bytes) -> None: ...


@dataclass
class TransferStats:
    chunks_sent: int = 0
    bytes_sent: int = 0
    resent: int = 0


def send_delta(layer: Path, delta: LayerDelta, receiver: ChunkReceiver, *,
               max_resends: int = 3, stats: TransferStats | None = None) -> TransferStats:
    """Send what the receiver still lacks. Call again after a cut: it sends only the rest."""
    stats = stats or TransferStats()
    for index in receiver.missing():
        chunk = delta.chunks[index]
        for attempt in range(max_resends + 1):
            data = read_chunk(layer, chunk)
            stats.chunks_sent += 1
            stats.bytes_sent += len(data)
            try:
                receiver.apply_chunk(index, data)
                break
            except ChunkRejected:
                stats.resent += 1
                if attempt == max_resends:
                    raise
    return stats

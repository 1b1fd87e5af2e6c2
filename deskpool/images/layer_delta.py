"""Check-in of an offline desktop's layer: the changed 4 KiB blocks travel, the server applies
them to a staging copy, and only a verified copy becomes current, by one atomic rename.

What travels is the laptop's encrypted layer file itself, block by block (ciphertext), not the
decrypted guest data. Why:

* the laptop never writes or sends plaintext: no spool, journal or stream holds the guest's
  data in the clear, whatever the transport;
* the server keeps the layer exactly as the laptop has it, byte for byte, so "both ends agree"
  is one whole-file sha256, and the next check-out hands out that same file;
* the server can still open it (``qemu-img check`` before committing, recovery by an admin):
  it holds the escrowed data key.
The price is qcow2 metadata: a 4 KiB page of L2 table or refcounts changes with the data it
maps (one L2 page per 32 MiB of disk with ``offline_layers``' geometry). Those pages are
mostly zeros, so chunks that compress well travel zlib-compressed: writes scattered one per
32 MiB then cost 1.02x the bytes written instead of 2.0x (``bench/o1_offline_delta.py``).

Which blocks changed is decided against a ``BlockManifest`` (sha256 per 4 KiB block) of the
server's current copy: the laptop keeps the one of its last sync and asks the server for its
manifest only when the whole-file checksums disagree. A block the manifest does not know, or
whose hash differs, is sent; runs of zeros past the server copy's end are not (growing the
file makes them). Every check-in names the copy it was made against (``since_sha256``) and
the base under it, and is refused, leaving the server's copy untouched, if either differs.

Resuming: the server journals each applied chunk (index and sha256) after the chunk's bytes are
on disk, so a transfer cut anywhere (an exception, a killed process, a lost connection) goes on
with the chunks the journal lacks. Applying a chunk twice writes the same bytes. A chunk whose
checksum does not match is refused before anything is written, and is sent again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deskpool.domain.errors import InvalidInput, PermanentError, TemporaryError
from deskpool.images.builder import fsync_path
from deskpool.images.offline_layers import check_layer

BLOCK_SIZE = 4096
MAX_CHUNK = 1024 * 1024
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_MANIFEST_MAGIC = b"DPMANIF1"
_DELTA_MAGIC = b"DPDELTA1"
# offset, length, bytes on the wire, flags, sha256: 49 bytes per chunk in the plan
_CHUNK = struct.Struct("<QIIB32s")
_FLAG_ZERO = 1
_FLAG_ZLIB = 2
# Compress a chunk only when that saves at least this share: ciphertext never compresses,
# qcow2 metadata pages (a few 16-byte L2 entries in 4 KiB) shrink to tens of bytes.
_WORTH_COMPRESSING = 0.75
_JOURNAL = "journal"
_STAGED = "layer.staged"


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
    """A layer file's whole-file sha256 and the sha256 of each 4 KiB block (the last one may
    be short), packed end to end: 32 bytes per 4 KiB of file (0.8%), one bytes object, so
    a large layer's manifest is not millions of Python objects."""

    file_size: int
    file_sha256: str
    hashes: bytes

    def block_hash(self, number: int) -> bytes | None:
        """Block ``number``'s sha256, or None past the end of the file."""
        if not 0 <= number < len(self.hashes) // 32:
            return None
        return self.hashes[number * 32:number * 32 + 32]

    def encode(self) -> bytes:
        return _pack_meta(_MANIFEST_MAGIC, {"file_size": self.file_size,
                                            "file_sha256": self.file_sha256,
                                            "block_size": BLOCK_SIZE}) + self.hashes

    @classmethod
    def decode(cls, data: bytes) -> BlockManifest:
        meta, rest = _unpack_meta(_MANIFEST_MAGIC, data, "block manifest")
        if meta.get("block_size") != BLOCK_SIZE:
            raise InvalidInput(f"the block manifest is not in {BLOCK_SIZE}-byte blocks")
        size = _int(meta, "file_size")
        if len(rest) != 32 * -(-size // BLOCK_SIZE):
            raise InvalidInput("the block manifest's hash list does not match its file size")
        return cls(file_size=size, file_sha256=_hex64(meta, "file_sha256"), hashes=rest)


def block_manifest(path: Path) -> BlockManifest:
    whole = hashlib.sha256()
    hashes = bytearray()
    size = 0
    for block in _blocks(path):
        whole.update(block)
        hashes += hashlib.sha256(block).digest()
        size += len(block)
    return BlockManifest(file_size=size, file_sha256=whole.hexdigest(), hashes=bytes(hashes))


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


def plan_with_manifest(layer: Path, since: BlockManifest,
                       base_sha256: str) -> tuple[LayerDelta, BlockManifest]:
    """``plan_delta`` and the manifest of ``layer`` as planned (the server's copy once the
    plan is committed), from one read of the file: the laptop's next ``since``."""
    whole = hashlib.sha256()
    hashes = bytearray()
    chunks: list[DeltaChunk] = []
    run: list[bytes] = []
    run_start = run_len = 0
    run_zero = False

    def close_run() -> None:
        nonlocal run_len
        if run:
            data = b"".join(run)
            packed = b"" if run_zero else zlib.compress(data, 1)
            compressed = not run_zero and len(packed) <= _WORTH_COMPRESSING * len(data)
            chunks.append(DeltaChunk(
                index=len(chunks), offset=run_start, length=len(data),
                sha256=hashlib.sha256(data).digest(), zero=run_zero, compressed=compressed,
                wire_length=len(packed) if compressed else -1))
            run.clear()
            run_len = 0

    offset = 0
    for number, block in enumerate(_blocks(layer)):
        whole.update(block)
        digest = hashlib.sha256(block).digest()
        hashes += digest
        known = since.block_hash(number) == digest
        zero = not known and (block == _ZERO_BLOCK if len(block) == BLOCK_SIZE
                              else not any(block))
        # Zeros past the server copy's end appear when it grows to the new size.
        if known or (zero and offset >= since.file_size):
            close_run()
        else:
            if run and (run_zero != zero or run_start + run_len != offset
                        or run_len + len(block) > MAX_CHUNK):
                close_run()
            if not run:
                run_start, run_zero = offset, zero
            run.append(block)
            run_len += len(block)
        offset += len(block)
    close_run()
    target = whole.hexdigest()
    return (LayerDelta(base_sha256=base_sha256, since_sha256=since.file_sha256,
                       target_sha256=target, target_size=offset, chunks=tuple(chunks)),
            BlockManifest(file_size=offset, file_sha256=target, hashes=bytes(hashes)))


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


class StagedCheckin:
    """The server's end of one check-in into ``current`` (the desktop's encrypted layer).

    Made again after any interruption with the same arguments, it resumes: the staged copy and
    its journal in ``staging_dir`` (same filesystem as ``current``) carry over. ``current`` is
    only ever replaced whole, by ``commit``. One check-in per desktop at a time: the caller
    serializes them (the desktop's ``checked_out`` state), as it does every other write.
    """

    def __init__(self, current: Path, staging_dir: Path, delta: LayerDelta, *,
                 expected_base_sha256: str) -> None:
        if delta.base_sha256 != expected_base_sha256:
            raise CheckinRefused(
                f"the check-in was made on base image sha256 {delta.base_sha256[:16]}..., but "
                f"this desktop's base is {expected_base_sha256[:16]}...; nothing was applied "
                "(the laptop must fetch the right base and check out again)")
        self.current, self.staging_dir, self.delta = current, staging_dir, delta
        self.staged = staging_dir / _STAGED
        self.journal = staging_dir / _JOURNAL
        self._current_identity = _identity(current)
        current_sha = file_sha256(current)
        # Cut after commit's rename: the check-in is done, only the answer was lost.
        self.committed = current_sha == delta.target_sha256 != delta.since_sha256
        if not self.committed:
            self._check_current_unchanged(current_sha)
        staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(staging_dir).st_dev != os.stat(current).st_dev:
            raise InvalidInput(f"{staging_dir} must be on the same filesystem as {current}")
        self.done: dict[int, bytes] = {}
        if self.committed:
            self._discard()
            self.done = {c.index: c.sha256 for c in delta.chunks}
            self.resumed = True
            return
        self.done = self._read_journal()
        self.resumed = self.journal.exists() and self.staged.exists()
        if not self.resumed:
            self._start_fresh()

    # --- set-up and resume -------------------------------------------------------------

    def _check_current_unchanged(self, current_sha: str | None = None) -> None:
        if (current_sha or file_sha256(self.current)) != self.delta.since_sha256:
            raise CheckinRefused(
                "the server's copy of this layer is not the one the check-in was made against "
                "(another check-in came first); nothing was applied, plan the check-in again")

    def _read_journal(self) -> dict[int, bytes]:
        """Chunks already applied, if the journal is this delta's; else start over."""
        if not self.journal.exists():
            return {}
        lines = self.journal.read_bytes().split(b"\n")
        if not lines or lines[0].decode("ascii", "replace") != self.delta.identity():
            self._discard()
            return {}
        done: dict[int, bytes] = {}
        for line in lines[1:]:  # a line cut by a crash has no newline and fails to parse
            parts = line.split(b" ")
            if len(parts) != 2 or not parts[0].isdigit():
                continue
            index = int(parts[0])
            if index < len(self.delta.chunks) and \
                    parts[1] == self.delta.chunks[index].sha256.hex().encode():
                done[index] = self.delta.chunks[index].sha256
        return done

    def _discard(self) -> None:
        self.staged.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def _start_fresh(self) -> None:
        self._discard()
        self.done = {}
        partial = self.staging_dir / (_STAGED + ".copying")
        shutil.copyfile(self.current, partial)
        os.chmod(partial, 0o600)
        with partial.open("r+b") as f:
            f.truncate(self.delta.target_size)  # growing writes the zeros plan_delta skipped
            os.fsync(f.fileno())
        os.replace(partial, self.staged)
        # The journal appears last: with it present, the staged copy is known complete.
        with self.journal.open("wb") as f:
            f.write(self.delta.identity().encode("ascii") + b"\n")
            os.fsync(f.fileno())
        fsync_path(self.staging_dir)

    # --- transfer --------------------------------------------------------------------

    def missing(self) -> list[int]:
        return [c.index for c in self.delta.chunks if c.index not in self.done]

    def apply_chunk(self, index: int, data: bytes) -> None:
        if not 0 <= index < len(self.delta.chunks):
            raise InvalidInput(f"this check-in has no chunk {index}")
        chunk = self.delta.chunks[index]
        if chunk.zero:
            if data:
                raise ChunkRejected(f"chunk {index} is a zero chunk and carries no bytes")
            data = bytes(chunk.length)
        elif chunk.compressed:
            data = _inflate(data, chunk)
        if len(data) != chunk.length or hashlib.sha256(data).digest() != chunk.sha256:
            raise ChunkRejected(f"chunk {index} arrived damaged (checksum mismatch); "
                                "nothing was written, send it again")
        fd = os.open(self.staged, os.O_WRONLY)
        try:
            os.pwrite(fd, data, chunk.offset)
            os.fsync(fd)  # the bytes are down before the journal says so
        finally:
            os.close(fd)
        with self.journal.open("ab") as f:
            f.write(f"{index} {chunk.sha256.hex()}\n".encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        self.done[index] = chunk.sha256

    # --- the end -----------------------------------------------------------------------

    def commit(self, data_key: bytes) -> None:
        """Check the staged copy and make it current, or refuse and keep ``current``.
        Committing a check-in that is already committed does nothing."""
        if self.committed:
            return
        if self.missing():
            raise ChunkRejected(f"{len(self.missing())} chunk(s) not received yet")
        check_layer(self.staged, data_key)
        if file_sha256(self.staged) != self.delta.target_sha256:
            self._discard()  # a copy that does not match is never resumed either
            raise CheckinRefused("the staged layer's checksum differs from the laptop's; it "
                                 "was discarded and the current copy kept; check in again")
        if _identity(self.current) != self._current_identity:
            self._check_current_unchanged()  # replaced or touched since it was hashed
        os.replace(self.staged, self.current)
        self.committed = True
        fsync_path(self.current.parent)
        self.journal.unlink()
        fsync_path(self.staging_dir)

    def abort(self) -> None:
        self._discard()


def _identity(path: Path) -> tuple[int, int, int, int]:
    """Which file, at what size and modification time: a copy replaced by a rename or
    written in place shows a different one, so hashing it again is only needed then."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _inflate(data: bytes, chunk: DeltaChunk) -> bytes:
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

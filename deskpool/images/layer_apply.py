"""The server's end of a check-in: the sent blocks are written into the layer in place, under
an undo journal, so a cut at any point leaves a copy that becomes the old one or the new one,
never a half-applied one that anything uses.

Before copying the whole layer to a staging file took most of a check-in's time (and its
rehash at commit most of the rest); writing only the changed blocks costs what they weigh.

The journal (``staging/undo``, beside the layer, same filesystem) is append-only records,
each closed by a CRC so a record torn by a crash ends the journal there:

* ``H`` its header: which plan (``LayerDelta.identity``) and the layer's size before;
* ``U`` the old bytes of one chunk's range, on disk (fsync) *before* the chunk is written over
  them; ``T`` the same for the tail cut off when the layer shrinks;
* ``A`` a chunk applied (its bytes on disk): the resume point;
* ``C`` committed: the new copy was verified (``qemu-img check``, each sent chunk read back
  and its sha256 checked, the new block manifest's digest equal to the laptop's), the new
  manifest is on disk; from here the journal is only cleared, never undone;
* ``R`` rolling back: from here the journal is only undone, never resumed.

Undo writes every ``U``/``T`` record's bytes back and truncates the layer to its old size:
idempotent, so a cut during an undo is finished by the next one. Which blocks a copy holds is
its ``BlockManifest`` (``<layer>.manifest``), kept up to date by the commit and stamped with
the layer file's identity, so nothing needs to read the whole layer to know what it is; a
manifest whose stamp does not match (the layer replaced at check-out) is made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from deskpool.domain.errors import InvalidInput
from deskpool.images.builder import fsync_path
from deskpool.images.layer_delta import (
    BLOCK_SIZE,
    BlockManifest,
    CheckinRefused,
    ChunkRejected,
    DeltaChunk,
    LayerDelta,
    block_manifest,
    inflate_chunk,
)
from deskpool.images.offline_layers import check_layer

_UNDO = "undo"
_REC = struct.Struct("<cIQI")  # kind, chunk index, offset, payload length
_CRC = struct.Struct("<I")
_TAIL = 0xFFFFFFFF


def manifest_path(layer: Path) -> Path:
    return layer.with_name(layer.name + ".manifest")


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _write_synced(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def save_manifest(layer: Path, manifest: BlockManifest) -> None:
    """``manifest`` as the layer's own, stamped with the layer file as it is now."""
    stamped = manifest.encode()
    _write_synced(manifest_path(layer),
                  json.dumps(_stamp(layer)).encode("ascii") + b"\n" + stamped)
    fsync_path(layer.parent)


def _read_manifest(layer: Path) -> tuple[list[int], BlockManifest] | None:
    try:
        stamp, _, data = manifest_path(layer).read_bytes().partition(b"\n")
        return json.loads(stamp), BlockManifest.decode(data)
    except (OSError, ValueError, InvalidInput):
        return None


def layer_manifest(layer: Path) -> BlockManifest:
    """The layer's block manifest: the kept one while it matches the file, else made again
    (a whole read) and kept."""
    kept = _read_manifest(layer)
    if kept is not None and kept[0] == _stamp(layer):
        return kept[1]
    made = block_manifest(layer)
    save_manifest(layer, made)
    return made


@dataclass
class _Journal:
    """What a journal on disk says (records up to the first torn one)."""

    identity: str = ""
    old_size: int = 0
    undo: list[tuple[int, int, bytes]] = field(default_factory=list)  # index, offset, bytes
    applied: set[int] = field(default_factory=set)
    committed: bool = False
    rolling_back: bool = False
    good_length: int = 0

    @property
    def undone(self) -> set[int]:
        return {index for index, _, _ in self.undo}


def _record(kind: bytes, index: int = 0, offset: int = 0, payload: bytes = b"") -> bytes:
    head = _REC.pack(kind, index, offset, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(head + payload))


def _parse(path: Path) -> _Journal | None:
    """None when there is no journal or not even its header survived."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    found, at, view = _Journal(), 0, memoryview(data)
    while at + _REC.size + _CRC.size <= len(data):
        kind, index, offset, length = _REC.unpack_from(data, at)
        end = at + _REC.size + length
        if end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(view[at:end]) != crc:
            break
        payload = bytes(view[at + _REC.size:end])
        if kind == b"H":
            header = json.loads(payload)
            found.identity, found.old_size = header["identity"], header["old_size"]
        elif not found.identity:
            break
        elif kind in (b"U", b"T"):
            found.undo.append((index, offset, payload))
        elif kind == b"A":
            found.applied.add(index)
        elif kind == b"C":
            found.committed = True
        elif kind == b"R":
            found.rolling_back = True
        at = end + _CRC.size
        found.good_length = at
    return found if found.identity else None


def _append(path: Path, records: Iterable[bytes], *, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"".join(records))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _clear(layer: Path, staging_dir: Path) -> None:
    manifest_path(layer).with_name(manifest_path(layer).name + ".next").unlink(missing_ok=True)
    (staging_dir / _UNDO).unlink(missing_ok=True)
    if staging_dir.is_dir():
        fsync_path(staging_dir)


def roll_back(layer: Path, staging_dir: Path) -> bool:
    """Undo a transfer in flight (none: nothing to do): the layer is again exactly as it was
    before it began, and its manifest says so. A committed one is only cleared. True if a
    transfer was undone."""
    journal = _parse(staging_dir / _UNDO)
    if journal is None:
        _clear(layer, staging_dir)
        return False
    if journal.committed and not journal.rolling_back:
        _finalize(layer, staging_dir)
        return False
    if not journal.rolling_back:
        _append(staging_dir / _UNDO, [_record(b"R")])
    fd = os.open(layer, os.O_RDWR)
    try:
        for _, offset, old in reversed(journal.undo):  # a cut-off tail extends it back
            os.pwrite(fd, old, offset)
        os.ftruncate(fd, journal.old_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    kept = _read_manifest(layer)
    if kept is not None:  # the bytes it describes are back: stamp it with the file again
        save_manifest(layer, kept[1])
    _clear(layer, staging_dir)
    return True


def transfer_in_flight(staging_dir: Path) -> bool:
    """A journal is on disk: the layer may hold part of a transfer (never to be read)."""
    journal = _parse(staging_dir / _UNDO)
    return journal is not None and not journal.committed


def _finalize(layer: Path, staging_dir: Path) -> None:
    nxt = manifest_path(layer).with_name(manifest_path(layer).name + ".next")
    if nxt.exists():
        os.replace(nxt, manifest_path(layer))
        fsync_path(layer.parent)
    (staging_dir / _UNDO).unlink(missing_ok=True)
    fsync_path(staging_dir)


class InPlaceCheckin:
    """The server's end of one check-in (or sync) into ``current`` (the desktop's layer).

    Made again after any interruption with the same arguments, it resumes from its journal in
    ``staging_dir``; made with another plan, it first undoes the one in flight. One transfer
    per desktop at a time: the caller serializes them, as it does every other write.
    """

    def __init__(self, current: Path, staging_dir: Path, delta: LayerDelta, *,
                 expected_base_sha256: str) -> None:
        if delta.base_sha256 != expected_base_sha256:
            raise CheckinRefused(
                f"the check-in was made on base image sha256 {delta.base_sha256[:16]}..., but "
                f"this desktop's base is {expected_base_sha256[:16]}...; nothing was applied "
                "(the laptop must fetch the right base and check out again)")
        if not current.is_file():
            raise InvalidInput(f"{current} does not exist")
        self.current, self.staging_dir, self.delta = current, staging_dir, delta
        self.journal = staging_dir / _UNDO
        self.committed = self.resumed = self.aborted = self._begin_again = False
        self.done: set[int] = set()
        self._undone: set[int] = set()
        found = _parse(self.journal)
        if found is not None and (found.identity != delta.identity() or found.rolling_back):
            roll_back(current, staging_dir)
            found = None
        if found is not None and found.committed:
            _finalize(current, staging_dir)
            found = None
        if found is not None:  # resume: the manifest describes the layer as it was before
            kept = _read_manifest(current)
            if kept is None:
                roll_back(current, staging_dir)
                found = None
            else:
                self._old, self._old_size = kept[1], found.old_size
                self.done, self._undone = set(found.applied), found.undone
                self.resumed = True
                self._ensure_size()
                return
        self._old = layer_manifest(current)
        self._old_size = self._old.file_size
        if self._old.digest == delta.target_sha256 != delta.since_sha256:
            # Cut after the commit: the check-in is done, only its answer was lost.
            self.committed, self.resumed = True, True
            self.done = {c.index for c in delta.chunks}
            return
        if self._old.digest != delta.since_sha256:
            raise CheckinRefused(
                "the server's copy of this layer is not the one the check-in was made against "
                "(another check-in came first); nothing was applied, plan the check-in again")
        staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(staging_dir).st_dev != os.stat(current).st_dev:
            raise InvalidInput(f"{staging_dir} must be on the same filesystem as {current}")
        self._begin()

    def _begin(self) -> None:
        """A new journal for this plan over the layer as it is (the old copy)."""
        self.done, self._undone, self.resumed = set(), set(), False
        self.journal.unlink(missing_ok=True)
        header = json.dumps({"identity": self.delta.identity(), "old_size": self._old_size})
        _append(self.journal, [_record(b"H", payload=header.encode("ascii"))])
        fsync_path(self.staging_dir)
        self._ensure_size()

    def _ensure_size(self) -> None:
        """The layer at the plan's size: grown with zeros (undone by truncating), or cut with
        the tail kept in the journal first."""
        size = os.stat(self.current).st_size
        target = self.delta.target_size
        if size == target:
            return
        if size > target and _TAIL not in self._undone:
            with self.current.open("rb") as f:
                f.seek(target)
                tail = f.read(size - target)
            _append(self.journal, [_record(b"T", _TAIL, target, tail)])
            self._undone.add(_TAIL)
        fd = os.open(self.current, os.O_RDWR)
        try:
            os.ftruncate(fd, target)
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- transfer --------------------------------------------------------------------

    def missing(self) -> list[int]:
        return [c.index for c in self.delta.chunks if c.index not in self.done]

    def apply_chunk(self, index: int, data: bytes) -> None:
        self.apply_chunks([(index, data)])

    def apply_chunks(self, items: list[tuple[int, bytes]]) -> None:
        """Several chunks: each checked against the plan first; those before a damaged one
        are applied (and journalled) before it is refused."""
        if self.aborted:
            raise InvalidInput("this transfer was undone; open it again")
        good: list[tuple[DeltaChunk, bytes]] = []
        refused: ChunkRejected | None = None
        for index, data in items:
            if not 0 <= index < len(self.delta.chunks):
                if good:
                    break
                raise InvalidInput(f"this check-in has no chunk {index}")
            try:
                good.append((self.delta.chunks[index], _payload(self.delta.chunks[index], data)))
            except ChunkRejected as exc:
                refused = exc
                break
        if self.committed:
            good = []
        if good and self._begin_again:
            self._begin_again = False
            self._begin()
        if good:
            self._write(good)
        if refused is not None:
            raise refused

    def _write(self, good: list[tuple[DeltaChunk, bytes]]) -> None:
        undo = []
        fd = os.open(self.current, os.O_RDWR)
        try:
            for chunk, _ in good:
                if chunk.index in self._undone:
                    continue  # its bytes before any write are already kept
                end = min(chunk.offset + chunk.length, self._old_size, self.delta.target_size)
                old = os.pread(fd, end - chunk.offset, chunk.offset) \
                    if end > chunk.offset else b""
                undo.append(_record(b"U", chunk.index, chunk.offset, old))
                self._undone.add(chunk.index)
            if undo:
                _append(self.journal, undo)  # the old bytes are down before they go
            for chunk, data in good:
                os.pwrite(fd, data, chunk.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Not synced: an ``A`` lost in a crash only makes the chunk travel and land again
        # (its ``U``, synced, keeps the bytes from before any write).
        _append(self.journal, [_record(b"A", chunk.index) for chunk, _ in good], sync=False)
        self.done.update(chunk.index for chunk, _ in good)

    # --- the end -----------------------------------------------------------------------

    def commit(self, data_key: bytes) -> None:
        """Verify the layer as applied and make it the current copy for good, or undo it
        all (``CheckinRefused``) and keep the old copy. Committing twice does nothing."""
        if self.committed:
            return
        if self.aborted:
            raise InvalidInput("this transfer was undone; open it again")
        if self.missing():
            raise ChunkRejected(f"{len(self.missing())} chunk(s) not received yet")
        try:
            check_layer(self.current, data_key)
        except Exception:
            roll_back(self.current, self.staging_dir)
            self._restart()
            raise
        manifest = self._new_manifest()
        if manifest is None or manifest.digest != self.delta.target_sha256:
            roll_back(self.current, self.staging_dir)
            self._restart()
            raise CheckinRefused("the applied layer's checksum differs from the laptop's; it "
                                 "was undone and the current copy kept; check in again")
        nxt = manifest_path(self.current).with_name(manifest_path(self.current).name + ".next")
        _write_synced(nxt, json.dumps(_stamp(self.current)).encode("ascii") + b"\n"
                      + manifest.encode())
        _append(self.journal, [_record(b"C")])  # the commit point
        self.committed = True
        _finalize(self.current, self.staging_dir)

    def abort(self) -> None:
        """Undo it all and end it: the layer is the old copy, no journal is left."""
        roll_back(self.current, self.staging_dir)
        self.done, self._undone, self.aborted = set(), set(), True

    def _restart(self) -> None:
        """After a refused commit (undone, the old copy exactly, no journal): the same plan
        may be sent again from the start, a new journal begun with its first chunk."""
        self.done, self._undone, self.resumed, self._begin_again = set(), set(), False, True

    def _new_manifest(self) -> BlockManifest | None:
        """The old manifest with the sent chunks' blocks as read back from disk (each chunk's
        sha256 checked again: the server's end of the checksums), zeros where the layer grew,
        and the blocks at the old and the new end hashed again. None when a chunk on disk
        is not what the plan says."""
        size = self.delta.target_size
        count = -(-size // BLOCK_SIZE)
        old_count = -(-self._old_size // BLOCK_SIZE)
        hashes = bytearray(self._old.hashes[:32 * min(count, old_count)])
        zero = hashlib.sha256(bytes(BLOCK_SIZE)).digest()
        hashes += zero * (count - len(hashes) // 32)
        with self.current.open("rb") as f:
            for chunk in self.delta.chunks:
                f.seek(chunk.offset)
                data = f.read(chunk.length)
                if hashlib.sha256(data).digest() != chunk.sha256:
                    return None
                first = chunk.offset // BLOCK_SIZE
                for n in range(0, len(data), BLOCK_SIZE):
                    at = 32 * (first + n // BLOCK_SIZE)
                    hashes[at:at + 32] = hashlib.sha256(data[n:n + BLOCK_SIZE]).digest()
            for number in {old_count - 1, count - 1}:
                if 0 <= number < count:
                    f.seek(number * BLOCK_SIZE)
                    hashes[32 * number:32 * number + 32] = hashlib.sha256(
                        f.read(BLOCK_SIZE)).digest()
        return BlockManifest(file_size=size, hashes=bytes(hashes))


def _payload(chunk: DeltaChunk, data: bytes) -> bytes:
    if chunk.zero:
        if data:
            raise ChunkRejected(f"chunk {chunk.index} is a zero chunk and carries no bytes")
        data = bytes(chunk.length)
    elif chunk.compressed:
        data = inflate_chunk(data, chunk)
    if len(data) != chunk.length or hashlib.sha256(data).digest() != chunk.sha256:
        raise ChunkRejected(f"chunk {chunk.index} arrived damaged (checksum mismatch); "
                            "nothing was written, send it again")
    return data

"""The check-in delta on plain files: which blocks travel, the wire format, the journal.
(The qcow2 end to end, commit included, is tests/functional/test_offline_layers.py.)"""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from pathlib import Path

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.images.layer_apply import InPlaceCheckin as StagedCheckin
from deskpool.images.layer_delta import (
    BLOCK_SIZE,
    MAX_CHUNK,
    BlockManifest,
    ChunkRejected,
    LayerDelta,
    block_manifest,
    file_sha256,
    plan_delta,
    read_chunk,
    send_delta,
)

BASE = "cd" * 32


def blocks(*contents: bytes) -> bytes:
    """4 KiB blocks: zeros for b"\\0", else bytes as random as ciphertext, one kind per letter."""
    return b"".join(bytes(BLOCK_SIZE) if c == b"\0" else random.Random(c).randbytes(BLOCK_SIZE)
                    for c in contents)


def sync(server: Path, laptop: Path, staging: Path) -> LayerDelta:
    """Plan and apply (no commit: these are not qcow2 files); return the plan."""
    delta = plan_delta(laptop, block_manifest(server), BASE)
    staged = StagedCheckin(server, staging, delta, expected_base_sha256=BASE)
    send_delta(laptop, delta, staged)
    assert file_sha256(server) == file_sha256(laptop)
    assert block_manifest(laptop).digest == delta.target_sha256
    return delta


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "server", tmp_path / "laptop", tmp_path / "staging"


def test_only_changed_blocks_travel_and_zeros_past_the_end_not_at_all(
        files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    server.write_bytes(blocks(b"a", b"b", b"c", b"d"))
    # Block 1 changed, block 3 zeroed (inside the old file), then the file grew by four
    # blocks: zeros, data, zeros, zeros.
    laptop.write_bytes(blocks(b"a", b"B", b"c", b"\0", b"\0", b"E", b"\0", b"\0"))
    delta = sync(server, laptop, staging)
    sent = [(c.offset // BLOCK_SIZE, c.length // BLOCK_SIZE, c.zero) for c in delta.chunks]
    assert sent == [(1, 1, False), (3, 1, True), (5, 1, False)]
    assert delta.payload_bytes() == 2 * BLOCK_SIZE  # the zero chunk carries no bytes
    assert read_chunk(laptop, delta.chunks[1]) == b""


def test_adjacent_changes_merge_up_to_the_chunk_limit(files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    count = MAX_CHUNK // BLOCK_SIZE + 3
    server.write_bytes(blocks(*[b"x"] * count))
    laptop.write_bytes(blocks(*[b"y"] * count))
    delta = sync(server, laptop, staging)
    assert [c.length for c in delta.chunks] == [MAX_CHUNK, 3 * BLOCK_SIZE]


def test_a_shrunk_layer_is_truncated(files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    server.write_bytes(blocks(b"a", b"b", b"c"))
    laptop.write_bytes(blocks(b"a"))
    delta = sync(server, laptop, staging)
    assert delta.chunks == () and delta.target_size == BLOCK_SIZE


def test_the_plan_and_manifest_round_trip_and_refuse_garbage(
        files: tuple[Path, Path, Path]) -> None:
    server, laptop, _ = files
    server.write_bytes(blocks(b"a", b"b"))
    laptop.write_bytes(blocks(b"a", b"c", b"d"))
    manifest = block_manifest(server)
    assert BlockManifest.decode(manifest.encode()) == manifest
    assert manifest.digest == block_manifest(server).digest != hashlib.sha256(b'').hexdigest()
    delta = plan_delta(laptop, manifest, BASE)
    encoded = delta.encode()
    assert LayerDelta.decode(encoded) == delta
    assert len(encoded) < 300 + 49 * len(delta.chunks)
    with pytest.raises(InvalidInput, match="truncated"):
        LayerDelta.decode(encoded[:-1])
    with pytest.raises(InvalidInput, match="not a layer delta"):
        LayerDelta.decode(b"garbage")
    with pytest.raises(InvalidInput, match="does not match its file size"):
        BlockManifest.decode(manifest.encode()[:-32])
    # A chunk that points past the layer's end is refused before anything is written.
    bad = delta.encode().replace(
        delta.chunks[0].offset.to_bytes(8, "little") + delta.chunks[0].length.to_bytes(4, "little"),
        (10 * MAX_CHUNK).to_bytes(8, "little") + delta.chunks[0].length.to_bytes(4, "little"))
    with pytest.raises(InvalidInput, match="outside the layer"):
        LayerDelta.decode(bad)


def test_a_torn_journal_line_is_sent_again(files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    server.write_bytes(blocks(b"a", b"b", b"c", b"d"))
    laptop.write_bytes(blocks(b"A", b"b", b"C", b"d"))
    delta = plan_delta(laptop, block_manifest(server), BASE)
    staged = StagedCheckin(server, staging, delta, expected_base_sha256=BASE)
    staged.apply_chunk(0, read_chunk(laptop, delta.chunks[0]))
    staged.apply_chunk(1, read_chunk(laptop, delta.chunks[1]))
    journal = staging / "undo"
    journal.write_bytes(journal.read_bytes()[:-7])  # the crash cut the last record
    resumed = StagedCheckin(server, staging, delta, expected_base_sha256=BASE)
    assert resumed.resumed and resumed.missing() == [1]
    # Staged data and journal stay private to the server's user.
    assert os.stat(staging).st_mode & 0o777 == 0o700
    assert os.stat(journal).st_mode & 0o777 == 0o600


def test_a_zero_chunk_carrying_bytes_is_refused(files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    server.write_bytes(blocks(b"a"))
    laptop.write_bytes(blocks(b"\0"))
    delta = plan_delta(laptop, block_manifest(server), BASE)
    assert delta.chunks[0].zero
    staged = StagedCheckin(server, staging, delta, expected_base_sha256=BASE)
    with pytest.raises(ChunkRejected, match="zero chunk"):
        staged.apply_chunk(0, b"\0" * BLOCK_SIZE)
    with pytest.raises(InvalidInput, match="no chunk 5"):
        staged.apply_chunk(5, b"")
    staged.apply_chunk(0, b"")
    assert server.read_bytes() == laptop.read_bytes()


def test_metadata_like_blocks_travel_compressed_and_land_exact(
        files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    server.write_bytes(blocks(b"a", b"\0", b"b"))
    # An L2 page gaining one 16-byte entry: mostly zeros, a little noise.
    page = bytearray(BLOCK_SIZE)
    page[512:528] = random.Random(1).randbytes(16)
    content = bytearray(blocks(b"a", b"\0", b"b"))
    content[BLOCK_SIZE:2 * BLOCK_SIZE] = page
    laptop.write_bytes(bytes(content))
    delta = sync(server, laptop, staging)
    (chunk,) = delta.chunks
    assert chunk.compressed and not chunk.zero and chunk.wire_length < 100
    assert delta.payload_bytes() == chunk.wire_length
    assert len(read_chunk(laptop, chunk)) == chunk.wire_length


def test_a_damaged_or_oversized_compressed_chunk_is_refused(
        files: tuple[Path, Path, Path]) -> None:
    server, laptop, staging = files
    server.write_bytes(blocks(b"a", b"\0"))
    page = bytearray(BLOCK_SIZE)
    page[0:16] = b"L2 entry here..."
    laptop.write_bytes(blocks(b"a") + bytes(page))
    delta = plan_delta(laptop, block_manifest(server), BASE)
    (chunk,) = delta.chunks
    assert chunk.compressed
    staged = StagedCheckin(server, staging, delta, expected_base_sha256=BASE)
    before = file_sha256(server)
    good = read_chunk(laptop, chunk)
    bomb = zlib.compress(bytes(64 * BLOCK_SIZE))  # inflates far past the chunk's length
    for bad in (good[:-3], b"not zlib at all", bomb, zlib.compress(bytes(BLOCK_SIZE))):
        with pytest.raises(ChunkRejected, match="damaged"):
            staged.apply_chunk(chunk.index, bad)
    assert file_sha256(server) == before
    staged.apply_chunk(chunk.index, good)
    assert server.read_bytes() == laptop.read_bytes()

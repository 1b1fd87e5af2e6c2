"""How a laptop cuts a check-in into requests, and which runs it compresses."""

from __future__ import annotations

import os
import zlib

from deskpool.cli.laptop import transfers
from deskpool.cli.laptop.transfers import batches
from deskpool.images.layer_delta import DeltaChunk, LayerDelta, _incompressible


def delta_of(count: int, length: int) -> LayerDelta:
    return LayerDelta(base_sha256="0" * 64, since_sha256="0" * 64, target_sha256="0" * 64,
                      target_size=count * length, chunks=tuple(
                          DeltaChunk(index=i, offset=i * length, length=length,
                                     sha256=b"\0" * 32, zero=False) for i in range(count)))


def test_batches_hold_every_chunk_once_in_order_within_the_byte_cap() -> None:
    delta = delta_of(5000, 64 * 1024)
    found = batches(delta, list(range(5000)))
    assert [i for batch in found for i in batch] == list(range(5000))
    assert all(sum(delta.chunks[i].wire_length for i in b) <= transfers.BATCH_BYTES
               for b in found)
    assert len(found) == -(-5000 * 64 * 1024 // transfers.BATCH_BYTES)  # few, full requests


def test_many_small_chunks_with_long_indexes_keep_the_query_short() -> None:
    """4 KiB chunks numbered in the hundred thousands: the byte cap alone would put 2,047
    seven-character indexes in one query string, past a server's request-head limit."""
    delta = delta_of(120_000, 4096)
    missing = list(range(100_000, 120_000))
    found = batches(delta, missing)
    assert [i for batch in found for i in batch] == missing
    assert all(len(",".join(map(str, b))) <= transfers.BATCH_INDEX_TEXT for b in found)
    assert all(len(b) <= transfers.BATCH_CHUNKS for b in found)


def test_ciphertext_is_not_compressed_but_text_and_sparse_blocks_are_tried() -> None:
    random_block = os.urandom(4096)
    text = (b"The quick brown fox jumps over the lazy dog. " * 100)[:4096]
    sparse = b"\0" * 4000 + os.urandom(96)
    assert _incompressible(random_block)
    assert len(zlib.compress(random_block, 1)) > 0.9 * 4096  # what the guess stands for
    assert not _incompressible(text) and not _incompressible(sparse)
    assert not _incompressible(b"\x01\x02")  # too short to judge: tried

"""How a laptop cuts a check-in into requests, and which runs it compresses."""

from __future__ import annotations

import os
import zlib

import pytest

from deskpool.cli.laptop import transfers
from deskpool.cli.laptop.broker import BrokerRefused
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


class FlakyBroker:
    """Answers each PUT with the next of ``answers``: None is a 200, a number that refusal."""

    def __init__(self, *answers: int | None) -> None:
        self.answers = list(answers)
        self.bodies: list[bytes] = []

    def call(self, method: str, route: str, **kw: object) -> dict[str, object]:
        assert method == "PUT" and route.endswith("/chunks")
        body = kw["content"]
        assert isinstance(body, bytes)
        self.bodies.append(body)
        status = self.answers.pop(0)
        if status is not None:
            raise BrokerRefused(f"refused with {status}", status)
        return {}


def test_a_batch_damaged_on_the_way_is_read_anew_and_sent_again() -> None:
    reads: list[int] = []

    def reread() -> bytes:
        reads.append(1)
        return b"fresh"

    broker = FlakyBroker(503, 503, None)
    sent = transfers._send_batch(broker, "/x/chunks", {"laptop": "l"},  # type: ignore[arg-type]
                                 [0, 1], b"first", reread)
    assert broker.bodies == [b"first", b"fresh", b"fresh"] and len(reads) == 2
    assert sent == len(b"first") + 2 * len(b"fresh")  # every byte that went out


def test_a_batch_refused_for_another_reason_or_too_often_is_not_sent_again() -> None:
    broker = FlakyBroker(403)
    with pytest.raises(BrokerRefused, match="403"):
        transfers._send_batch(broker, "/x/chunks", {}, [0], b"a",  # type: ignore[arg-type]
                              lambda: b"a")
    assert broker.bodies == [b"a"]
    broker = FlakyBroker(*[503] * (transfers.MAX_RESENDS + 1))
    with pytest.raises(BrokerRefused, match="503"):
        transfers._send_batch(broker, "/x/chunks", {}, [0], b"a",  # type: ignore[arg-type]
                              lambda: b"a")
    assert len(broker.bodies) == transfers.MAX_RESENDS + 1

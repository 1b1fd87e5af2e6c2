"""The server's in-place apply under an undo journal (``images.layer_apply``) on plain files:
a crash at every single write of a check-in (the journal, the layer, the manifest, torn
halfway) ends, after recovery, with the old copy byte for byte or the new one, never a mix.
(``qemu-img check`` is the qcow2 tests' business: here it is a no-op.)"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deskpool.images import layer_apply
from deskpool.images.layer_apply import InPlaceCheckin, layer_manifest, roll_back
from deskpool.images.layer_delta import (
    BLOCK_SIZE,
    CheckinRefused,
    LayerDelta,
    block_manifest,
    plan_with_manifest,
    read_chunk,
)

BASE = "cd" * 32


class Crash(Exception):
    """The process died here (this write may be half done)."""


def blocks(seed: int, count: int) -> bytes:
    return random.Random(seed).randbytes(count * BLOCK_SIZE)


@pytest.fixture(autouse=True)
def no_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_apply, "check_layer", lambda path, key: None)


def world(tmp_path: Path, grow: bool = True) -> tuple[Path, Path, Path, LayerDelta]:
    """A server copy, the laptop's newer one (some blocks changed, grown or shrunk)."""
    server, laptop = tmp_path / "server" / "layer.qcow2", tmp_path / "laptop.qcow2"
    server.parent.mkdir()
    old = bytearray(blocks(1, 64))
    server.write_bytes(bytes(old))
    new = bytearray(old)
    rnd = random.Random(2)
    for b in rnd.sample(range(64), 12):
        new[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] = rnd.randbytes(BLOCK_SIZE)
    new[20 * BLOCK_SIZE:24 * BLOCK_SIZE] = bytes(4 * BLOCK_SIZE)  # a zero run
    new = new + blocks(3, 5) + b"tail" if grow else new[:50 * BLOCK_SIZE + 100]
    laptop.write_bytes(bytes(new))
    since = layer_manifest(server)
    delta, _ = plan_with_manifest(laptop, since, BASE)
    return server, laptop, server.parent / "staging", delta


def send_all(staged: InPlaceCheckin, laptop: Path, delta: LayerDelta) -> None:
    missing = staged.missing()
    for at in range(0, len(missing), 3):  # batches of three, as the API's requests
        staged.apply_chunks([(i, read_chunk(laptop, delta.chunks[i]))
                             for i in missing[at:at + 3]])


def full_check_in(server: Path, laptop: Path, staging: Path, delta: LayerDelta) -> None:
    staged = InPlaceCheckin(server, staging, delta, expected_base_sha256=BASE)
    send_all(staged, laptop, delta)
    staged.commit(b"k" * 32)


def crashing_at(n: int, torn: bool) -> tuple[Callable[..., Any], Callable[..., Any],
                                              Callable[..., Any], list[int]]:
    """os.pwrite / os.write / os.ftruncate that die at the n-th write (writing half first
    when ``torn``)."""
    count = [0]
    real_pwrite, real_write, real_truncate = os.pwrite, os.write, os.ftruncate

    def tick() -> None:
        count[0] += 1
        if count[0] == n:
            raise Crash

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        try:
            tick()
        except Crash:
            if torn:
                real_pwrite(fd, data[:len(data) // 2], offset)
            raise
        return real_pwrite(fd, data, offset)

    def write(fd: int, data: bytes) -> int:
        try:
            tick()
        except Crash:
            if torn:
                real_write(fd, data[:len(data) // 2])
            raise
        return real_write(fd, data)

    def ftruncate(fd: int, size: int) -> None:
        tick()
        real_truncate(fd, size)

    return pwrite, write, ftruncate, count


@pytest.mark.parametrize("grow", [True, False], ids=["grown", "shrunk"])
@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn"])
def test_a_crash_at_any_write_leaves_the_old_or_the_new_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grow: bool, torn: bool) -> None:
    server, laptop, staging, delta = world(tmp_path, grow)
    old, new = server.read_bytes(), laptop.read_bytes()
    pristine = tmp_path / "pristine"
    shutil.copytree(server.parent, pristine)
    # How many writes a whole check-in makes, uncut.
    pwrite, write, ftruncate, count = crashing_at(-1, torn)
    with monkeypatch.context() as m:
        for name, fn in (("pwrite", pwrite), ("write", write), ("ftruncate", ftruncate)):
            m.setattr(os, name, fn)
        full_check_in(server, laptop, staging, delta)
    assert server.read_bytes() == new
    writes = count[0]
    assert writes > 3 * len(delta.chunks) // 3
    outcomes = {"old": 0, "new": 0}
    for n in range(1, writes + 1):
        for recovery in ("undo", "resume"):
            shutil.rmtree(server.parent)
            shutil.copytree(pristine, server.parent)
            pwrite, write, ftruncate, _ = crashing_at(n, torn)
            with monkeypatch.context() as m:
                for name, fn in (("pwrite", pwrite), ("write", write),
                                 ("ftruncate", ftruncate)):
                    m.setattr(os, name, fn)
                with pytest.raises(Crash):
                    full_check_in(server, laptop, staging, delta)
            # The process restarts: only what is on disk counts.
            if recovery == "undo":
                roll_back(server, staging)
            else:
                full_check_in(server, laptop, staging, delta)
            now = server.read_bytes()
            assert now in (old, new), f"crash at write {n}/{writes}, {recovery}: a mix"
            if recovery == "resume":
                assert now == new
            outcomes["old" if now == old else "new"] += 1
            # The kept manifest says what the file is, without reading it again.
            assert layer_manifest(server) == block_manifest(server)
            assert not (staging / "undo").exists()
    print(f"\n{writes} writes cut one by one, undone and resumed: {outcomes}")
    assert outcomes["old"] > 0 and outcomes["new"] >= writes  # a resume always ends new


def test_a_resume_sends_only_the_missing_chunks_and_reads_no_whole_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, laptop, staging, delta = world(tmp_path)
    staged = InPlaceCheckin(server, staging, delta, expected_base_sha256=BASE)
    half = staged.missing()[:len(delta.chunks) // 2]
    staged.apply_chunks([(i, read_chunk(laptop, delta.chunks[i])) for i in half])
    # A new process: the journal alone says what was applied; no block manifest is made.
    monkeypatch.setattr(layer_apply, "block_manifest",
                        lambda path: pytest.fail("the whole layer was read"))
    resumed = InPlaceCheckin(server, staging, delta, expected_base_sha256=BASE)
    assert resumed.resumed and resumed.missing() == [
        c.index for c in delta.chunks if c.index not in half]
    send_all(resumed, laptop, delta)
    resumed.commit(b"k" * 32)
    assert server.read_bytes() == laptop.read_bytes()
    assert layer_manifest(server).digest == delta.target_sha256


def test_a_commit_that_does_not_match_the_laptop_is_undone(tmp_path: Path) -> None:
    server, laptop, staging, delta = world(tmp_path)
    old = server.read_bytes()
    lying = LayerDelta(base_sha256=delta.base_sha256, since_sha256=delta.since_sha256,
                       target_sha256="0" * 64, target_size=delta.target_size,
                       chunks=delta.chunks)
    staged = InPlaceCheckin(server, staging, lying, expected_base_sha256=BASE)
    send_all(staged, laptop, lying)
    assert server.read_bytes() != old
    with pytest.raises(CheckinRefused, match="differs from the laptop's"):
        staged.commit(b"k" * 32)
    assert server.read_bytes() == old
    assert not (staging / "undo").exists()
    assert layer_manifest(server) == block_manifest(server)


def test_another_plan_undoes_the_one_in_flight_first(tmp_path: Path) -> None:
    server, laptop, staging, delta = world(tmp_path)
    old = server.read_bytes()
    staged = InPlaceCheckin(server, staging, delta, expected_base_sha256=BASE)
    send_all(staged, laptop, delta)
    with laptop.open("r+b") as f:  # the desktop ran again: a new plan
        f.write(b"again" * 100)
    second, _ = plan_with_manifest(laptop, layer_manifest_of(old, tmp_path), BASE)
    restaged = InPlaceCheckin(server, staging, second, expected_base_sha256=BASE)
    assert not restaged.resumed and len(restaged.missing()) == len(second.chunks)
    # The first plan's chunks were undone: the old bytes, grown with zeros to the new size.
    assert server.read_bytes()[:len(old)] == old
    send_all(restaged, laptop, second)
    restaged.commit(b"k" * 32)
    assert server.read_bytes() == laptop.read_bytes()


def layer_manifest_of(data: bytes, tmp_path: Path) -> Any:
    scratch = tmp_path / "scratch"
    scratch.write_bytes(data)
    return block_manifest(scratch)

"""Check-ins of the offline layer cut, damaged or refused (real qcow2 files; no VM): a cut
transfer resumes and ends identical, a killed server resumes from its journal, a damaged
chunk is sent again, and a delta against another base or an older server copy, or a copy
that does not match the laptop, is never committed."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deskpool.domain.offline_keys import new_data_key
from deskpool.images import layer_apply
from deskpool.images.layer_apply import InPlaceCheckin, roll_back, transfer_in_flight
from deskpool.images.layer_delta import (
    CheckinRefused,
    ChunkRejected,
    LayerChangedDuringCheckin,
    LayerDelta,
    block_manifest,
    file_sha256,
    plan_delta,
    read_chunk,
    send_delta,
)
from deskpool.images.offline_layers import OfflineLayerError
from tests.functional.offline_layer_kit import (
    REPO,
    Checkout,
    check_in,
    checkout,
    made_layer,
    qemu_io,
    scattered_writes,
    server_key,
)

__all__ = ["checkout", "made_layer"]  # the fixtures



# --- cuts, damage, refusals ------------------------------------------------------------------


class CutLink:
    """A connection that drops the first time given chunks are sent: either before the
    server got the chunk, or after it applied it but before the laptop heard back."""

    def __init__(self, inner: InPlaceCheckin, cut_at: set[int], rnd: random.Random) -> None:
        self.inner, self.cut_at, self.rnd, self.calls = inner, cut_at, rnd, 0

    def missing(self) -> list[int]:
        return self.inner.missing()

    def apply_chunk(self, index: int, data: bytes) -> None:
        self.calls += 1
        cut = index in self.cut_at
        self.cut_at.discard(index)
        if cut and self.rnd.random() < 0.5:
            raise ConnectionError("link dropped before the chunk arrived")
        self.inner.apply_chunk(index, data)
        if cut:
            raise ConnectionError("link dropped before the acknowledgement")


def undone_copy(co: Checkout) -> str:
    """The sha256 of the server's layer as an undo of the transfer in flight leaves it."""
    scratch = co.server.parent / "undo-trial"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(co.server, scratch)
    roll_back(scratch / "layer.qcow2", scratch / co.staging.relative_to(co.server))
    return file_sha256(scratch / "layer.qcow2")


def many_chunk_writes(co: Checkout) -> None:
    """Scattered blocks and some long runs, so chunks come in several sizes."""
    scattered_writes(co.layer, co.data_key, 150, seed=3)
    qemu_io(co.layer, co.data_key, "write -q -P 0x5a 8M 3M", "write -q -P 0x5b 100M 300k")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cut_transfers_resume_and_end_identical(checkout: Checkout, seed: int) -> None:
    many_chunk_writes(checkout)
    before = file_sha256(checkout.server_layer)
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                       checkout.base_sha256)
    rnd = random.Random(seed)
    cut_at = set(rnd.sample(range(len(delta.chunks)), 5))
    sends, runs = 0, 0
    while True:
        runs += 1
        # A new InPlaceCheckin each time: the server process may have restarted too.
        staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                               expected_base_sha256=checkout.base_sha256)
        assert staged.resumed == (runs > 1)
        link = CutLink(staged, cut_at, rnd)
        try:
            send_delta(checkout.layer, delta, link)
        except ConnectionError:
            sends += link.calls
            # Part of it is in the layer, under its journal (so nothing reads it), and
            # undoing it gives the old copy back byte for byte (tried on a copy).
            assert transfer_in_flight(checkout.staging)
            assert undone_copy(checkout) == before
            continue
        sends += link.calls
        staged.commit(server_key(checkout))
        break
    print(f"\nseed {seed}: {len(delta.chunks)} chunks, {runs} runs (5 cut), "
          f"{sends} chunk sends")
    assert runs == 6
    # Each cut costs at most the one chunk in flight.
    assert sends <= len(delta.chunks) + 5
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)
    assert not (checkout.staging / "journal").exists()


_CHILD = """
import os, signal, sys
from pathlib import Path
from deskpool.images.layer_apply import InPlaceCheckin
from deskpool.images.layer_delta import LayerDelta, read_chunk
delta_file, current, staging, layer, kill_after = sys.argv[1:]
delta = LayerDelta.decode(Path(delta_file).read_bytes())
staged = InPlaceCheckin(Path(current), Path(staging), delta,
                       expected_base_sha256=delta.base_sha256)
for n, index in enumerate(staged.missing(), start=1):
    staged.apply_chunk(index, read_chunk(Path(layer), delta.chunks[index]))
    if n == int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_server_process_resumes_from_its_journal(checkout: Checkout,
                                                          tmp_path: Path) -> None:
    many_chunk_writes(checkout)
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                       checkout.base_sha256)
    (tmp_path / "delta").write_bytes(delta.encode())
    total, killed_after = len(delta.chunks), [len(delta.chunks) // 4, len(delta.chunks) // 2]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = 0
    for kill_after in killed_after:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path / "delta"), str(checkout.server_layer),
             str(checkout.staging), str(checkout.layer), str(kill_after)],
            cwd=REPO, env=env, capture_output=True, check=False)
        assert child.returncode == -signal.SIGKILL, child.stderr
        done += kill_after
        staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                               expected_base_sha256=checkout.base_sha256)
        assert staged.resumed and len(staged.missing()) == total - done
    stats = send_delta(checkout.layer, delta, staged)
    staged.commit(server_key(checkout))
    print(f"\nkilled twice after {killed_after} of {total} chunks; "
          f"the last run sent {stats.chunks_sent}")
    assert stats.chunks_sent == total - done
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)


def test_a_cut_after_the_commit_point_reads_as_committed(
        checkout: Checkout, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server wrote its commit record, then died before clearing the journal (or the
    laptop never heard back): retrying the same check-in is "done", not "refused"."""
    scattered_writes(checkout.layer, checkout.data_key, 20, seed=13)
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                       checkout.base_sha256)
    staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                            expected_base_sha256=checkout.base_sha256)
    send_delta(checkout.layer, delta, staged)

    def die(layer: Path, staging: Path) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(layer_apply, "_finalize", die)
    with pytest.raises(OSError, match="power cut"):
        staged.commit(server_key(checkout))
    monkeypatch.undo()
    assert (checkout.staging / "undo").exists()  # the clean-up never ran
    assert not transfer_in_flight(checkout.staging)  # committed: readable
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)
    # An undo now (a forced check-in) keeps the committed copy: past the commit point.
    roll_back(checkout.server_layer, checkout.staging)
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)
    again = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                           expected_base_sha256=checkout.base_sha256)
    assert again.committed and again.missing() == []
    assert send_delta(checkout.layer, delta, again).chunks_sent == 0
    again.commit(server_key(checkout))
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)


class DamagingLink:
    """Flips one bit in the first send of every third chunk."""

    def __init__(self, inner: InPlaceCheckin) -> None:
        self.inner, self.damaged = inner, set[int]()

    def missing(self) -> list[int]:
        return self.inner.missing()

    def apply_chunk(self, index: int, data: bytes) -> None:
        if index % 3 == 0 and index not in self.damaged and data:
            self.damaged.add(index)
            data = bytes([data[0] ^ 1]) + data[1:]
        self.inner.apply_chunk(index, data)


def test_a_damaged_chunk_is_refused_unwritten_and_sent_again(checkout: Checkout) -> None:
    scattered_writes(checkout.layer, checkout.data_key, 60, seed=5)
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                       checkout.base_sha256)
    staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                           expected_base_sha256=checkout.base_sha256)
    first = delta.chunks[0]
    good = read_chunk(checkout.layer, first)
    staged_before = file_sha256(checkout.server_layer)
    with pytest.raises(ChunkRejected, match="chunk 0 arrived damaged"):
        staged.apply_chunk(0, bytes([good[0] ^ 1]) + good[1:])
    assert file_sha256(checkout.server_layer) == staged_before and 0 in staged.missing()
    link = DamagingLink(staged)
    stats = send_delta(checkout.layer, delta, link)
    assert stats.resent == len(link.damaged) > 0
    staged.commit(server_key(checkout))
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)


def test_a_delta_against_another_base_is_refused_and_changes_nothing(
        checkout: Checkout) -> None:
    scattered_writes(checkout.layer, checkout.data_key, 10, seed=6)
    before = file_sha256(checkout.server_layer)
    other_base = hashlib.sha256(b"another template version").hexdigest()
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer), other_base)
    with pytest.raises(CheckinRefused) as refused:
        InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                      expected_base_sha256=checkout.base_sha256)
    assert str(refused.value).startswith(
        f"the check-in was made on base image sha256 {other_base[:16]}..., but this "
        f"desktop's base is {checkout.base_sha256[:16]}...; nothing was applied")
    assert file_sha256(checkout.server_layer) == before
    assert not checkout.staging.exists()


def test_a_delta_made_against_an_older_server_copy_is_refused(checkout: Checkout) -> None:
    scattered_writes(checkout.layer, checkout.data_key, 10, seed=7)
    stale = block_manifest(checkout.server_layer)
    check_in(checkout)  # another check-in lands first
    scattered_writes(checkout.layer, checkout.data_key, 10, seed=8)
    after_first = file_sha256(checkout.server_layer)
    delta = plan_delta(checkout.layer, stale, checkout.base_sha256)
    with pytest.raises(CheckinRefused, match="not the one the check-in was made against"):
        InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                      expected_base_sha256=checkout.base_sha256)
    assert file_sha256(checkout.server_layer) == after_first


def test_a_staged_copy_that_does_not_match_the_laptop_is_never_committed(
        checkout: Checkout) -> None:
    scattered_writes(checkout.layer, checkout.data_key, 10, seed=9)
    before = file_sha256(checkout.server_layer)
    planned = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                         checkout.base_sha256)
    lying = LayerDelta(base_sha256=planned.base_sha256, since_sha256=planned.since_sha256,
                       target_sha256="0" * 64, target_size=planned.target_size,
                       chunks=planned.chunks)
    staged = InPlaceCheckin(checkout.server_layer, checkout.staging, lying,
                           expected_base_sha256=checkout.base_sha256)
    send_delta(checkout.layer, lying, staged)
    with pytest.raises(CheckinRefused, match="checksum differs from the laptop's"):
        staged.commit(server_key(checkout))
    assert file_sha256(checkout.server_layer) == before  # undone
    assert not transfer_in_flight(checkout.staging)


def test_commit_refuses_a_copy_qemu_img_cannot_open_with_the_key(checkout: Checkout) -> None:
    scattered_writes(checkout.layer, checkout.data_key, 10, seed=10)
    before = file_sha256(checkout.server_layer)
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                       checkout.base_sha256)
    staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                           expected_base_sha256=checkout.base_sha256)
    send_delta(checkout.layer, delta, staged)
    with pytest.raises(OfflineLayerError, match="Invalid password"):
        staged.commit(new_data_key())
    assert file_sha256(checkout.server_layer) == before  # undone, not left half-checked
    assert staged.missing() == list(range(len(delta.chunks)))
    send_delta(checkout.layer, delta, staged)  # sent again, it commits with the right key
    staged.commit(server_key(checkout))
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)


def test_a_new_check_in_undoes_the_one_in_flight(checkout: Checkout) -> None:
    scattered_writes(checkout.layer, checkout.data_key, 20, seed=11)
    since = block_manifest(checkout.server_layer)  # the laptop's, as of its last sync
    first = plan_delta(checkout.layer, since, checkout.base_sha256)
    staged = InPlaceCheckin(checkout.server_layer, checkout.staging, first,
                           expected_base_sha256=checkout.base_sha256)
    staged.apply_chunk(0, read_chunk(checkout.layer, first.chunks[0]))
    # The laptop ran the desktop again before retrying: a new plan, a new staging.
    scattered_writes(checkout.layer, checkout.data_key, 5, seed=12)
    second = plan_delta(checkout.layer, since, checkout.base_sha256)
    with pytest.raises(LayerChangedDuringCheckin, match="shut the desktop down"):
        send_delta(checkout.layer, first, staged)
    restaged = InPlaceCheckin(checkout.server_layer, checkout.staging, second,
                             expected_base_sha256=checkout.base_sha256)
    assert not restaged.resumed and len(restaged.missing()) == len(second.chunks)
    send_delta(checkout.layer, second, restaged)
    restaged.commit(server_key(checkout))
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)



"""The offline layer on real qcow2 files (qemu-img, qemu-io; no VM): encrypted at rest, and
checked in as its changed blocks, resumably, into a server copy that is replaced only whole.

Numbers printed by these tests (``-s`` shows them) are what the report quotes.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deskpool.domain.offline_keys import (
    TEST_ARGON2,
    EscrowWrappedKey,
    KeyBinding,
    UserWrappedKey,
    new_data_key,
    unwrap_for_user,
    unwrap_from_escrow,
    wrap_for_escrow,
    wrap_for_user,
)
from deskpool.images import layer_apply
from deskpool.images.layer_apply import (
    InPlaceCheckin,
    layer_manifest,
    roll_back,
    transfer_in_flight,
)
from deskpool.images.layer_changes import (
    changed_ranges,
    clear_sync_bitmap,
    cluster_map,
    read_header,
)
from deskpool.images.layer_delta import (
    BLOCK_SIZE,
    CheckinRefused,
    ChunkRejected,
    LayerChangedDuringCheckin,
    LayerDelta,
    TransferStats,
    block_manifest,
    file_sha256,
    plan_delta,
    plan_with_manifest,
    read_chunk,
    send_delta,
)
from deskpool.images.offline_layers import (
    CLUSTER_SIZE,
    OfflineLayerError,
    allocated_extents,
    check_layer,
    create_encrypted_layer,
    layer_facts,
    layer_spec,
    read_guest_bytes,
)

REPO = Path(__file__).resolve().parents[2]
DISK = 256 * 1024 * 1024
MARKER = b"DESKPOOL-PLAINTEXT-MARKER-7f3a"
BINDING = KeyBinding(user="alice", desktop_id=uuid.UUID(int=7), laptop_id="laptop-7")
ESCROW_KEY = bytes(range(32))


@dataclass(frozen=True)
class Checkout:
    """One desktop checked out: the laptop's files and the server's, side by side."""

    laptop: Path  # the laptop's directory: base cache, layer, wrapped key
    server: Path  # the server's layer store
    layer: Path
    server_layer: Path
    base_sha256: str
    data_key: bytes

    @property
    def staging(self) -> Path:
        return self.server / "staging"


@pytest.fixture(scope="module")
def made_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """One base and one fresh encrypted layer over it, copied per test (creating a LUKS
    layer costs seconds of key benchmarking)."""
    root = tmp_path_factory.mktemp("offline-made")
    base = root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(DISK)], check=True)
    subprocess.run(["qemu-io", "-c", "write -q -P 0x11 0 1M", str(base)], check=True)
    key = new_data_key()
    create_encrypted_layer(root / "layer.qcow2", base, key)
    return base, root / "layer.qcow2", key


@pytest.fixture
def checkout(made_layer: tuple[Path, Path, bytes], tmp_path: Path) -> Checkout:
    """Check-out as the server would do it: the layer made once, a copy kept by the server,
    the key wrapped for the user's password and for escrow."""
    base, layer, key = made_layer
    laptop, server = tmp_path / "laptop", tmp_path / "server"
    laptop.mkdir()
    server.mkdir()
    for side in (laptop, server):
        shutil.copyfile(base, side / "base.qcow2")
        shutil.copyfile(layer, side / "layer.qcow2")
        os.chmod(side / "layer.qcow2", 0o600)
    (laptop / "key.user.json").write_text(
        wrap_for_user(key, "pw", BINDING, TEST_ARGON2).to_json())
    (server / "key.escrow.json").write_text(
        wrap_for_escrow(key, ESCROW_KEY, "escrow-1", BINDING).to_json())
    return Checkout(laptop=laptop, server=server, layer=laptop / "layer.qcow2",
                    server_layer=server / "layer.qcow2",
                    base_sha256=file_sha256(base), data_key=key)


def qemu_io(layer: Path, key: bytes, *commands: str) -> None:
    """Guest writes, as the brief's qemu-io does them; the key goes through a pipe."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, key.hex().encode())
    os.close(write_fd)
    args = [arg for c in commands for arg in ("-c", c)]
    try:
        subprocess.run(["qemu-io", "--object", f"secret,id=layerkey0,file=/dev/fd/{read_fd}",
                        *args, layer_spec(layer, with_backing=True)],
                       check=True, pass_fds=(read_fd,), capture_output=True)
    finally:
        os.close(read_fd)


def scattered_writes(layer: Path, key: bytes, count: int, seed: int) -> list[int]:
    """``count`` 4 KiB writes at random 4 KiB-aligned offsets across the disk."""
    rnd = random.Random(seed)
    offsets = sorted(rnd.sample(range(DISK // BLOCK_SIZE), count))
    qemu_io(layer, key, *(f"write -q -P 0x{rnd.randrange(1, 256):02x} {o * BLOCK_SIZE} "
                          f"{BLOCK_SIZE}" for o in offsets))
    return [o * BLOCK_SIZE for o in offsets]


def check_in(co: Checkout) -> tuple[LayerDelta, TransferStats]:
    """A whole check-in without interruptions; the server's key comes from escrow."""
    delta = plan_delta(co.layer, block_manifest(co.server_layer), co.base_sha256)
    staged = InPlaceCheckin(co.server_layer, co.staging, delta,
                           expected_base_sha256=co.base_sha256)
    stats = send_delta(co.layer, delta, staged)
    staged.commit(server_key(co))
    return delta, stats


def server_key(co: Checkout) -> bytes:
    escrow = EscrowWrappedKey.from_json((co.server / "key.escrow.json").read_text())
    return unwrap_from_escrow(escrow, ESCROW_KEY, BINDING)


def laptop_files(co: Checkout) -> Iterator[Path]:
    return (p for p in co.laptop.rglob("*") if p.is_file())


# --- at rest -------------------------------------------------------------------------------


def test_the_layer_is_luks_aes256_with_4k_subclusters_and_private(checkout: Checkout) -> None:
    facts = layer_facts(checkout.layer)
    assert facts.encrypted and facts.encrypt_format == "luks" and facts.cipher_alg == "aes-256"
    assert facts.cluster_size == CLUSTER_SIZE == 32 * BLOCK_SIZE
    assert facts.backing_file == "base.qcow2"  # relative: the same bytes work on both ends
    assert facts.virtual_size == DISK
    assert os.stat(checkout.layer).st_mode & 0o777 == 0o600
    # The guest sees the base through the layer.
    assert read_guest_bytes(checkout.layer, checkout.data_key, 0, 16) == b"\x11" * 16


def test_the_layer_opens_only_with_its_key(checkout: Checkout) -> None:
    stored = UserWrappedKey.from_json((checkout.laptop / "key.user.json").read_text())
    user_key = unwrap_for_user(stored, "pw", BINDING)
    check_layer(checkout.layer, user_key)
    with pytest.raises(OfflineLayerError, match="Invalid password"):
        check_layer(checkout.layer, new_data_key())
    # A plain qcow2 opens with any key: the check looks at the header as well.
    plain = checkout.server / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "16M"], check=True)
    with pytest.raises(OfflineLayerError, match="not a LUKS AES-256 encrypted layer"):
        check_layer(plain, user_key)


def test_the_key_is_never_on_a_command_line(checkout: Checkout,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(argv: list[str], **kwargs: object) -> object:
        seen.append(list(argv))
        return real_run(argv, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("deskpool.images.offline_layers.subprocess.run", recording_run)
    check_layer(checkout.layer, checkout.data_key)
    allocated_extents(checkout.layer, checkout.data_key)
    read_guest_bytes(checkout.layer, checkout.data_key, 0, 16)
    assert len(seen) == 4  # check_layer reads the header first (no key needed for that)
    for argv in seen:
        text = " ".join(argv)
        assert checkout.data_key.hex() not in text
        if "json:" in text:  # the three that open the layer with its key
            assert "secret,id=layerkey0,file=/dev/fd/" in text  # a pipe, not a file on disk
        assert "data=" not in text


def test_guest_data_never_reaches_a_laptop_file_or_the_wire_in_plaintext(
        checkout: Checkout, tmp_path: Path) -> None:
    source = tmp_path / "marker-source"  # outside the laptop's directory
    source.write_bytes(MARKER * (65536 // len(MARKER) + 1))
    qemu_io(checkout.layer, checkout.data_key, f"write -s {source} 1048576 65536",
            f"write -s {source} {DISK - 8192} 4096")
    # The positive control: the guest reads its marker back...
    assert read_guest_bytes(checkout.layer, checkout.data_key, 1048576, 64).startswith(MARKER)
    assert read_guest_bytes(checkout.layer, checkout.data_key, DISK - 8192, 64).startswith(
        MARKER)
    # ...and no file on the laptop holds it, in plain bytes or the hex or base64 of any part.
    files = list(laptop_files(checkout))
    assert {p.name for p in files} >= {"layer.qcow2", "key.user.json", "base.qcow2"}
    for path in files:
        content = path.read_bytes()
        assert MARKER not in content, path
        assert MARKER[:16].hex().encode() not in content, path
    # What travels at check-in is ciphertext too, and so is what the server keeps.
    delta = plan_delta(checkout.layer, block_manifest(checkout.server_layer),
                       checkout.base_sha256)
    wire = delta.encode() + b"".join(read_chunk(checkout.layer, c) for c in delta.chunks)
    assert MARKER not in wire
    staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                           expected_base_sha256=checkout.base_sha256)
    send_delta(checkout.layer, delta, staged)
    staged.commit(server_key(checkout))
    assert MARKER not in checkout.server_layer.read_bytes()
    # The server, with the escrowed key, reads what the guest wrote.
    assert read_guest_bytes(checkout.server_layer, server_key(checkout), 1048576,
                            len(MARKER)) == MARKER


# --- how much travels ---------------------------------------------------------------------


def test_a_check_in_sends_little_more_than_the_guest_wrote(checkout: Checkout) -> None:
    writes = 256
    scattered_writes(checkout.layer, checkout.data_key, writes, seed=15)
    written = writes * BLOCK_SIZE
    changed = allocated_extents(checkout.layer, checkout.data_key)
    assert sum(e.length for e in changed) == written  # the layer holds exactly those 4 KiB
    delta, stats = check_in(checkout)
    ratio = delta.wire_bytes() / written
    print(f"\nfirst sync: {writes} scattered 4 KiB writes over {DISK >> 20} MiB: "
          f"{written} bytes written, {delta.wire_bytes()} bytes sent "
          f"({len(delta.chunks)} chunks, {len(delta.encode())} bytes of plan), "
          f"ratio {ratio:.3f}")
    assert ratio <= 1.1
    assert stats.bytes_sent == delta.payload_bytes()
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)

    # Second sync: new scattered writes plus rewrites of half the old blocks in place.
    rnd = random.Random(16)
    again = scattered_writes(checkout.layer, checkout.data_key, writes, seed=17)
    old = [e.start for e in changed]
    rewrites = rnd.sample(old, writes // 2)
    qemu_io(checkout.layer, checkout.data_key,
            *(f"write -q -P 0xee {o} {BLOCK_SIZE}" for o in rewrites))
    written2 = len(set(again) | set(rewrites)) * BLOCK_SIZE
    delta2, _ = check_in(checkout)
    ratio2 = delta2.wire_bytes() / written2
    print(f"second sync: {written2} bytes changed (new and rewritten), "
          f"{delta2.wire_bytes()} sent, ratio {ratio2:.3f}")
    assert ratio2 <= 1.1
    assert file_sha256(checkout.server_layer) == file_sha256(checkout.layer)
    assert read_guest_bytes(checkout.server_layer, server_key(checkout), rewrites[0], 8) == \
        b"\xee" * 8


def test_nothing_changed_sends_nothing(checkout: Checkout) -> None:
    delta, stats = check_in(checkout)
    assert delta.chunks == () and stats.bytes_sent == 0
    assert len(delta.encode()) < 400


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


# --- knowing what changed without reading the layer -------------------------------------------


def test_the_change_bitmap_names_every_changed_block_and_few_others(checkout: Checkout) -> None:
    """Planned from the layer's dirty bitmap and cluster maps, a check-in reads a small part
    of the layer yet makes the same plan as a whole read, round after round (rewrites,
    new clusters past the old end, discards), and the server ends byte for byte the same."""
    layer, key = checkout.layer, checkout.data_key
    qemu_io(layer, key, "write -q -P 0x11 0 40M")  # a layer with data in it
    rounds = [
        [f"write -q -P 0x{n:02x} {n * 3}M 4k" for n in range(1, 12)],  # rewrites in place
        ["write -q -P 0x21 100M 4k", "write -q -P 0x22 180M 64k", "write -q -P 0x23 5M 8k"],
        ["discard -q 0 1M", "write -q -P 0x31 1M 4k", "write -q -P 0x32 200M 4k"],
    ]
    # Where the server's copy stands: the 40 MiB synced, then the bits cleared and synced.
    for _ in range(2):
        delta = plan_delta(layer, layer_manifest(checkout.server_layer), checkout.base_sha256)
        staged = InPlaceCheckin(checkout.server_layer, checkout.staging, delta,
                                expected_base_sha256=checkout.base_sha256)
        send_delta(layer, delta, staged)
        staged.commit(server_key(checkout))
        clear_sync_bitmap(layer)
    since, synced_map = block_manifest(layer), cluster_map(layer)
    assert since == block_manifest(checkout.server_layer)
    for n, commands in enumerate(rounds):
        qemu_io(layer, key, *commands)
        ranges = changed_ranges(layer, synced_map, since.file_size)
        assert ranges is not None
        read = sum(count for _, count in ranges) * BLOCK_SIZE
        quick, quick_manifest = plan_with_manifest(layer, since, checkout.base_sha256, ranges)
        whole, whole_manifest = plan_with_manifest(layer, since, checkout.base_sha256)
        assert quick == whole and quick_manifest == whole_manifest
        assert read < layer.stat().st_size // 4, (n, read)
        staged = InPlaceCheckin(checkout.server_layer, checkout.staging, quick,
                                expected_base_sha256=checkout.base_sha256)
        send_delta(layer, quick, staged)
        staged.commit(server_key(checkout))
        assert file_sha256(checkout.server_layer) == file_sha256(layer)
        since, synced_map = quick_manifest, cluster_map(layer)
        assert clear_sync_bitmap(layer)
        # The cleared bitmap is a change too: it travels with the next round.
        since_cleared = plan_with_manifest(layer, since, checkout.base_sha256)[0]
        assert since_cleared.chunks


def test_a_bitmap_qemu_left_in_use_means_a_whole_read(checkout: Checkout) -> None:
    synced_map = cluster_map(checkout.layer)
    since = block_manifest(checkout.layer)
    assert changed_ranges(checkout.layer, synced_map, since.file_size) is not None
    assert changed_ranges(checkout.layer, None, since.file_size) is None  # no map of the sync
    header = read_header(checkout.layer)
    assert header is not None and header.bitmap_dir is not None
    with checkout.layer.open("r+b") as f:  # the flags QEMU sets while it has the layer open
        f.seek(header.bitmap_dir[0] + 12)
        flags = int.from_bytes(f.read(4), "big")
        f.seek(header.bitmap_dir[0] + 12)
        f.write((flags | 1).to_bytes(4, "big"))
    assert changed_ranges(checkout.layer, synced_map, since.file_size) is None
    assert not clear_sync_bitmap(checkout.layer)

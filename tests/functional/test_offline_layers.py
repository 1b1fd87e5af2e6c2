"""The offline layer on real qcow2 files (qemu-img, qemu-io; no VM): encrypted at rest,
checked in as little more than its changed blocks, which its dirty bitmap names without a
whole read. Cuts, damage and refusals are in ``test_offline_checkin_cuts``.

Numbers printed by these tests (``-s`` shows them) are what the report quotes.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from deskpool.domain.offline_keys import UserWrappedKey, new_data_key, unwrap_for_user
from deskpool.images.layer_apply import InPlaceCheckin, layer_manifest
from deskpool.images.layer_changes import (
    changed_ranges,
    clear_sync_bitmap,
    cluster_map,
    read_header,
)
from deskpool.images.layer_delta import (
    BLOCK_SIZE,
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
    layer_facts,
    read_guest_bytes,
)
from tests.functional.offline_layer_kit import (
    BINDING,
    DISK,
    MARKER,
    Checkout,
    check_in,
    checkout,
    laptop_files,
    made_layer,
    qemu_io,
    scattered_writes,
    server_key,
)

__all__ = ["checkout", "made_layer"]  # the fixtures


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

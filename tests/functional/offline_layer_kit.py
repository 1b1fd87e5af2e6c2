"""The offline layer kit shared by the offline-layer tests: a base and an encrypted layer made
once per module, a check-out (the laptop's files and the server's side by side), guest
writes through ``qemu-io`` and a whole check-in."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deskpool.domain.offline_keys import (
    TEST_ARGON2,
    EscrowWrappedKey,
    KeyBinding,
    new_data_key,
    unwrap_from_escrow,
    wrap_for_escrow,
    wrap_for_user,
)
from deskpool.images.layer_apply import InPlaceCheckin
from deskpool.images.layer_delta import (
    BLOCK_SIZE,
    LayerDelta,
    TransferStats,
    block_manifest,
    file_sha256,
    plan_delta,
    send_delta,
)
from deskpool.images.offline_layers import create_encrypted_layer, layer_spec

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



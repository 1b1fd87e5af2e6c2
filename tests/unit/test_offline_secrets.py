"""The server's offline secrets: made once per installation, private files, never re-made."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deskpool.config import Settings
from deskpool.services.offline_secrets import (
    ESCROW_KEY_FILE,
    SIGNING_KEY_FILE,
    OfflineSecretsBroken,
    load_offline_secrets,
    secrets_dir,
)


def test_keys_are_made_once_private_and_read_back_the_same(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = load_offline_secrets(settings)
    again = load_offline_secrets(settings)
    assert again.escrow_key == first.escrow_key and len(first.escrow_key) == 32
    assert again.public_key_pem() == first.public_key_pem()
    assert again.escrow_key_id == first.escrow_key_id
    folder = secrets_dir(settings)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in (SIGNING_KEY_FILE, ESCROW_KEY_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp left
    signature = first.signing_key.sign(b"lease")
    again.public_key.verify(signature, b"lease")  # the same key pair: raises otherwise


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    load_offline_secrets(settings)
    escrow = secrets_dir(settings) / ESCROW_KEY_FILE
    escrow.write_bytes(b"short")
    with pytest.raises(OfflineSecretsBroken, match="is 5 bytes, not 32; restore it"):
        load_offline_secrets(settings)
    assert escrow.read_bytes() == b"short"
    (secrets_dir(settings) / SIGNING_KEY_FILE).write_text("not a key")
    with pytest.raises(OfflineSecretsBroken, match="cannot be read; restore it"):
        load_offline_secrets(settings)

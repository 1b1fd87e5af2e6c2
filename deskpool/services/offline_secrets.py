"""The server's two offline secrets, made once per installation and kept in files beside its
other private material (the data directory, as the TLS key is a file), never in the database:

* the lease signing key (Ed25519): laptops hold only its public half and check every lease
  against it, so a database dump cannot mint leases;
* the escrow key (AES-256): wraps each check-out's layer key, so the database holds only
  ciphertext and an administrator (with this file) can recover a layer.

Both files are mode 0600 in a 0700 directory. Made with ``O_EXCL`` under a temporary name
and linked into place, so two processes starting at once agree on one key (the loser reads
the winner's). Brokers on several machines must share the data directory's ``offline``
folder (or a copy of it), as they share the template images.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deskpool.config import Settings
from deskpool.domain.errors import PermanentError

SIGNING_KEY_FILE = "lease-signing-key.pem"
ESCROW_KEY_FILE = "escrow-key.bin"


class OfflineSecretsBroken(PermanentError):
    """A key file exists but cannot be used (truncated, altered, wrong size)."""


def secrets_dir(settings: Settings) -> Path:
    return settings.data_dir / "offline"


def create_once(path: Path, content: bytes) -> bytes:
    """``path``'s content: ``content`` if this call made the file, else what is there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        return path.read_bytes()
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # fails if another process linked its key first
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_bytes()


@dataclass(frozen=True)
class OfflineSecrets:
    signing_key: Ed25519PrivateKey
    escrow_key: bytes

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    @property
    def escrow_key_id(self) -> str:
        """Names the escrow key in each wrapped blob (not secret: a hash prefix)."""
        return hashlib.sha256(b"deskpool-escrow\0" + self.escrow_key).hexdigest()[:16]


def load_offline_secrets(settings: Settings) -> OfflineSecrets:
    folder = secrets_dir(settings)
    pem = create_once(folder / SIGNING_KEY_FILE, Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError:
        raise OfflineSecretsBroken(f"the lease signing key {folder / SIGNING_KEY_FILE} cannot "
                                   "be read; restore it from a backup") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise OfflineSecretsBroken(f"{folder / SIGNING_KEY_FILE} is not an Ed25519 key")
    escrow = create_once(folder / ESCROW_KEY_FILE, secrets.token_bytes(32))
    if len(escrow) != 32:
        raise OfflineSecretsBroken(f"the escrow key {folder / ESCROW_KEY_FILE} is "
                                   f"{len(escrow)} bytes, not 32; restore it from a backup")
    return OfflineSecrets(signing_key=key, escrow_key=escrow)

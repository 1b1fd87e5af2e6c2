"""Each desktop's machine secrets (``deskpool.domain.machine_secrets``), kept by the broker
and put in the guest at every boot it confirms (``DesktopFactory.confirm_running``).

* The **SSH host key** is derived, not stored: Ed25519 from HMAC-SHA256 of the
  installation's machine-secrets key and the desktop's name. The same name gets the same key
  on every boot, on every host, after a reset or a rebuild; the database holds nothing of it.
* **Machine credentials** (a keytab...) are files an administrator gives for a desktop name
  (before the desktop exists too: a pre-staged computer account), stored AES-256-GCM
  encrypted under that key, bound to the name and path.

The key is a file of 32 random bytes, ``DATA_DIR/machine-secrets/machine-key.bin`` (0600),
made once per installation, as the offline escrow key is: a database dump alone opens
nothing. Brokers on several machines share it as they share the data directory's offline
folder; back it up with them (without it, credentials must be given again and every SSH host
key changes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from deskpool.config import Settings
from deskpool.domain.errors import NotFound, PermanentError
from deskpool.domain.machine_secrets import (
    SSH_KEY_PATH,
    STAGING,
    MachineFile,
    credential_content,
    credential_path,
    desktop_name,
    install_argv,
)
from deskpool.drivers.agent import GuestAgent
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.offline_secrets import create_once

KEY_FILE = "machine-key.bin"
_NONCE = 12


class MachineSecretsBroken(PermanentError):
    """The machine-secrets key cannot be used, or a stored credential does not open."""


@dataclass(frozen=True)
class CredentialInfo:
    desktop: str
    path: str
    sha256: str
    size: int


def machine_key(settings: Settings) -> bytes:
    path = settings.data_dir / "machine-secrets" / KEY_FILE
    key = create_once(path, secrets.token_bytes(32))
    if len(key) != 32:
        raise MachineSecretsBroken(f"the machine-secrets key {path} is {len(key)} bytes, not "
                                   "32; restore it from a backup")
    return key


def ssh_host_key(key: bytes, desktop_name: str, hostname: str) -> tuple[bytes, bytes]:
    """The desktop's SSH host key: (private key, OpenSSH format; public line)."""
    seed = hmac.new(key, b"deskpool ssh host key ed25519\0" + desktop_name.encode(),
                    hashlib.sha256).digest()
    private = Ed25519PrivateKey.from_private_bytes(seed)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
    return pem, public + f" root@{hostname}\n".encode()


def ssh_fingerprint(public_line: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _aad(desktop_name: str, path: str) -> bytes:
    return f"deskpool machine credential\0{desktop_name}\0{path}".encode()


class MachineSecrets:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = machine_key(self.ctx.settings)
        return self._key

    # --- credentials --------------------------------------------------------------------

    def set_credential(self, name: str, path: str, content: bytes) -> CredentialInfo:
        """Keep ``content`` for desktop ``desktop_name`` at ``path``; it goes in at the
        desktop's next boot (and every one after). Replaces one at the same path."""
        desktop_name(name)
        credential_path(path)
        credential_content(content, path)
        nonce = secrets.token_bytes(_NONCE)
        sealed = nonce + AESGCM(self.key).encrypt(nonce, content, _aad(name, path))
        digest = hashlib.sha256(content).hexdigest()
        with self.ctx.uow() as uow:
            new = uow.machine_credentials.put(name, path, sealed, digest, len(content))
            record_event(uow, "machine-credential-set",
                         f"machine credential {path} {'set' if new else 'replaced'} for "
                         f"desktop {name} ({len(content)} bytes, sha256 {digest[:12]}); it "
                         "is put in place at each boot", desktop=name)
            uow.commit()
        return CredentialInfo(name, path, digest, len(content))

    def remove_credential(self, name: str, path: str) -> None:
        desktop_name(name)  # bad input is refused, never looked up
        credential_path(path)
        with self.ctx.uow() as uow:
            if not uow.machine_credentials.remove(name, path):
                raise NotFound(f"desktop {name} has no machine credential at {path}")
            record_event(uow, "machine-credential-removed",
                         f"machine credential {path} of desktop {name} removed (the file "
                         "stays in a running desktop until its disk is reset)", desktop=name)
            uow.commit()

    def credentials(self, name: str | None = None) -> list[CredentialInfo]:
        if name is not None:
            desktop_name(name)
        with self.ctx.uow(read_only=True) as uow:
            found = (uow.machine_credentials.for_desktop(name)
                     if name is not None else uow.machine_credentials.list())
            return [CredentialInfo(c.desktop_name, c.guest_path, c.sha256, c.size)
                    for c in found]

    # --- what a desktop gets ------------------------------------------------------------

    def files_for(self, name: str, hostname: str) -> list[MachineFile]:
        """Every file the desktop gets at boot: its SSH host key pair, its credentials."""
        private, public = ssh_host_key(self.key, name, hostname)
        files = [MachineFile(SSH_KEY_PATH, "600", private),
                 MachineFile(f"{SSH_KEY_PATH}.pub", "644", public)]
        with self.ctx.uow(read_only=True) as uow:
            stored = [(c.guest_path, c.ciphertext)
                      for c in uow.machine_credentials.for_desktop(name)]
        for path, sealed in stored:
            try:
                content = AESGCM(self.key).decrypt(sealed[:_NONCE], sealed[_NONCE:],
                                                   _aad(name, path))
            except (InvalidTag, ValueError):
                raise MachineSecretsBroken(
                    f"the machine credential {path} of desktop {name} does not open "
                    "with this installation's machine-secrets key (restored from another "
                    "installation?): give it again") from None
            files.append(MachineFile(path, "600", content))
        return files

    def install(self, agent: GuestAgent, name: str, hostname: str) -> int:
        """Put the desktop's machine secrets in place in its running guest; how many files.
        ``MachineSecretsBroken`` when the guest does not take them."""
        files = self.files_for(name, hostname)
        code, _, err = agent.exec_capture(["/bin/mkdir", "-p", "-m", "0700", STAGING])
        if code != 0:
            raise MachineSecretsBroken(f"desktop {name}: cannot make {STAGING}: "
                                       f"{err.strip()[:200]}")
        for number, file in enumerate(files):
            agent.write_file(f"{STAGING}/{number}", file.content)
        code, _, err = agent.exec_capture(install_argv(files), timeout_s=120)
        if code != 0:
            raise MachineSecretsBroken(f"desktop {name}: its machine secrets were not "
                                       f"put in place: {err.strip()[:300] or f'exit {code}'}")
        return len(files)


def public_host_key(ctx: ServiceContext, name: str, hostname: str) -> bytes:
    """The desktop's SSH host public key line (for ``known_hosts``)."""
    return ssh_host_key(machine_key(ctx.settings), desktop_name(name), hostname)[1]

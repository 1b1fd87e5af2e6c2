"""The key that encrypts an offline desktop's writable layer, and its two wrappings.

One random 256-bit data key per check-out. It is the qcow2 LUKS secret of the laptop's layer
(see ``deskpool.images.offline_layers``) and is never stored in the clear:

* for the user: AES-256-GCM under a key derived from the user's password with Argon2id and a
  random salt. Starting the desktop offline needs the password; the password itself is never
  stored anywhere.
* for escrow: AES-256-GCM under a server-held 256-bit key, so an administrator can recover
  the layer (a forgotten password, a lost laptop's synced copy) and the server can check the
  encrypted copy it receives at check-in.

Both wrappings bind the user, desktop and laptop as associated data: a wrapped key copied to
another laptop or desktop does not open. A wrong password and a tampered blob fail the same
way, with the same message, so an attacker learns nothing from the error.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Literal

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from deskpool.domain.errors import AuthenticationFailed, InvalidInput

DATA_KEY_BYTES = 32
_NONCE_BYTES = 12
_SALT_BYTES = 16
WRAP_FORMAT = 1


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost. The default is RFC 9106's second recommendation with one lane (a laptop
    unlocks once per start; 64 MiB and ~0.3 s there is fine). Bounds keep a wrapped blob from
    asking the unwrapper for gigabytes or minutes, and tests from going trivially weak."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 1

    def __post_init__(self) -> None:
        for name, low, high in (("time_cost", 1, 10), ("memory_kib", 8 * 1024, 1024 * 1024),
                                ("parallelism", 1, 8)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise InvalidInput(f"argon2 parameter {name} must be an integer from {low} "
                                   f"to {high}, got {value!r}")


# Cheap enough for unit tests, still within the bounds above.
TEST_ARGON2 = Argon2Params(time_cost=1, memory_kib=8 * 1024, parallelism=1)


@dataclass(frozen=True)
class KeyBinding:
    """Who and what a wrapped key belongs to; authenticated, not secret."""

    user: str
    desktop_id: uuid.UUID
    laptop_id: str

    def associated_data(self, purpose: Literal["user", "escrow"], extra: str = "") -> bytes:
        return json.dumps({"purpose": purpose, "user": self.user,
                           "desktop_id": str(self.desktop_id), "laptop_id": self.laptop_id,
                           "extra": extra, "format": WRAP_FORMAT},
                          sort_keys=True, separators=(",", ":")).encode("utf-8")


class WrongPassword(AuthenticationFailed):
    """The password does not unlock the key (or the wrapped key was altered)."""


class EscrowKeyMismatch(AuthenticationFailed):
    """The escrow key given is not the one the data key was wrapped with."""


def new_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, name: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"wrapped key field {name} must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise InvalidInput(f"wrapped key field {name} is not base64") from None


@dataclass(frozen=True)
class UserWrappedKey:
    """The data key under the user's password. Safe to store on the laptop and the server."""

    params: Argon2Params
    salt: bytes
    nonce: bytes
    ciphertext: bytes

    def _kdf_text(self) -> str:
        # The KDF parameters and salt are authenticated too: a blob whose cost was lowered
        # fails to open instead of opening with a weaker derivation.
        p = self.params
        return f"argon2id:t={p.time_cost}:m={p.memory_kib}:p={p.parallelism}:s={_b64(self.salt)}"

    def to_json(self) -> str:
        p = self.params
        return json.dumps({"format": WRAP_FORMAT, "kdf": "argon2id", "time_cost": p.time_cost,
                           "memory_kib": p.memory_kib, "parallelism": p.parallelism,
                           "salt": _b64(self.salt), "nonce": _b64(self.nonce),
                           "ciphertext": _b64(self.ciphertext)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UserWrappedKey:
        try:
            body = json.loads(text)
        except ValueError:
            raise InvalidInput("the wrapped key is not JSON") from None
        if not isinstance(body, dict) or body.get("format") != WRAP_FORMAT \
                or body.get("kdf") != "argon2id":
            raise InvalidInput(f"the wrapped key is not an argon2id key of format {WRAP_FORMAT}")
        try:
            params = Argon2Params(time_cost=body["time_cost"], memory_kib=body["memory_kib"],
                                  parallelism=body["parallelism"])
            return cls(params=params, salt=_unb64(body["salt"], "salt"),
                       nonce=_unb64(body["nonce"], "nonce"),
                       ciphertext=_unb64(body["ciphertext"], "ciphertext"))
        except KeyError as exc:
            raise InvalidInput(f"the wrapped key is missing field {exc.args[0]}") from None


@dataclass(frozen=True)
class EscrowWrappedKey:
    """The data key under the server's escrow key ``key_id`` (so keys can be rotated)."""

    key_id: str
    nonce: bytes
    ciphertext: bytes

    def to_json(self) -> str:
        return json.dumps({"format": WRAP_FORMAT, "key_id": self.key_id,
                           "nonce": _b64(self.nonce), "ciphertext": _b64(self.ciphertext)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EscrowWrappedKey:
        try:
            body = json.loads(text)
            if not isinstance(body, dict) or body.get("format") != WRAP_FORMAT:
                raise InvalidInput(f"the escrowed key is not of format {WRAP_FORMAT}")
            return cls(key_id=str(body["key_id"]), nonce=_unb64(body["nonce"], "nonce"),
                       ciphertext=_unb64(body["ciphertext"], "ciphertext"))
        except ValueError:
            raise InvalidInput("the escrowed key is not JSON") from None
        except KeyError as exc:
            raise InvalidInput(f"the escrowed key is missing field {exc.args[0]}") from None


def _check_data_key(data_key: bytes) -> None:
    if len(data_key) != DATA_KEY_BYTES:
        raise InvalidInput(f"a data key is {DATA_KEY_BYTES} bytes, got {len(data_key)}")


def _password_key(password: str, salt: bytes, params: Argon2Params) -> bytes:
    if not password:
        raise InvalidInput("the password must not be empty")
    return hash_secret_raw(password.encode("utf-8"), salt, time_cost=params.time_cost,
                           memory_cost=params.memory_kib, parallelism=params.parallelism,
                           hash_len=32, type=Type.ID)


def wrap_for_user(data_key: bytes, password: str, binding: KeyBinding,
                  params: Argon2Params | None = None) -> UserWrappedKey:
    _check_data_key(data_key)
    params = params or Argon2Params()
    salt = secrets.token_bytes(_SALT_BYTES)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    wrapped = UserWrappedKey(params=params, salt=salt, nonce=nonce, ciphertext=b"")
    aad = binding.associated_data("user", wrapped._kdf_text())
    ciphertext = AESGCM(_password_key(password, salt, params)).encrypt(nonce, data_key, aad)
    return UserWrappedKey(params=params, salt=salt, nonce=nonce, ciphertext=ciphertext)


def unwrap_for_user(wrapped: UserWrappedKey, password: str, binding: KeyBinding) -> bytes:
    aad = binding.associated_data("user", wrapped._kdf_text())
    try:
        key = AESGCM(_password_key(password, wrapped.salt, wrapped.params))
        data_key = key.decrypt(wrapped.nonce, wrapped.ciphertext, aad)
    except (InvalidTag, ValueError):
        # Same sentence for a wrong password, a tampered blob and another laptop's blob.
        raise WrongPassword("wrong password: this desktop's disk stays locked") from None
    _check_data_key(data_key)
    return data_key


def rewrap_for_user(wrapped: UserWrappedKey, old_password: str, new_password: str,
                    binding: KeyBinding, params: Argon2Params | None = None) -> UserWrappedKey:
    """After a password change: the data key (and so the layer) stays, its wrapping changes."""
    return wrap_for_user(unwrap_for_user(wrapped, old_password, binding), new_password,
                         binding, params or wrapped.params)


def _check_escrow_key(escrow_key: bytes) -> None:
    if len(escrow_key) != 32:
        raise InvalidInput("the escrow key must be 32 bytes (AES-256)")


def wrap_for_escrow(data_key: bytes, escrow_key: bytes, key_id: str,
                    binding: KeyBinding) -> EscrowWrappedKey:
    _check_data_key(data_key)
    _check_escrow_key(escrow_key)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    aad = binding.associated_data("escrow", key_id)
    return EscrowWrappedKey(key_id=key_id, nonce=nonce,
                            ciphertext=AESGCM(escrow_key).encrypt(nonce, data_key, aad))


def unwrap_from_escrow(wrapped: EscrowWrappedKey, escrow_key: bytes,
                       binding: KeyBinding) -> bytes:
    """Recovery by the server or an administrator: no password involved."""
    _check_escrow_key(escrow_key)
    aad = binding.associated_data("escrow", wrapped.key_id)
    try:
        data_key = AESGCM(escrow_key).decrypt(wrapped.nonce, wrapped.ciphertext, aad)
    except InvalidTag:
        raise EscrowKeyMismatch(
            f"the escrow key {wrapped.key_id!r} given does not open this desktop's key "
            "(another key, another desktop, or an altered record)") from None
    _check_data_key(data_key)
    return data_key

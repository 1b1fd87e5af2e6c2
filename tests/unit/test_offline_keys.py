"""The offline layer's data key: wrapped for the user's password, and for escrow."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.domain.offline_keys import (
    TEST_ARGON2,
    Argon2Params,
    EscrowKeyMismatch,
    EscrowWrappedKey,
    KeyBinding,
    UserWrappedKey,
    WrongPassword,
    new_data_key,
    rewrap_for_user,
    unwrap_for_user,
    unwrap_from_escrow,
    wrap_for_escrow,
    wrap_for_user,
)

BINDING = KeyBinding(user="alice", desktop_id=uuid.UUID(int=1), laptop_id="laptop-7")
ESCROW = bytes(range(32))


def test_data_keys_are_random_256_bit() -> None:
    keys = {new_data_key() for _ in range(20)}
    assert len(keys) == 20 and all(len(k) == 32 for k in keys)


def test_the_right_password_unwraps_and_the_stored_form_round_trips() -> None:
    key = new_data_key()
    wrapped = wrap_for_user(key, "correct horse", BINDING, TEST_ARGON2)
    stored = wrapped.to_json()
    assert key.hex() not in stored and "correct horse" not in stored
    assert unwrap_for_user(UserWrappedKey.from_json(stored), "correct horse", BINDING) == key


def test_default_cost_is_argon2id_rfc9106_shaped() -> None:
    params = Argon2Params()
    assert (params.time_cost, params.memory_kib) == (3, 64 * 1024)
    assert '"kdf": "argon2id"' in wrap_for_user(new_data_key(), "pw", BINDING).to_json()


def test_wrong_password_says_so_and_leaks_nothing() -> None:
    key = new_data_key()
    wrapped = wrap_for_user(key, "correct horse", BINDING, TEST_ARGON2)
    with pytest.raises(WrongPassword) as refused:
        unwrap_for_user(wrapped, "correct hors", BINDING)
    message = str(refused.value)
    assert message.startswith("wrong password")
    assert key.hex() not in message and "correct" not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


@pytest.mark.parametrize("change", [
    lambda w: dataclasses.replace(w, ciphertext=bytes([w.ciphertext[0] ^ 1]) + w.ciphertext[1:]),
    lambda w: dataclasses.replace(w, salt=bytes(16)),
    # Lowering the cost in the blob must not yield a key derived more cheaply.
    lambda w: dataclasses.replace(w, params=Argon2Params(time_cost=2, memory_kib=8192)),
])
def test_a_tampered_blob_fails_like_a_wrong_password(change: object) -> None:
    wrapped = wrap_for_user(new_data_key(), "pw", BINDING, TEST_ARGON2)
    with pytest.raises(WrongPassword, match=r"^wrong password"):
        unwrap_for_user(change(wrapped), "pw", BINDING)  # type: ignore[operator]


@pytest.mark.parametrize("other", [
    dataclasses.replace(BINDING, laptop_id="laptop-8"),
    dataclasses.replace(BINDING, user="bob"),
    dataclasses.replace(BINDING, desktop_id=uuid.UUID(int=2)),
])
def test_a_wrapped_key_is_bound_to_user_desktop_and_laptop(other: KeyBinding) -> None:
    wrapped = wrap_for_user(new_data_key(), "pw", BINDING, TEST_ARGON2)
    with pytest.raises(WrongPassword):
        unwrap_for_user(wrapped, "pw", other)


def test_escrow_recovers_the_key_without_the_password() -> None:
    key = new_data_key()
    user_copy = wrap_for_user(key, "forgotten", BINDING, TEST_ARGON2)
    escrow = EscrowWrappedKey.from_json(wrap_for_escrow(key, ESCROW, "escrow-2026", BINDING)
                                        .to_json())
    recovered = unwrap_from_escrow(escrow, ESCROW, BINDING)
    assert recovered == key
    # The admin sets a new password: the same data key, so the same encrypted layer, opens.
    reset = wrap_for_user(recovered, "new password", BINDING, TEST_ARGON2)
    assert unwrap_for_user(reset, "new password", BINDING) == key
    with pytest.raises(WrongPassword):
        unwrap_for_user(reset, "forgotten", BINDING)
    assert unwrap_for_user(user_copy, "forgotten", BINDING) == key


def test_escrow_refuses_another_server_key_or_binding() -> None:
    escrow = wrap_for_escrow(new_data_key(), ESCROW, "escrow-2026", BINDING)
    with pytest.raises(EscrowKeyMismatch, match="escrow-2026"):
        unwrap_from_escrow(escrow, bytes(32), BINDING)
    with pytest.raises(EscrowKeyMismatch):
        unwrap_from_escrow(escrow, ESCROW, dataclasses.replace(BINDING, laptop_id="x"))
    # The key id is authenticated: relabelling the record does not open it.
    with pytest.raises(EscrowKeyMismatch):
        unwrap_from_escrow(dataclasses.replace(escrow, key_id="other"), ESCROW, BINDING)


def test_password_change_keeps_the_data_key() -> None:
    key = new_data_key()
    wrapped = wrap_for_user(key, "old", BINDING, TEST_ARGON2)
    changed = rewrap_for_user(wrapped, "old", "new", BINDING)
    assert changed.salt != wrapped.salt
    assert unwrap_for_user(changed, "new", BINDING) == key


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Argon2Params(memory_kib=1024), "memory_kib"),
    (lambda: Argon2Params(time_cost=100), "time_cost"),
    (lambda: wrap_for_user(b"short", "pw", BINDING, TEST_ARGON2), "32 bytes"),
    (lambda: wrap_for_user(new_data_key(), "", BINDING, TEST_ARGON2), "password"),
    (lambda: wrap_for_escrow(new_data_key(), b"k", "id", BINDING), "escrow key"),
    (lambda: UserWrappedKey.from_json('{"format": 1, "kdf": "pbkdf2"}'), "argon2id"),
])
def test_bad_inputs_are_refused_clearly(make: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        make()  # type: ignore[operator]

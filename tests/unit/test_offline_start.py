"""Starting a desktop offline takes a valid lease and the user's password, in that order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from argon2 import low_level
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deskpool.domain.offline import LeaseRefused, OfflineLease, OfflinePolicy, sign_lease
from deskpool.domain.offline_keys import (
    TEST_ARGON2,
    KeyBinding,
    WrongPassword,
    new_data_key,
    wrap_for_user,
)
from deskpool.offline.start import OfflineStart, authorize_offline_start

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
DESKTOP = uuid.UUID(int=3)
CHECKOUT = uuid.UUID(int=4)
BASE = "ef" * 32
SERVER = Ed25519PrivateKey.generate()
KEY = new_data_key()
WRAPPED = wrap_for_user(KEY, "s3cret", KeyBinding("alice", DESKTOP, "laptop-7"), TEST_ARGON2)
LEASE = sign_lease(OfflineLease.grant(
    checkout_id=CHECKOUT, user="alice", desktop_id=DESKTOP, laptop_id="laptop-7",
    policy=OfflinePolicy(may_go_offline=True, max_days_offline=7, sync_every_days=5),
    base_sha256=BASE, now=NOW), SERVER)


def start(**kw: object) -> OfflineStart:
    args: dict[str, object] = dict(
        signed_lease=LEASE, server_key=SERVER.public_key(), wrapped_key=WRAPPED,
        password="s3cret", user="alice", desktop_id=DESKTOP, laptop_id="laptop-7",
        cached_base_sha256=BASE, now=NOW + timedelta(days=1))
    args.update(kw)
    return authorize_offline_start(**args)  # type: ignore[arg-type]


def test_a_valid_lease_and_the_right_password_unlock_the_key() -> None:
    started = start()
    assert started.data_key == KEY
    assert started.notice == (
        "connect to the network and sync within 4 day(s), before 2026-12-12 09:00 UTC")
    assert KEY.hex() not in repr(started)


def test_an_expired_lease_refuses_before_the_password_is_even_tried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kdf(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the password was derived although the lease had expired")

    monkeypatch.setattr(low_level, "hash_secret_raw", no_kdf)
    monkeypatch.setattr("deskpool.domain.offline_keys.hash_secret_raw", no_kdf)
    with pytest.raises(LeaseRefused, match=r"expired on 2026-12-12 09:00 UTC; connect"):
        start(now=NOW + timedelta(days=6), password="wrong")


def test_the_wrong_password_with_a_valid_lease_is_refused() -> None:
    with pytest.raises(WrongPassword, match=r"^wrong password"):
        start(password="S3cret")


def test_another_cached_base_is_refused() -> None:
    with pytest.raises(LeaseRefused, match="template image cached on this laptop"):
        start(cached_base_sha256="00" * 32)


def test_a_revoked_checkout_is_refused() -> None:
    with pytest.raises(LeaseRefused, match="revoked"):
        start(revoked_checkouts={CHECKOUT})


def test_a_clock_set_back_behind_the_last_run_is_refused() -> None:
    """Setting the clock back into the lease's window would stretch it; the client's
    high-water mark catches that."""
    last_run = NOW + timedelta(days=4, hours=23)
    with pytest.raises(LeaseRefused, match="clock is behind 2026-12-12 08:00 UTC"):
        start(now=NOW + timedelta(days=1), latest_seen=last_run)
    assert start(now=last_run + timedelta(minutes=1), latest_seen=last_run)

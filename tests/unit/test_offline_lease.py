"""Offline policy validation and the signed lease a laptop needs to start a desktop offline."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deskpool.domain.errors import InvalidInput
from deskpool.domain.offline import (
    LeaseRefused,
    OfflineLease,
    OfflinePolicy,
    SignedLease,
    reconnect_notice,
    sign_lease,
    verify_lease,
)

NOW = datetime(2026, 12, 7, 9, 30, 15, 123456, tzinfo=UTC)
BASE = "ab" * 32
POLICY = OfflinePolicy(may_go_offline=True, max_days_offline=10, sync_every_days=3)
DESKTOP = uuid.UUID("00000000-0000-4000-8000-000000000001")
CHECKOUT = uuid.UUID("00000000-0000-4000-8000-0000000000c0")


def _lease(policy: OfflinePolicy = POLICY, now: datetime = NOW) -> OfflineLease:
    return OfflineLease.grant(checkout_id=CHECKOUT, user="alice", desktop_id=DESKTOP,
                              laptop_id="laptop-7", policy=policy, base_sha256=BASE, now=now)


def _verify(signed: SignedLease, key: Ed25519PrivateKey, now: datetime,
            **kw: object) -> OfflineLease:
    args: dict[str, object] = {"user": "alice", "desktop_id": DESKTOP, "laptop_id": "laptop-7"}
    args.update(kw)
    return verify_lease(signed, key.public_key(), now=now, **args)  # type: ignore[arg-type]


# --- policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_days_offline": 0}, "max_days_offline"),
    ({"max_days_offline": 366}, "max_days_offline"),
    ({"max_days_offline": 5, "sync_every_days": 6}, "sync_every_days"),
    ({"sync_every_days": 0}, "sync_every_days"),
    ({"max_days_offline": True}, "max_days_offline"),  # a bool is not a day count
    ({"usb_passthrough": 1}, "usb_passthrough"),
    ({"printing": "no"}, "printing"),
])
def test_policy_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        OfflinePolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_round_trips_and_rejects_unknown_or_missing_fields() -> None:
    policy = OfflinePolicy(may_go_offline=True, max_days_offline=30, sync_every_days=30,
                           usb_passthrough=True)
    assert OfflinePolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(InvalidInput, match=r"unknown field.*clipboard"):
        OfflinePolicy.from_dict({**policy.to_dict(), "clipboard": True})
    partial = policy.to_dict()
    del partial["printing"]
    with pytest.raises(InvalidInput, match=r"missing field.*printing"):
        OfflinePolicy.from_dict(partial)


def test_lease_lasts_the_earlier_of_the_two_limits() -> None:
    assert _lease().expires_at - _lease().issued_at == timedelta(days=3)
    loose = OfflinePolicy(may_go_offline=True, max_days_offline=4, sync_every_days=4)
    assert _lease(loose).expires_at - _lease(loose).issued_at == timedelta(days=4)


def test_a_pool_that_may_not_go_offline_gets_no_lease() -> None:
    with pytest.raises(InvalidInput, match="does not allow offline"):
        _lease(OfflinePolicy())


def test_a_lease_longer_than_the_policy_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="later than the policy allows"):
        OfflineLease(checkout_id=CHECKOUT, user="alice", desktop_id=DESKTOP,
                     laptop_id="laptop-7", policy=POLICY, issued_at=NOW,
                     expires_at=NOW + timedelta(days=4), base_sha256=BASE)


# --- canonical form and signature ---------------------------------------------------------


def test_canonical_bytes_are_stable_and_name_everything() -> None:
    lease = _lease()
    data = lease.canonical_bytes()
    assert data == _lease().canonical_bytes()
    assert b" " not in data  # no whitespace: one serialization only
    body = json.loads(data)
    assert list(body) == sorted(body)
    assert body["issued_at"] == "2026-12-07T09:30:15Z"  # whole seconds, UTC
    assert body["expires_at"] == "2026-12-10T09:30:15Z"
    assert {body["user"], body["laptop_id"], body["desktop_id"], body["base_sha256"]} == {
        "alice", "laptop-7", str(DESKTOP), BASE}
    assert body["policy"] == POLICY.to_dict()
    assert OfflineLease.from_canonical_bytes(data) == lease
    # The same instant in another zone is the same lease.
    other_zone = NOW.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    assert _lease(now=other_zone).canonical_bytes() == data


def test_signed_lease_verifies_and_survives_storage() -> None:
    key = Ed25519PrivateKey.generate()
    signed = SignedLease.from_json(sign_lease(_lease(), key).to_json())
    lease = _verify(signed, key, NOW + timedelta(days=2))
    assert lease == _lease()
    assert "within 1 day(s)" in reconnect_notice(lease, NOW + timedelta(days=2))


@pytest.mark.parametrize("tamper", [
    lambda b: b.replace(b'"usb_passthrough":false', b'"usb_passthrough":true'),
    lambda b: b.replace(b"2026-12-10", b"2027-12-10"),
    lambda b: b.replace(b"alice", b"alicf"),
])
def test_a_tampered_lease_is_refused(tamper: object) -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_lease(_lease(), key)
    forged = SignedLease(lease_bytes=tamper(signed.lease_bytes),  # type: ignore[operator]
                         signature=signed.signature)
    assert forged.lease_bytes != signed.lease_bytes
    with pytest.raises(LeaseRefused, match="not signed by the server"):
        _verify(forged, key, NOW)


def test_a_lease_signed_by_another_key_is_refused() -> None:
    signed = sign_lease(_lease(), Ed25519PrivateKey.generate())
    with pytest.raises(LeaseRefused, match="not signed by the server"):
        _verify(signed, Ed25519PrivateKey.generate(), NOW)


def test_an_expired_lease_is_refused_with_the_reconnect_date() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_lease(_lease(), key)
    with pytest.raises(LeaseRefused) as refused:
        _verify(signed, key, NOW + timedelta(days=3, seconds=1))
    assert str(refused.value) == (
        "this desktop's offline lease expired on 2026-12-10 09:30 UTC; connect to the network "
        "and sync to renew it")
    assert refused.value.reconnect_by == datetime(2026, 12, 10, 9, 30, 15, tzinfo=UTC)
    # One second before expiry it still starts.
    assert _verify(signed, key, NOW + timedelta(days=3) - timedelta(seconds=1))


def test_a_revoked_checkout_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_lease(_lease(), key)
    with pytest.raises(LeaseRefused, match=r"revoked.*connect to the network now"):
        _verify(signed, key, NOW, revoked_checkouts={uuid.uuid4(), CHECKOUT})
    assert _verify(signed, key, NOW, revoked_checkouts={uuid.uuid4()})


@pytest.mark.parametrize("kw", [{"user": "bob"}, {"laptop_id": "laptop-8"},
                                {"desktop_id": uuid.uuid4()}])
def test_a_lease_for_another_user_laptop_or_desktop_is_refused(kw: dict[str, object]) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(LeaseRefused, match="another user, desktop or laptop"):
        _verify(sign_lease(_lease(), key), key, NOW, **kw)


def test_a_clock_wound_back_before_the_lease_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_lease(_lease(), key)
    assert _verify(signed, key, NOW - timedelta(minutes=5))  # small skew is tolerated
    with pytest.raises(LeaseRefused, match="after this laptop's clock"):
        _verify(signed, key, NOW - timedelta(hours=2))


def test_an_unreadable_stored_lease_is_refused() -> None:
    with pytest.raises(LeaseRefused, match="unreadable"):
        SignedLease.from_json("{not json")

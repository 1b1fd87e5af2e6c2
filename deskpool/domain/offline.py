"""Offline desktops (issue 15): a pool's offline policy and the lease that lets a laptop start
its checked-out copy without the network.

The lease is the laptop's only proof that it may run the desktop offline: the server signs it
(Ed25519) at check-out and at every sync; the laptop checks the signature, its own identity and
the expiry before it unlocks the disk. Its expiry is the earlier of "maximum days offline" and
"must sync every N days", so one date answers "when must I reconnect".

Pure logic: no I/O. Keys are passed in; where they live is the caller's business.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deskpool.domain.errors import AuthenticationFailed, Conflict, InvalidInput

MAX_DAYS_OFFLINE_LIMIT = 365
LEASE_FORMAT = 1  # bumped when the canonical form changes; a laptop refuses what it cannot read
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A laptop's clock may run a little ahead of the server's; more than this and the lease is
# refused as "not yet valid", which is what a wound-back clock looks like.
CLOCK_SKEW = timedelta(minutes=10)


@dataclass(frozen=True)
class OfflinePolicy:
    """What a pool allows a checked-out desktop to do on a laptop. Every field is enforced on
    the laptop (lease expiry, the domain definition, the client), not merely recorded."""

    may_go_offline: bool = False
    max_days_offline: int = 14
    sync_every_days: int = 7
    may_roll_back: bool = False  # the laptop may revert to its last synced state
    usb_passthrough: bool = False
    printing: bool = False
    offline_sso: bool = False  # single sign-on into the guest while offline

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = bool if f.type in ("bool", bool) else int
            # bool is an int subclass: a True where a day count belongs is a mistake.
            if type(value) is not expected:
                raise InvalidInput(
                    f"offline policy field {f.name} must be {expected.__name__}, "
                    f"got {type(value).__name__}")
        if not 1 <= self.max_days_offline <= MAX_DAYS_OFFLINE_LIMIT:
            raise InvalidInput(
                f"offline policy field max_days_offline must be between 1 and "
                f"{MAX_DAYS_OFFLINE_LIMIT}, got {self.max_days_offline}")
        if not 1 <= self.sync_every_days <= self.max_days_offline:
            raise InvalidInput(
                f"offline policy field sync_every_days must be between 1 and max_days_offline "
                f"({self.max_days_offline}), got {self.sync_every_days}")

    def offline_period(self) -> timedelta:
        """How long one lease lasts: a laptop must be back by the earlier of the two limits."""
        return timedelta(days=min(self.max_days_offline, self.sync_every_days))

    def to_dict(self) -> dict[str, bool | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OfflinePolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"offline policy has unknown field(s): {', '.join(unknown)}")
        missing = sorted(known - set(data))
        if missing:
            raise InvalidInput(f"offline policy is missing field(s): {', '.join(missing)}")
        return cls(**data)


class CheckedOut(Conflict):
    """The desktop is offline on a laptop: online use waits for its check-in."""


class LeaseRefused(AuthenticationFailed):
    """The laptop may not start the desktop offline: the lease is forged, expired, revoked or
    for another laptop/desktop/user. ``reconnect_by`` says until when the user had (None when
    the answer is "now")."""

    def __init__(self, message: str, *, reconnect_by: datetime | None = None) -> None:
        super().__init__(message)
        self.reconnect_by = reconnect_by


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise InvalidInput(f"lease field {name} must be timezone-aware (UTC)")
    # Whole seconds: the canonical form must not depend on sub-second noise.
    return moment.astimezone(UTC).replace(microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: object, name: str) -> datetime:
    if not isinstance(text, str):
        raise InvalidInput(f"lease field {name} must be a UTC time string")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidInput(f"lease field {name} is not a UTC time: {text!r}") from None


def human_date(moment: datetime) -> str:
    """How a date is shown to the user in a refusal: unambiguous, UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class OfflineLease:
    """What the server grants one laptop for one check-out of one desktop."""

    checkout_id: uuid.UUID  # revocation names this
    user: str
    desktop_id: uuid.UUID
    laptop_id: str
    policy: OfflinePolicy
    issued_at: datetime
    expires_at: datetime
    base_sha256: str  # the cached template the laptop's layer sits on

    def __post_init__(self) -> None:
        for name in ("user", "laptop_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 256:
                raise InvalidInput(f"lease field {name} must be a non-empty string "
                                   "of at most 256 characters")
        if not self.policy.may_go_offline:
            raise InvalidInput("lease field policy: the pool does not allow offline use")
        if not _SHA256_HEX.match(self.base_sha256):
            raise InvalidInput("lease field base_sha256 must be 64 lowercase hex digits")
        object.__setattr__(self, "issued_at", _utc(self.issued_at, "issued_at"))
        object.__setattr__(self, "expires_at", _utc(self.expires_at, "expires_at"))
        if self.expires_at <= self.issued_at:
            raise InvalidInput("lease field expires_at must be after issued_at")
        if self.expires_at - self.issued_at > self.policy.offline_period():
            raise InvalidInput("lease field expires_at is later than the policy allows")

    @classmethod
    def grant(cls, *, checkout_id: uuid.UUID, user: str, desktop_id: uuid.UUID,
              laptop_id: str, policy: OfflinePolicy, base_sha256: str,
              now: datetime) -> OfflineLease:
        """A lease from ``now`` for as long as the policy allows (the earlier limit wins)."""
        issued = _utc(now, "issued_at")
        return cls(checkout_id=checkout_id, user=user, desktop_id=desktop_id,
                   laptop_id=laptop_id, policy=policy, issued_at=issued,
                   expires_at=issued + policy.offline_period(), base_sha256=base_sha256)

    def canonical_bytes(self) -> bytes:
        """The bytes that are signed: sorted keys, no spaces, UTF-8, times in whole UTC
        seconds. Two equal leases always give the same bytes."""
        body = {
            "format": LEASE_FORMAT,
            "checkout_id": str(self.checkout_id),
            "user": self.user,
            "desktop_id": str(self.desktop_id),
            "laptop_id": self.laptop_id,
            "policy": self.policy.to_dict(),
            "issued_at": _iso(self.issued_at),
            "expires_at": _iso(self.expires_at),
            "base_sha256": self.base_sha256,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> OfflineLease:
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput("the lease is not valid JSON") from None
        if not isinstance(body, dict) or body.get("format") != LEASE_FORMAT:
            raise InvalidInput(f"the lease is not in format {LEASE_FORMAT}")
        try:
            policy = body["policy"]
            if not isinstance(policy, dict):
                raise InvalidInput("lease field policy must be an object")
            return cls(
                checkout_id=uuid.UUID(str(body["checkout_id"])),
                user=body["user"],
                desktop_id=uuid.UUID(str(body["desktop_id"])),
                laptop_id=body["laptop_id"],
                policy=OfflinePolicy.from_dict(policy),
                issued_at=_parse_iso(body["issued_at"], "issued_at"),
                expires_at=_parse_iso(body["expires_at"], "expires_at"),
                base_sha256=body["base_sha256"],
            )
        except KeyError as exc:
            raise InvalidInput(f"the lease is missing field {exc.args[0]}") from None
        except ValueError as exc:  # a malformed UUID
            raise InvalidInput(f"the lease has a malformed field: {exc}") from None


@dataclass(frozen=True)
class SignedLease:
    """A lease as it travels and rests on the laptop: the exact signed bytes and the
    signature. Verification reads the lease back from those bytes, never re-serializes."""

    lease_bytes: bytes
    signature: bytes

    def to_json(self) -> str:
        return json.dumps({"lease": self.lease_bytes.decode("utf-8"),
                           "signature": self.signature.hex()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SignedLease:
        try:
            body = json.loads(text)
            return cls(lease_bytes=str(body["lease"]).encode("utf-8"),
                       signature=bytes.fromhex(str(body["signature"])))
        except (ValueError, KeyError, TypeError):
            raise LeaseRefused("the offline lease on this laptop is unreadable; connect to "
                               "the network and sync to get a new one") from None


def sign_lease(lease: OfflineLease, key: Ed25519PrivateKey) -> SignedLease:
    data = lease.canonical_bytes()
    return SignedLease(lease_bytes=data, signature=key.sign(data))


def verify_lease(signed: SignedLease, server_key: Ed25519PublicKey, *, now: datetime,
                 user: str, desktop_id: uuid.UUID, laptop_id: str,
                 revoked_checkouts: Collection[uuid.UUID] = (),
                 latest_seen: datetime | None = None) -> OfflineLease:
    """The lease, if this laptop may start this desktop for this user at ``now``.

    ``revoked_checkouts`` is what the laptop last heard from the server; offline it cannot hear
    more, which is why leases are short. ``latest_seen`` is the latest time the client has
    recorded (its high-water mark): a clock set back behind it, to stretch a lease, is
    refused. Refusals are ``LeaseRefused`` with a sentence the client shows as is.
    """
    try:
        server_key.verify(signed.signature, signed.lease_bytes)
    except InvalidSignature:
        raise LeaseRefused("this desktop's offline lease is not signed by the server (it was "
                           "altered or is forged); connect to the network and sync") from None
    try:
        lease = OfflineLease.from_canonical_bytes(signed.lease_bytes)
    except InvalidInput as exc:  # signed yet unreadable: a server from another version
        raise LeaseRefused(f"this desktop's offline lease cannot be read ({exc}); connect to "
                           "the network and sync") from None
    if (lease.user, lease.desktop_id, lease.laptop_id) != (user, desktop_id, laptop_id):
        raise LeaseRefused("this offline lease was issued for another user, desktop or laptop")
    if lease.checkout_id in revoked_checkouts:
        raise LeaseRefused("this desktop's check-out was revoked by an administrator; connect "
                           "to the network now to check it in")
    now = _utc(now, "now")
    if latest_seen is not None and now + CLOCK_SKEW < _utc(latest_seen, "latest_seen"):
        raise LeaseRefused(
            f"this laptop's clock is behind {human_date(latest_seen)}, when this desktop last "
            "ran; set the clock right or connect to the network and sync")
    if now >= lease.expires_at:
        raise LeaseRefused(
            f"this desktop's offline lease expired on {human_date(lease.expires_at)}; connect "
            "to the network and sync to renew it", reconnect_by=lease.expires_at)
    if now + CLOCK_SKEW < lease.issued_at:
        raise LeaseRefused(
            f"this desktop's offline lease starts on {human_date(lease.issued_at)}, after this "
            "laptop's clock; set the clock right or connect to the network and sync")
    return lease


def reconnect_notice(lease: OfflineLease, now: datetime) -> str:
    """What the client says at start while the lease is still valid."""
    left = lease.expires_at - _utc(now, "now")
    days = left.days
    when = human_date(lease.expires_at)
    if days >= 1:
        return f"connect to the network and sync within {days} day(s), before {when}"
    return f"connect to the network and sync today, before {when}"

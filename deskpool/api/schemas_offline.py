"""Request and response bodies of the offline desktops' API (issue 15)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from deskpool.domain.offline import MAX_DAYS_OFFLINE_LIMIT
from deskpool.domain.states import DesktopState

Days = Annotated[int, Field(ge=1, le=MAX_DAYS_OFFLINE_LIMIT, strict=True)]
LaptopName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                                  description="the laptop's name, as it checked out")]


class OfflinePolicyBody(BaseModel):
    """A pool's offline policy (``domain.offline.OfflinePolicy``); every field is enforced
    on the laptop. ``sync_every_days`` is at most ``max_days_offline``."""

    model_config = ConfigDict(extra="forbid")

    may_go_offline: bool = Field(default=False, strict=True)
    max_days_offline: Days = 14
    sync_every_days: Days = 7
    may_roll_back: bool = Field(default=False, strict=True)
    usb_passthrough: bool = Field(default=False, strict=True)
    printing: bool = Field(default=False, strict=True)
    offline_sso: bool = Field(default=False, strict=True)


class OfflinePolicyChange(BaseModel):
    """The offline policy fields to change; the ones left out stay."""

    model_config = ConfigDict(extra="forbid")

    may_go_offline: bool | None = Field(default=None, strict=True)
    max_days_offline: Days | None = None
    sync_every_days: Days | None = None
    may_roll_back: bool | None = Field(default=None, strict=True)
    usb_passthrough: bool | None = Field(default=None, strict=True)
    printing: bool | None = Field(default=None, strict=True)
    offline_sso: bool | None = Field(default=None, strict=True)


class CheckoutOut(BaseModel):
    id: uuid.UUID
    desktop: str
    pool: str
    user: str
    laptop: str
    status: Literal["out", "checked-in", "rolled-back", "forced-in"]
    since: datetime
    lease_expires_at: datetime
    last_sync_at: datetime | None
    revoked: bool
    bytes_pending: int
    transfer: Literal["checkin", "sync"] | None
    ended_at: datetime | None


class OfflineDesktopOut(BaseModel):
    desktop: str
    pool: str
    state: DesktopState
    policy: OfflinePolicyBody
    checkout: CheckoutOut | None


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    laptop: LaptopName


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    laptop: LaptopName
    bytes_pending: Annotated[int, Field(ge=0, le=2**62, strict=True)] | None = None


class LeaseOut(BaseModel):
    checkout: CheckoutOut
    lease: str = Field(description="the signed lease (JSON) the laptop keeps")
    public_key_pem: str = Field(description="the server's Ed25519 key that signs leases")
    base_sha256: str
    layer_sha256: str
    data_key: str | None = Field(
        default=None, description="the layer's data key (base64), at check-out only: wrap "
        "it under the user's password on the laptop; it is never shown again")


class TransferOut(BaseModel):
    desktop: str
    kind: Literal["checkin", "sync"]
    chunks: int
    missing: list[int]
    bytes_pending: int


class TransferDone(BaseModel):
    """A check-in answers the ended check-out; a sync also its renewed lease."""

    checkout: CheckoutOut
    lease: LeaseOut | None = None


class PublicKeyOut(BaseModel):
    public_key_pem: str

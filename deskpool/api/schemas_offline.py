"""Request and response bodies of the offline desktops' API (issue 15)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from deskpool.api.schemas import NUMBER, OfflinePolicyBody
from deskpool.domain.states import DesktopState

LaptopName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                                  description="the laptop's name, as it checked out")]


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
    base_sha256: str = Field(default="", description="the template image a check-out "
                             "downloads (unless the laptop has it cached)")
    base_size: int = Field(default=0, description="its size in bytes")


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    laptop: LaptopName


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    laptop: LaptopName
    bytes_pending: Annotated[int, Field(ge=0, le=2**62), NUMBER] | None = None


class LeaseOut(BaseModel):
    checkout: CheckoutOut
    lease: str = Field(description="the signed lease (JSON) the laptop keeps")
    public_key_pem: str = Field(description="the server's Ed25519 key that signs leases")
    base_sha256: str
    layer_sha256: str
    base_size: int = Field(default=0, description="bytes of the template's base image")
    layer_size: int = Field(default=0, description="bytes of the encrypted layer file")
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


class BootFileOut(BaseModel):
    sha256: str
    size: int


class OfflineMachineOut(BaseModel):
    """The machine a checked-out desktop runs as on the laptop (``services/offline_machine``)."""

    vcpus: int
    memory_mib: int
    mac: str
    cmdline: str | None = Field(description="direct kernel boot's command line; null: the "
                                            "disk boots itself")
    identity_text: str | None = Field(description="the guest's identity, through fw_cfg")
    kernel: BootFileOut | None
    initrd: BootFileOut | None

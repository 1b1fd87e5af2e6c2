"""Process-wide settings, read from ``DESKPOOL_*`` environment variables.

Kept outside the layers: every layer may read settings, none may write them.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DESKPOOL_", extra="ignore")

    data_dir: Path = Path("/var/lib/deskpool")
    database_url: str | None = None
    # Where the local host keeps deskpool's libvirt storage pool (images, desktop disks).
    storage_dir: Path | None = None
    # The broker's web server and its console proxy (websockify).
    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    console_port: int = 6080
    # remote-viewer's SPICE connections: an HTTP CONNECT proxy admitting ticketed clients only.
    spice_proxy_port: int = 6081
    # The SPICE proxy's name as clients reach it, when not the portal's (a reverse proxy).
    spice_proxy_host: str | None = None
    # RDP clients (.rdp files): a proxy admitting connections whose first packet carries an RDP
    # ticket (0: none), and its name as clients reach it, when not the portal's.
    rdp_proxy_port: int = 3390
    rdp_proxy_host: str | None = None
    # Host names of web pages, besides the console proxy's own, whose consoles it serves (a
    # portal behind a reverse proxy under another name), e.g. '["vdi.example.com"]'.
    console_allowed_origins: list[str] = []
    novnc_dir: Path = Path("/usr/share/novnc")
    # HTTPS for the portal and API, and wss:// for consoles, when both are set (PEM files).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The broker's background loops. Bounded: 0, a negative number or NaN would spin a loop or
    # stop it, and a huge one would stop the reconciler or the session timers for everyone.
    reconcile_interval_s: float = Field(default=5.0, ge=0.1, le=3600, allow_inf_nan=False)
    timers_interval_s: float = Field(default=2.0, ge=0.1, le=3600, allow_inf_nan=False)
    ready_timeout_s: float = Field(default=240.0, ge=1, le=3600, allow_inf_nan=False)
    # A host silent this long is marked down.
    host_down_after_s: float = Field(default=60.0, ge=1, le=86400, allow_inf_nan=False)
    # A broker's claim on a desktop's or pool's work, renewed while it works: how soon the
    # others take over from a broker that died.
    lease_s: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    # Log lines as plain text, or one JSON object each (with the request id and the user).
    log_format: Literal["text", "json"] = "text"
    # When set, /metrics answers only a scraper sending "Authorization: Bearer <it>".
    metrics_token: str | None = None
    # Sign-in protection: after this many failed sign-ins within the window, a user name
    # (known or not) or a client address is locked out; each further lock lasts twice the last,
    # up to the cap. A success clears the user's count, not the address's.
    signin_user_max_failures: int = Field(default=5, ge=1)
    signin_address_max_failures: int = Field(default=20, ge=1)
    signin_window_s: float = Field(default=900.0, gt=0)
    signin_lock_s: float = Field(default=30.0, gt=0)
    signin_lock_max_s: float = Field(default=900.0, gt=0)
    # An LDAP / Active Directory to sign users in with (besides local users), when set.
    ldap_url: str | None = None
    ldap_bind_dn: str | None = None
    ldap_bind_password: str | None = None
    ldap_user_base: str | None = None
    ldap_group_base: str | None = None
    ldap_user_filter: str | None = None
    ldap_group_filter: str | None = None

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'deskpool.db'}"

    @property
    def image_cache_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"

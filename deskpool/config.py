"""Process-wide settings: ``DESKPOOL_*`` environment variables over a TOML configuration file.

Kept outside the layers: every layer may read settings, none may write them.

The file is ``$DESKPOOL_CONFIG`` when set (``deskpool serve --config FILE`` sets it; set but
empty: no file), else ``/etc/deskpool/deskpool.toml`` when it exists. Its keys are the setting
names below (``listen_port = 8443``, as ``DESKPOOL_LISTEN_PORT`` is the variable); every value
is checked as the file is read, so an unknown key or a wrong type is an error naming the key,
the file and its line, before anything starts. Precedence: arguments given in code, then the
environment, then the file, then the defaults.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from deskpool.domain.errors import InvalidInput

CONFIG_ENV = "DESKPOOL_CONFIG"
DEFAULT_CONFIG_FILE = Path("/etc/deskpool/deskpool.toml")


class ConfigFileError(InvalidInput):
    """The configuration file cannot be read, or holds a key or value deskpool refuses."""


def config_file_path() -> Path | None:
    """The configuration file this process reads, or None when there is none to read."""
    named = os.environ.get(CONFIG_ENV)
    if named is not None:
        return Path(named) if named.strip() else None
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _line_of(text: str, key: str) -> int | None:
    """Where ``key`` is set (or opens a table) in the file; tomllib reports lines only for
    syntax errors, so a bad value is located by its key."""
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}\s*=|\[+\s*{re.escape(key)}\s*[].])")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def read_config_file(path: Path, fields: dict[str, FieldInfo]) -> dict[str, Any]:
    """The file's settings, each checked against its field; raises ``ConfigFileError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read the configuration file {path}: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from exc

    def where(key: str) -> str:
        line = _line_of(text, key)
        return f"{path}:{line}" if line else str(path)

    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the README lists every one"
            raise ConfigFileError(f"{where(key)}: unknown setting {key!r} ({hint})")
        annotation: Any = field.annotation
        if field.metadata:  # constraints such as Field(gt=0)
            annotation = Annotated[annotation, *field.metadata]
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        try:
            values[key] = adapter.validate_python(value)
        except ValidationError as exc:
            problems = "; ".join(e["msg"].lower() for e in exc.errors())
            raise ConfigFileError(f"{where(key)}: setting {key!r} = {value!r}: {problems}"
                                  ) from None
    return values


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML file's values, below the environment's."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = config_file_path()
        if path is None:
            return {}
        if not path.is_file():
            raise ConfigFileError(f"the configuration file {path} ({CONFIG_ENV}) does not "
                                  "exist or is not a file")
        return read_config_file(path, self.settings_cls.model_fields)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DESKPOOL_", extra="ignore")

    data_dir: Path = Path("/var/lib/deskpool")
    database_url: str | None = None
    # Where the local host keeps deskpool's libvirt storage pool (images, desktop disks).
    storage_dir: Path | None = None
    # Where users' roaming profiles (qcow2 layers, one directory per user) are kept.
    profile_dir: Path | None = None
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
    # A down host's stateful desktop that could not be restarted on a host sharing its
    # storage (its disk still locked, no room) is tried again this often.
    ha_retry_s: float = Field(default=60.0, ge=1, le=86400, allow_inf_nan=False)
    # A draining host's desktops in use move live to other hosts; off, their users are
    # warned and logged off at the drain's deadline, as for desktops that cannot move.
    drain_by_migration: bool = True
    # Load balancing (off by default): every balance_interval_s the reconciler moves running
    # desktops of pools with ``balance`` live off hosts whose measured memory or CPU use is
    # above the high watermark, until it is back in the middle of the band, onto hosts left
    # at or below the low one; see deskpool.scheduler.balancer for the whole policy.
    balance_enabled: bool = False
    balance_interval_s: float = Field(default=300.0, ge=1, le=86400, allow_inf_nan=False)
    balance_memory_high: float = Field(default=0.85, gt=0, le=1, allow_inf_nan=False)
    balance_memory_low: float = Field(default=0.70, gt=0, le=1, allow_inf_nan=False)
    balance_cpu_high: float = Field(default=0.80, gt=0, le=1, allow_inf_nan=False)
    balance_cpu_low: float = Field(default=0.60, gt=0, le=1, allow_inf_nan=False)
    balance_max_moves_per_host_per_hour: int = Field(default=4, ge=0, le=1000)
    balance_max_concurrent_moves: int = Field(default=10, ge=0, le=1000)
    # A move must lower the pair of hosts' peak use by this fraction of capacity.
    balance_min_benefit: float = Field(default=0.02, ge=0, le=1, allow_inf_nan=False)
    # A desktop moved within this many seconds does not move again (no ping-pong).
    balance_cooldown_s: float = Field(default=7200.0, ge=0, le=7 * 86400, allow_inf_nan=False)
    # A broker's claim on a desktop's or pool's work, renewed while it works: how soon the
    # others take over from a broker that died.
    lease_s: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    # Roaming-profile maintenance by the reconciler: every this many seconds (0: never), it
    # flattens up to profile_flatten_per_run profiles whose chain is longer than their kept
    # generations and sweeps and verifies the profile_verify_per_run verified longest ago.
    profile_maintenance_interval_s: float = Field(default=900.0, ge=0, le=7 * 86400,
                                                  allow_inf_nan=False)
    profile_flatten_per_run: int = Field(default=2, ge=0, le=1000)
    profile_verify_per_run: int = Field(default=2, ge=0, le=1000)
    # Folder redirection (pools with redirect_folders): deskpool's own Samba server on this
    # machine, its smb.conf and password database under fileshare_dir (default
    # <data_dir>/samba), one share per user under fileshare_root (default <data_dir>/shares),
    # listening on fileshare_listen:fileshare_port; the desktops reach it at
    # fileshare_guest_address (user-mode networking: 10.0.2.2 is the host's loopback) and
    # fileshare_guest_port (default: fileshare_port). Each user's share holds at most
    # fileshare_quota_mib; its server account is fileshare_account_prefix + their uid.
    fileshare_dir: Path | None = None
    fileshare_root: Path | None = None
    fileshare_listen: str = "127.0.0.1"
    fileshare_port: int = Field(default=445, ge=1, le=65535)
    fileshare_guest_address: str = Field(default="10.0.2.2", pattern=r"^[A-Za-z0-9.:-]{1,253}$")
    fileshare_guest_port: int | None = Field(default=None, ge=1, le=65535)
    fileshare_quota_mib: int = Field(default=2048, ge=1, le=1 << 30)
    fileshare_account_prefix: str = Field(default="deskpool-u", pattern=r"^[a-z_][a-z0-9_-]{0,15}$")
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

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: code, then the environment, then the file.
        return (init_settings, env_settings, dotenv_settings,
                _ConfigFileSource(settings_cls), file_secret_settings)

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

    @property
    def resolved_profile_dir(self) -> Path:
        return self.profile_dir or self.data_dir / "profiles"

    @property
    def resolved_fileshare_dir(self) -> Path:
        return self.fileshare_dir or self.data_dir / "samba"

    @property
    def resolved_fileshare_root(self) -> Path:
        return self.fileshare_root or self.data_dir / "shares"

"""The laptop's directory: what it keeps of each checked-out desktop, laid out like the
server's copy so the encrypted layer's relative backing name works on both ends::

    laptop.json                        this laptop's name
    revoked.json                       check-outs revoked, as heard at the last contact
    bases/<sha256>.qcow2               template bases, downloaded once per version
    layers/<desktop id>/layer.qcow2    the desktop's encrypted layer (0600)
    layers/<desktop id>/since.manifest block checksums of the server's copy (last sync)
    layers/<desktop id>/since.map      where its guest clusters lay in the file then
    layers/<desktop id>/upload.plan    a check-in or sync in flight (resumed on re-run)
    desktops/<name>.json               lease, password-wrapped key, server key, sizes

No password and no plain data key is ever written: the key rests wrapped under the user's
password (Argon2id), the layer is LUKS ciphertext.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from deskpool.domain.errors import InvalidInput, NotFound

_LAPTOP_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def default_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "deskpool" / "offline"


def write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the owner only, on disk before it counts."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


@dataclass
class DesktopRecord:
    """One checked-out desktop on this laptop (``desktops/<name>.json``)."""

    desktop: str
    desktop_id: str
    user: str
    laptop: str
    checkout_id: str
    lease: str  # SignedLease JSON
    wrapped_key: str  # UserWrappedKey JSON
    public_key_pem: str
    base_sha256: str
    base_size: int
    layer_sha256: str  # the server's copy's digest as of the last sync (``BlockManifest``)
    layer_size: int
    policy: dict[str, Any] = field(default_factory=dict)
    # The machine it runs as (size, MAC, boot: the broker's ``.../machine``); {} before.
    machine: dict[str, Any] = field(default_factory=dict)
    downloaded: bool = False  # base, layer (and boot files) verified and in place
    latest_seen: str | None = None  # the latest start time: a clock set back is refused

    @property
    def latest_seen_at(self) -> datetime | None:
        return datetime.fromisoformat(self.latest_seen) if self.latest_seen else None


class LaptopDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def laptop_name(self, given: str | None = None) -> str:
        """The name given, else the one kept here, else this machine's host name."""
        path = self.root / "laptop.json"
        if given:
            return given
        if path.is_file():
            return str(json.loads(path.read_text())["laptop"])
        name = _LAPTOP_NAME.sub("-", socket.gethostname()).strip("-._")[:63] or "laptop"
        write_private(path, json.dumps({"laptop": name}).encode())
        return name

    def base(self, sha256: str) -> Path:
        return self.root / "bases" / f"{sha256}.qcow2"

    def boot_file(self, sha256: str, which: str) -> Path:
        """A template's kernel or initrd, cached by checksum like the bases."""
        return self.root / "boot" / f"{sha256}.{which}"

    def folder(self, record: DesktopRecord) -> Path:
        return self.root / "layers" / str(uuid.UUID(record.desktop_id))

    def layer(self, record: DesktopRecord) -> Path:
        return self.folder(record) / "layer.qcow2"

    def manifest(self, record: DesktopRecord) -> Path:
        return self.folder(record) / "since.manifest"

    def synced_map(self, record: DesktopRecord) -> Path:
        return self.folder(record) / "since.map"

    def upload_plan(self, record: DesktopRecord) -> Path:
        return self.folder(record) / "upload.plan"

    def _record_path(self, desktop: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", desktop):
            raise InvalidInput(f"{desktop!r} is not a desktop name")
        return self.root / "desktops" / f"{desktop}.json"

    def find(self, desktop: str) -> DesktopRecord | None:
        path = self._record_path(desktop)
        if not path.is_file():
            return None
        try:
            return DesktopRecord(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise InvalidInput(
                f"{path} is damaged ({exc}); check the desktop in from "
                "another laptop or ask an administrator to force it in"
            ) from None

    def load(self, desktop: str) -> DesktopRecord:
        record = self.find(desktop)
        if record is None:
            raise NotFound(
                f"desktop {desktop} is not checked out to this laptop (in "
                f"{self.root}); see 'deskpool offline status'"
            )
        return record

    def save(self, record: DesktopRecord) -> None:
        write_private(
            self._record_path(record.desktop),
            json.dumps(asdict(record), indent=1, sort_keys=True).encode(),
        )

    def records(self) -> list[DesktopRecord]:
        folder = self.root / "desktops"
        names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        return [self.load(name) for name in names]

    def forget(self, record: DesktopRecord) -> None:
        """After a check-in or rollback: the record, then the layer's folder; bases stay.
        The record goes first: a cut here leaves leftovers (cleared by the next check-out),
        never a record whose files are half gone. The folder is moved to ``trash/`` (one
        rename) and deleted by a detached process: freeing a GiB of fragmented layer takes
        seconds, and the command is done once the broker has committed. Without its record
        the layer in the trash is ciphertext whose key is nowhere on the laptop; any left
        there (a cut) go with the next check-out."""
        self._record_path(record.desktop).unlink(missing_ok=True)
        folder = self.folder(record)
        if not folder.is_dir():
            return
        trash = self.root / "trash" / uuid.uuid4().hex
        trash.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(folder, trash)
        # The shell puts rm in the background and returns at once (nothing left to reap).
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" &', "sh", str(trash)], check=False,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)

    def empty_trash(self) -> None:
        """What earlier check-ins left to delete (their deleting process was cut)."""
        shutil.rmtree(self.root / "trash", ignore_errors=True)

    def clear_folder(self, record: DesktopRecord) -> None:
        """Whatever an earlier check-out of this desktop left in its folder (and trash)."""
        self.empty_trash()
        folder = self.folder(record)
        for path in sorted(folder.glob("*"), reverse=True):
            path.unlink()
        if folder.is_dir():
            folder.rmdir()

    def revoked(self) -> list[uuid.UUID]:
        path = self.root / "revoked.json"
        if not path.is_file():
            return []
        return [uuid.UUID(i) for i in json.loads(path.read_text())]

    def save_revoked(self, ids: list[str]) -> None:
        write_private(self.root / "revoked.json", json.dumps(sorted(ids)).encode())

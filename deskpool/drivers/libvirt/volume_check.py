"""Checking that a template volume already on a host still holds what was imported.

A version's volume is imported once per host and then backs every linked clone made there;
bytes changed under it afterwards (a bad disk, a careless copy) would go into every new
desktop silently. Hashing the whole volume before each clone costs a full read each time, so
the driver remembers, per volume, the facts libvirt reports that any write changes (its
modification time and sizes) as they were when it last hashed or wrote it, and hashes again
only when they differ (or when this process has not hashed it yet, e.g. after a restart).
"""

from __future__ import annotations

import hashlib
import threading
import xml.etree.ElementTree as ET  # nosec B405: libvirt's own volume XML, not user input
from contextlib import suppress

import libvirt

from deskpool.domain.errors import ChecksumMismatch, DriverError


def volume_stamp(vol: libvirt.virStorageVol) -> str:
    """What changes when the volume's content is written: libvirt's modification time of
    its file (reading the XML refreshes it) and its sizes."""
    root = ET.fromstring(vol.XMLDesc(0))  # nosec B314
    mtime = root.findtext("./target/timestamps/mtime") or ""
    _kind, capacity, allocation = vol.info()
    return f"{mtime}/{capacity}/{allocation}"


def hash_volume(conn: libvirt.virConnect, vol: libvirt.virStorageVol) -> str:
    """sha256 (hex) of the volume's bytes, read through libvirt (so remote hosts work too)."""
    digest = hashlib.sha256()

    def sink(_stream: libvirt.virStream, data: bytes, _opaque: object) -> int:
        digest.update(data)
        return len(data)

    stream = conn.newStream(0)
    try:
        vol.download(stream, 0, 0, 0)
        stream.recvAll(sink, None)
        stream.finish()
    except BaseException:
        with suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return digest.hexdigest()


class VerifiedVolumes:
    """Per volume: its stamp when its sha256 was last known good (hashed or written here)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[str, str]] = {}

    def remember(self, name: str, stamp: str, sha256: str) -> None:
        with self._lock:
            self._known[name] = (stamp, sha256.lower())

    def forget(self, name: str) -> None:
        with self._lock:
            self._known.pop(name, None)

    def verify(self, conn: libvirt.virConnect, name: str, vol: libvirt.virStorageVol,
               sha256: str, where: str) -> bool:
        """Raise ``ChecksumMismatch`` when the volume's bytes are not ``sha256``; the volume is
        left as it is (running desktops may still read it). False when its file was removed
        behind libvirt's back (libvirt drops it then): there is nothing to check."""
        try:
            stamp = volume_stamp(vol)
            with self._lock:
                known = self._known.get(name)
            if known == (stamp, sha256.lower()):
                return True
            digest = hash_volume(conn, vol)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                self.forget(name)
                return False
            raise DriverError(f"checking volume {name} on {where} failed: "
                              f"{exc.get_error_message()}") from exc
        if digest != sha256.lower():
            self.forget(name)
            raise ChecksumMismatch(
                f"volume {name} on {where} is corrupt: its checksum is {digest}, "
                f"expected {sha256}")
        self.remember(name, stamp, digest)
        return True

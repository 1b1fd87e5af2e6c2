"""Template images uploaded to a libvirt host's storage pool (a mixin of ``LibvirtDriver``):
streamed and hashed on the way, never trusted when cut short, checked against their sha256
when already there (see ``HypervisorDriver.import_volume``)."""

from __future__ import annotations

import hashlib
import threading
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from deskpool.domain.errors import ChecksumMismatch, DriverError, NotFound
from deskpool.domain.models import VolumeInfo
from deskpool.drivers.libvirt import xml
from deskpool.drivers.libvirt.volume_check import VerifiedVolumes, volume_stamp

_UPLOAD_CHUNK = 4 * 1024 * 1024


class VolumeImportsMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock
        _is_test: bool
        _verified: VerifiedVolumes

        @property
        def _conn(self) -> libvirt.virConnect: ...
        @property
        def _pool(self) -> libvirt.virStoragePool: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...
        def _volume(self, name: str) -> libvirt.virStorageVol | None: ...
        def _failure(self, what: str, exc: libvirt.libvirtError) -> DriverError: ...
        def volume_info(self, name: str) -> VolumeInfo: ...

    def import_volume(self, name: str, source: Path, sha256: str | None = None) -> VolumeInfo:
        with self._lock:
            existing = self._volume(name)
            if existing is not None and self._is_test:
                return self.volume_info(name)  # test:/// volumes hold no data to check
            if existing is not None:
                physical = self._physical_bytes(name, existing)
                if physical is not None and (not source.is_file()
                                             or physical == source.stat().st_size):
                    # Checked; one whose file was removed by hand is imported afresh.
                    if sha256 is None or self._verified.verify(
                            self._conn, name, existing, sha256, self.uri):
                        return self.volume_info(name)
                elif physical is not None:
                    # Not the source's size: an upload a crash or a lost connection cut
                    # short (never a finished one: sources are immutable). Made again.
                    with self._translate(f"deleting the half-imported volume {name}"):
                        existing.delete(0)
                    self._verified.forget(name)
            if not source.is_file():
                raise NotFound(f"image file {source} does not exist")
            size = source.stat().st_size
            fmt = "qcow2" if _is_qcow2(source) else "raw"
            definition = xml.VolumeDefinition(name=name, capacity_bytes=size, format=fmt)
            with self._translate(f"creating volume {name}"):
                vol = self._pool.createXML(definition.to_xml(), 0)
            try:
                digest = self._upload(vol, source, size)
            except BaseException:
                with suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise
            if sha256 is not None and digest != sha256:
                with suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise ChecksumMismatch(
                    f"checksum of {source} is {digest}, expected {sha256}: volume not imported"
                )
            if sha256 is not None and not self._is_test:
                with self._translate(f"reading volume {name}"):
                    self._verified.remember(name, volume_stamp(vol), digest)
            return self.volume_info(name)

    def _physical_bytes(self, name: str, vol: libvirt.virStorageVol) -> int | None:
        """The size of the volume's file on the host (not its virtual size); None when the
        file was removed behind libvirt's back (libvirt drops the volume then)."""
        try:
            return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise self._failure(f"reading volume {name}", exc) from exc

    def _upload(self, vol: libvirt.virStorageVol, source: Path, size: int) -> str:
        """Stream the file into the volume; returns the sha256 of what was sent."""
        digest = hashlib.sha256()
        if self._is_test:
            # test:/// keeps volumes as metadata only and cannot receive data.
            with source.open("rb") as fh:
                for chunk in iter(lambda: fh.read(_UPLOAD_CHUNK), b""):
                    digest.update(chunk)
            return digest.hexdigest()
        with self._translate(f"uploading {source}"):
            stream = self._conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            try:
                with source.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(_UPLOAD_CHUNK), b""):
                        digest.update(chunk)
                        stream.send(chunk)
                stream.finish()
            except BaseException:
                with suppress(libvirt.libvirtError):
                    stream.abort()
                raise
        return digest.hexdigest()



def _is_qcow2(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"QFI\xfb"

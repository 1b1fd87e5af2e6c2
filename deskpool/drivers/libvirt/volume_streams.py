"""Volumes copied between libvirt hosts over the storage volume API (a mixin of
``LibvirtDriver``): ``virStorageVol.download`` into a ``virStream`` on the sending host,
``virStorageVol.upload`` from one on the receiving host, into a partial volume that is checked
(size and sha256) and only then published under its name (see
``HypervisorDriver.receive_volume``). libvirt has no volume rename: on this machine's system
daemon the pool's directory is renamed in (as ``overlays.py`` writes files there). Elsewhere
the host copies the partial to the final name (``createXMLFrom``) and the result is read back:
once a refresh has probed a partial's content as qcow2 (when is up to the daemon), libvirt
*converts* it instead of copying its bytes, and the receive then fails clearly with nothing
kept. A profile layer reaches such a host only when libvirt copied it byte for byte: a
publish that does not depend on that is still to be done."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from deskpool.domain.errors import ChecksumMismatch, Conflict, DriverError, NotFound
from deskpool.domain.models import VolumeInfo
from deskpool.drivers.base import partial_volume_name
from deskpool.drivers.libvirt import xml
from deskpool.drivers.libvirt.volume_check import VerifiedVolumes, volume_stamp


class VolumeStreamsMixin:
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
        def _local_pool_dir(self) -> Path | None: ...
        def _refresh_pool(self) -> None: ...
        def volume_info(self, name: str) -> VolumeInfo: ...

    @property
    def copies_volumes(self) -> bool:
        return not self._is_test

    def _refuse_test(self, what: str) -> None:
        if self._is_test:
            raise DriverError(f"{what} is not supported by this hypervisor ({self.uri}: "
                              "libvirt's test driver keeps volumes as metadata, no bytes)")

    def read_volume(self, name: str, *, chunk_bytes: int = 4 * 2**20) -> Iterator[bytes]:
        self._refuse_test("reading a volume")
        with self._lock:
            vol = self._volume(name)
            if vol is None:
                raise NotFound(f"volume {name} is not on host {self.uri}")
            with self._translate(f"starting the download of volume {name}"):
                stream = self._conn.newStream(0)
                vol.download(stream, 0, 0, 0)
        finished = False
        try:
            while True:
                with self._translate(f"reading volume {name}"):
                    data = stream.recv(max(chunk_bytes, 1))
                if isinstance(data, int):  # -2: would block (never, on a blocking stream)
                    continue
                if not data:
                    break
                yield data
            with self._translate(f"finishing the download of volume {name}"):
                stream.finish()
            finished = True
        finally:
            if not finished:
                with suppress(libvirt.libvirtError):
                    stream.abort()

    def receive_volume(self, name: str, chunks: Iterable[bytes], *, size: int, sha256: str,
                       progress: Callable[[int], None] | None = None) -> VolumeInfo:
        self._refuse_test("receiving a volume")
        partial = partial_volume_name(name)
        with self._lock:
            existing = self._volume(name)
            if existing is not None:
                try:
                    if self._verified.verify(self._conn, name, existing, sha256, self.uri):
                        return self.volume_info(name)
                except ChecksumMismatch as exc:
                    raise Conflict(f"volume {name} on {self.uri} holds other bytes: "
                                   f"{exc}") from exc
            left = self._volume(partial)
            if left is not None:  # an earlier cut's: written again
                with self._translate(f"deleting the partial volume {partial}"):
                    left.delete(0)
            definition = xml.VolumeDefinition(name=partial, capacity_bytes=max(size, 1),
                                              format="raw")
            with self._translate(f"creating volume {partial}"):
                vol = self._pool.createXML(definition.to_xml(), 0)
        try:
            count, digest = self._upload_chunks(vol, partial, chunks, size, progress)
            if count != size or digest != sha256.lower():
                raise ChecksumMismatch(
                    f"volume {name} arrived on {self.uri} as {count} bytes with sha256 "
                    f"{digest}, expected {size} bytes with {sha256}: not kept")
            with self._lock:
                published = self._publish(vol, partial, name, size, digest)
                with self._translate(f"reading volume {name}"):
                    self._verified.remember(name, volume_stamp(published), digest)
        except BaseException:
            with suppress(libvirt.libvirtError):
                vol.delete(0)
            raise
        return self.volume_info(name)

    def _upload_chunks(self, vol: libvirt.virStorageVol, partial: str,
                       chunks: Iterable[bytes], size: int,
                       progress: Callable[[int], None] | None) -> tuple[int, str]:
        digest = hashlib.sha256()
        count = 0
        with self._translate(f"uploading volume {partial}"):
            stream = self._conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            try:
                for chunk in chunks:
                    if count + len(chunk) > size:
                        raise ChecksumMismatch(f"more than the {size} bytes announced "
                                               f"arrived for {partial}: not kept")
                    view = memoryview(chunk)
                    while view:
                        sent = stream.send(bytes(view))
                        view = view[max(int(sent), 0):] if sent != -2 else view
                    digest.update(chunk)
                    count += len(chunk)
                    if progress is not None:
                        progress(count)
                if count != size:
                    # libvirt waits for ``size`` bytes: a short sender is a mismatch
                    raise ChecksumMismatch(f"only {count} of the {size} bytes announced "
                                           f"arrived for {partial}: not kept")
                stream.finish()
            except BaseException:
                with suppress(libvirt.libvirtError):
                    stream.abort()
                raise
        return count, digest.hexdigest()

    def _publish(self, vol: libvirt.virStorageVol, partial: str, name: str,
                 size: int, digest: str) -> libvirt.virStorageVol:
        """The checked partial under its final name."""
        local = self._local_pool_dir()
        if local is not None:
            os.rename(local / partial, local / name)  # atomic within the pool's directory
            self._refresh_pool()
            found = self._volume(name)
            if found is None:
                raise DriverError(f"volume {name} did not appear on {self.uri} after its rename")
            return found
        definition = xml.VolumeDefinition(name=name, capacity_bytes=max(size, 1), format="raw")
        with self._translate(f"publishing volume {name}"):
            final = self._pool.createXMLFrom(definition.to_xml(), vol, 0)
            vol.delete(0)
        # libvirt copies byte for byte only while it takes the partial for raw; a pool
        # refresh meanwhile probes its content as qcow2, and the copy becomes a conversion.
        # So the published bytes are read back before anyone is told they are there.
        try:
            if not self._verified.verify(self._conn, name, final, digest, self.uri):
                raise DriverError(f"volume {name} vanished from {self.uri} as it was published")
        except (DriverError, libvirt.libvirtError) as exc:
            with suppress(libvirt.libvirtError):
                final.delete(0)
            raise DriverError(f"volume {name} could not be published on {self.uri} (the "
                              f"host's copy of it differs: {exc}); nothing kept") from exc
        return final

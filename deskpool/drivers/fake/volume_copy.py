"""Volumes copied between fake hosts (``read_volume`` / ``receive_volume``), as libvirt's
volume streams do it: the receiver writes a partial volume, checks size and sha256, and only
then publishes it under its name. The fake keeps the received bytes in memory; an imported
volume is read from the file it was imported from.

Fault points: ``receive_volume`` (refused before anything is written),
``receive_volume.cut`` (half the bytes written, then the armed error is raised and the partial
volume is *left*, as a process killed mid-copy leaves it), ``receive_volume.publish`` (all bytes
checked, then a failure before the rename: the partial is removed, as a live process does).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from deskpool.domain.errors import ChecksumMismatch, Conflict, DriverError, NotFound
from deskpool.domain.models import VolumeInfo
from deskpool.drivers.base import partial_volume_name
from deskpool.drivers.fake.faults import FAULT_POINTS
from deskpool.drivers.fake.state import FakeVolume

FAULT_POINTS.update({"read_volume", "receive_volume", "receive_volume.cut",
                     "receive_volume.publish"})


class FakeVolumeCopyMixin:
    if TYPE_CHECKING:  # provided by FakeDriver
        uri: str
        _lock: threading.RLock
        _volumes: dict[str, FakeVolume]

        def _check_usable(self) -> None: ...
        def _maybe_fail(self, point: str) -> None: ...
        def _volume(self, name: str, what: str | None = None) -> FakeVolume: ...
        def _add_volume(self, name: str, capacity: int, allocation: int,
                        backing: str | None = None) -> FakeVolume: ...
        def _drop_volume(self, name: str) -> None: ...

    @property
    def copies_volumes(self) -> bool:
        return True

    def read_volume(self, name: str, *, chunk_bytes: int = 4 * 2**20) -> Iterator[bytes]:
        # The bytes are taken under this host's lock at the first next(), then yielded
        # without it: a receiver holding its own lock never waits on this one.
        with self._lock:
            self._check_usable()
            self._maybe_fail("read_volume")
            volume = self._volume(name)
            data = volume.data
            source = volume.source
        if data is None and source is not None:
            try:
                data = Path(source).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"the file of volume {name} on {self.uri} is gone") from None
        if data is None:
            raise DriverError(f"volume {name} on {self.uri} holds no bytes the fake can read "
                              "(only imported or received volumes do)")
        for start in range(0, len(data), max(chunk_bytes, 1)):
            yield data[start:start + chunk_bytes]

    def receive_volume(self, name: str, chunks: Iterable[bytes], *, size: int, sha256: str,
                       progress: Callable[[int], None] | None = None) -> VolumeInfo:
        partial = partial_volume_name(name)
        with self._lock:
            self._check_usable()
            self._maybe_fail("receive_volume")
            existing = self._volumes.get(name)
            if existing is not None:
                if existing.sha256 == sha256.lower():
                    return existing.info()
                raise Conflict(f"volume {name} on {self.uri} holds other bytes "
                               f"(sha256 {existing.sha256}, not {sha256})")
            self._drop_volume(partial)  # an earlier cut's: written again
            self._add_volume(partial, capacity=size, allocation=0)
        received = bytearray()
        digest = hashlib.sha256()
        try:
            for chunk in chunks:
                received += chunk
                digest.update(chunk)
                with self._lock:
                    self._check_usable()
                    held = self._volumes.get(partial)
                    if held is None:
                        raise DriverError(f"partial volume {partial} on {self.uri} vanished")
                    held.allocation = len(received)
                    if len(received) * 2 >= size:
                        try:
                            self._maybe_fail("receive_volume.cut")
                        except Exception as exc:  # the process "dies": nothing cleans up
                            raise _Cut(exc) from exc
                if progress is not None:
                    progress(len(received))
        except _Cut as cut:
            raise cut.error from None
        except BaseException:
            with self._lock:
                self._drop_volume(partial)
            raise
        with self._lock:
            try:
                if len(received) != size or digest.hexdigest() != sha256.lower():
                    raise ChecksumMismatch(
                        f"volume {name} arrived on {self.uri} as {len(received)} bytes with "
                        f"sha256 {digest.hexdigest()}, expected {size} bytes with {sha256}: "
                        "not kept")
                self._maybe_fail("receive_volume.publish")
            except BaseException:
                self._drop_volume(partial)
                raise
            volume = self._volumes.pop(partial)
            volume.name, volume.path = name, volume.path.removesuffix(".part")
            volume.data, volume.sha256 = bytes(received), digest.hexdigest()
            volume.allocation = volume.capacity = len(received)
            self._volumes[name] = volume
            return volume.info()


class _Cut(Exception):
    """``receive_volume.cut``'s armed error, carried past the cleanup of the partial."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error

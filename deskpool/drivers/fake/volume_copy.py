"""Volumes copied between fake hosts (``read_volume`` / ``receive_volume``), as libvirt's
volume streams do it: the receiver writes a partial volume, checks size and sha256, and only
then publishes it under its name. The fake keeps the received bytes in memory; an imported
volume is read from the file it was imported from.

``receive_volume`` is made of steps (``receive_begin``, ``receive_chunk``, ``receive_finish``,
``receive_abort``) that ``drivers.fake.remote`` calls one by one across processes, so a
broker killed mid-copy leaves the partial on the shared fake host as a real one would.

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
        data = self.volume_bytes(name)
        for start in range(0, len(data), max(chunk_bytes, 1)):
            yield data[start:start + chunk_bytes]

    def volume_bytes(self, name: str) -> bytes:
        """Every byte of an imported or received volume (``read_volume`` in one piece)."""
        with self._lock:
            self._check_usable()
            self._maybe_fail("read_volume")
            volume = self._volume(name)
            data, source = volume.data, volume.source
        if data is None and source is not None:
            try:
                data = Path(source).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"the file of volume {name} on {self.uri} is gone") from None
        if data is None:
            raise DriverError(f"volume {name} on {self.uri} holds no bytes the fake can read "
                              "(only imported or received volumes do)")
        return data

    def receive_volume(self, name: str, chunks: Iterable[bytes], *, size: int, sha256: str,
                       progress: Callable[[int], None] | None = None) -> VolumeInfo:
        existing = self.receive_begin(name, size, sha256)
        if existing is not None:
            return existing
        try:
            for chunk in chunks:
                done = self.receive_chunk(name, chunk, size)
                if progress is not None:
                    progress(done)
        except _Cut as cut:
            raise cut.error from None
        except BaseException:
            self.receive_abort(name)
            raise
        return self.receive_finish(name, size, sha256)

    def receive_begin(self, name: str, size: int, sha256: str) -> VolumeInfo | None:
        """Start receiving ``name``: its info when it is there whole already (nothing to
        receive), else None and an empty partial volume (an earlier cut's replaced)."""
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
            self._add_volume(partial, capacity=size, allocation=0).data = b""
            return None

    def receive_chunk(self, name: str, chunk: bytes, size: int) -> int:
        """Append ``chunk`` to the partial volume; the bytes received so far."""
        partial = partial_volume_name(name)
        with self._lock:
            self._check_usable()
            held = self._volumes.get(partial)
            if held is None or held.data is None:
                raise DriverError(f"partial volume {partial} on {self.uri} vanished")
            held.data += chunk
            held.allocation = len(held.data)
            if len(held.data) * 2 >= size:
                try:
                    self._maybe_fail("receive_volume.cut")
                except Exception as exc:  # the process "dies": nothing cleans up
                    raise _Cut(exc) from exc
            return held.allocation

    def receive_finish(self, name: str, size: int, sha256: str) -> VolumeInfo:
        """Check the partial volume and publish it under ``name`` (see the contract)."""
        partial = partial_volume_name(name)
        with self._lock:
            try:
                self._check_usable()
                held = self._volumes.get(partial)
                if held is None or held.data is None:
                    raise DriverError(f"partial volume {partial} on {self.uri} vanished")
                digest = hashlib.sha256(held.data).hexdigest()
                if len(held.data) != size or digest != sha256.lower():
                    raise ChecksumMismatch(
                        f"volume {name} arrived on {self.uri} as {len(held.data)} bytes with "
                        f"sha256 {digest}, expected {size} bytes with {sha256}: not kept")
                self._maybe_fail("receive_volume.publish")
            except BaseException:
                self._drop_volume(partial)
                raise
            volume = self._volumes.pop(partial)
            volume.name, volume.path = name, volume.path.removesuffix(".part")
            volume.sha256 = digest
            volume.allocation = volume.capacity = size
            self._volumes[name] = volume
            return volume.info()

    def receive_abort(self, name: str) -> None:
        """Drop the partial volume of a receive that failed."""
        with self._lock:
            self._drop_volume(partial_volume_name(name))


class _Cut(Exception):
    """``receive_volume.cut``'s armed error, carried past the cleanup of the partial."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error

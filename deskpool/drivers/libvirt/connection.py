"""The libvirt driver's connection to its host, made again after the host's daemon died.

A host's libvirtd may be restarted (an upgrade, a crash, an administrator's SIGKILL) while its
guests run on: QEMU does not die with it and the new daemon re-attaches them. The driver's
connection does die, and every later call on it would fail. So the driver checks the
connection before each use (``isAlive``, a local check, no round trip) and, when it is dead,
opens it again, with the storage pool handle and the overlay writer that belong to it.

The call that found the connection dead cannot know whether what it asked for happened: it
raises ``HostConnectionLost``. The caller treats that as "ask again", not as a failure of the
desktop (see ``Reconciler.run_step``).
"""

from __future__ import annotations

import threading
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from deskpool.domain.errors import DriverError, HostConnectionLost, HypervisorUnreachable
from deskpool.drivers.libvirt.overlays import OverlayWriter


def error_code(exc: libvirt.libvirtError) -> int:
    """libvirt's error code of ``exc`` (0 when it gives none), for the drivers' mixins."""
    return int(exc.get_error_code() or 0)


class ConnectionMixin:
    """A mixin of ``LibvirtDriver``: ``_conn``, ``_pool`` and ``_overlays`` are always of a
    live connection, and ``_failure`` tells a lost connection apart."""

    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock
        _closed: bool
        _connection: libvirt.virConnect
        _storage_pool: libvirt.virStoragePool
        _writer: OverlayWriter
        _pool_name: str

        def _ensure_pool(self, name: str) -> libvirt.virStoragePool: ...
        def _local_pool_dir(self) -> Path | None: ...

    def _open(self) -> tuple[libvirt.virConnect, str]:
        try:
            conn = libvirt.open(self.uri)
            return conn, str(conn.getType())
        except libvirt.libvirtError as exc:
            raise HypervisorUnreachable(
                f"cannot reach a hypervisor at {self.uri!r}: {exc.get_error_message()}"
            ) from exc

    def _alive(self) -> bool:
        try:
            return bool(self._connection.isAlive())
        except libvirt.libvirtError:
            return False

    def _connected(self) -> None:
        """Open the connection again if it died; objects of the old one are dropped (the
        storage pool's handle, the overlay writer and its prototypes)."""
        with self._lock:
            if self._alive():
                return
            if self._closed:  # forgotten by its owner while a step still used it
                raise HostConnectionLost(f"the connection to {self.uri} was closed")
            with suppress(libvirt.libvirtError):
                self._connection.close()
            try:
                self._connection, _hv_type = self._open()
            except HypervisorUnreachable as exc:  # not back yet
                raise HostConnectionLost(f"the connection to {self.uri} was lost and cannot "
                                         f"be made again yet: {exc}") from exc
            self._storage_pool = self._ensure_pool(self._pool_name)
            self._writer = OverlayWriter(self._connection, self._storage_pool,
                                         self._local_pool_dir())

    @property
    def _conn(self) -> libvirt.virConnect:
        self._connected()
        return self._connection

    @property
    def _pool(self) -> libvirt.virStoragePool:
        self._connected()
        return self._storage_pool

    @property
    def _overlays(self) -> OverlayWriter:
        self._connected()
        return self._writer

    def _failure(self, what: str, exc: libvirt.libvirtError) -> DriverError:
        """The error for a failed call: ``HostConnectionLost`` when the connection died."""
        message = exc.get_error_message()
        if not self._alive():
            return HostConnectionLost(f"{what} on {self.uri}: the connection to the host was "
                                      f"lost ({message})")
        return DriverError(f"{what} failed on {self.uri}: {message}")

"""The service context: settings, the database and open drivers, shared by every service."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from deskpool.config import Settings
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.registry import open_driver, release_driver
from deskpool.store.db import SessionFactory, UnitOfWork, open_database
from deskpool.store.models import Host


class ServiceContext:
    """Owns one database engine and one driver per host for the life of a process."""

    def __init__(
        self, settings: Settings | None = None, *,
        session_factory: SessionFactory | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if session_factory is None:
            session_factory = open_database(self.settings.resolved_database_url)
        self.session_factory = session_factory
        self._drivers: dict[uuid.UUID, HypervisorDriver] = {}
        self._lock = threading.Lock()
        self._installation_id: uuid.UUID | None = None

    @property
    def installation_id(self) -> uuid.UUID:
        """This deployment's id, written into every VM it makes (read once per process)."""
        if self._installation_id is None:
            with self.uow() as uow:
                found = uow.installation_id()
                uow.commit()
            self._installation_id = found
        return self._installation_id

    def uow(self, *, read_only: bool = False) -> UnitOfWork:
        return UnitOfWork(self.session_factory, read_only=read_only)

    def driver_for(self, host: Host) -> HypervisorDriver:
        with self._lock:
            driver = self._drivers.get(host.id)
            if driver is None:
                storage = Path(host.storage_dir) if host.storage_dir else None
                driver = open_driver(host.uri, storage_dir=storage)
                self._drivers[host.id] = driver
            return driver

    def driver_for_id(self, host_id: uuid.UUID) -> HypervisorDriver:
        """The host's driver, read from the database only the first time."""
        with self._lock:
            driver = self._drivers.get(host_id)
        if driver is not None:
            return driver
        with self.uow(read_only=True) as uow:
            return self.driver_for(uow.hosts.get(host_id))

    def forget_driver(self, host_id: uuid.UUID) -> None:
        """Drop a host's driver (its connection died); the next ``driver_for`` reopens it."""
        with self._lock:
            driver = self._drivers.pop(host_id, None)
        if driver is not None:
            release_driver(driver)

    def driver_for_name(self, host_name: str) -> HypervisorDriver:
        with self.uow() as uow:
            return self.driver_for(uow.hosts.get_by_name(host_name))

    def close(self) -> None:
        with self._lock:
            for driver in self._drivers.values():
                driver.close()
            self._drivers.clear()

"""Fake hosts served from another process, so several broker processes share one simulated
hypervisor (as they share a real libvirtd), and benchmarks can keep the hypervisor's memory
out of the broker's.

``serve_fake_hosts(port, authkey)`` runs the server (``python -m deskpool.drivers.fake.remote
--port N``); a broker reaches host NAME on it at ``fake+tcp://127.0.0.1:N/NAME`` (the query
shapes the host as for ``fake://``), with the shared secret in ``DESKPOOL_FAKE_AUTHKEY``. Built
on ``multiprocessing.managers``: every call is one round trip, and errors raised by the fake
arrive as the same deskpool errors.
"""

from __future__ import annotations

import argparse
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deskpool.domain.errors import HypervisorUnreachable
from deskpool.domain.models import (
    ConsoleAddress,
    ConsoleProtocol,
    HostCapacity,
    LoadSample,
    VmRecord,
    VmSpec,
    VolumeInfo,
)
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.fake import FakeDriver

AUTHKEY_ENV = "DESKPOOL_FAKE_AUTHKEY"
_served: dict[str, FakeDriver] = {}
_served_lock = threading.Lock()


def _host(uri: str) -> FakeDriver:
    with _served_lock:
        if uri not in _served:
            _served[uri] = FakeDriver(uri)
        return _served[uri]


class _Manager(BaseManager):
    pass


_Manager.register("host", callable=_host)


def serve_fake_hosts(port: int, authkey: bytes, host: str = "127.0.0.1") -> None:
    """Serve fake hosts until killed."""
    server = _Manager(address=(host, port), authkey=authkey).get_server()
    server.serve_forever()


class RemoteFakeDriver(HypervisorDriver):
    def __init__(self, uri: str) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "fake+tcp" or not parsed.port or not parsed.path.strip("/"):
            raise HypervisorUnreachable(f"{uri!r} is not fake+tcp://HOST:PORT/NAME")
        self.uri = uri
        authkey = os.environ.get(AUTHKEY_ENV, "").encode()
        manager = _Manager(address=(parsed.hostname or "127.0.0.1", parsed.port),
                           authkey=authkey)
        try:
            manager.connect()
        except OSError as exc:
            raise HypervisorUnreachable(f"fake hypervisor at {uri} did not answer: {exc}") \
                from exc
        name = parsed.path.strip("/")
        query = f"?{parsed.query}" if parsed.query else ""
        self._fake: Any = manager.host(f"fake://{name}{query}")  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        # Test controls of the fake (fail_next, set_reachable, guest_session...) pass through.
        return getattr(self._fake, name)

    def capacity(self) -> HostCapacity:
        result: HostCapacity = self._fake.capacity()
        return result

    def import_volume(self, name: str, source: Path, sha256: str | None = None) -> VolumeInfo:
        result: VolumeInfo = self._fake.import_volume(name, source, sha256)
        return result

    def volume_info(self, name: str) -> VolumeInfo:
        result: VolumeInfo = self._fake.volume_info(name)
        return result

    def list_volumes(self) -> list[str]:
        result: list[str] = self._fake.list_volumes()
        return result

    def delete_volume(self, name: str) -> None:
        self._fake.delete_volume(name)

    def create_vm(self, spec: VmSpec) -> VmRecord:
        result: VmRecord = self._fake.create_vm(spec)
        return result

    def start_vm(self, vm_id: uuid.UUID) -> None:
        self._fake.start_vm(vm_id)

    def stop_vm(self, vm_id: uuid.UUID, *, force: bool = False) -> None:
        self._fake.stop_vm(vm_id, force=force)

    def suspend_vm(self, vm_id: uuid.UUID) -> None:
        self._fake.suspend_vm(vm_id)

    def create_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        self._fake.create_snapshot(vm_id, name)

    def revert_to_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        self._fake.revert_to_snapshot(vm_id, name)

    def list_snapshots(self, vm_id: uuid.UUID) -> list[str]:
        result: list[str] = self._fake.list_snapshots(vm_id)
        return result

    def delete_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        self._fake.delete_snapshot(vm_id, name)

    def capture_memory_state(self, vm_id: uuid.UUID) -> tuple[str, str]:
        result: tuple[str, str] = self._fake.capture_memory_state(vm_id)
        return result

    def attach_disk(self, vm_id: uuid.UUID, path: Path, serial: str) -> None:
        self._fake.attach_disk(vm_id, path, serial)

    def detach_disk(self, vm_id: uuid.UUID, serial: str, *, timeout_s: float = 10.0) -> None:
        self._fake.detach_disk(vm_id, serial, timeout_s=timeout_s)

    def attached_disks(self, vm_id: uuid.UUID) -> dict[str, str]:
        return dict(self._fake.attached_disks(vm_id))

    def delete_vm(self, vm_id: uuid.UUID) -> None:
        self._fake.delete_vm(vm_id)

    def get_vm(self, vm_id: uuid.UUID) -> VmRecord:
        result: VmRecord = self._fake.get_vm(vm_id)
        return result

    def list_vms(self) -> list[VmRecord]:
        result: list[VmRecord] = self._fake.list_vms()
        return result

    def console_address(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC,
    ) -> ConsoleAddress:
        result: ConsoleAddress = self._fake.console_address(vm_id, protocol)
        return result

    def set_console_password(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol, password: str, valid_until: datetime,
    ) -> None:
        self._fake.set_console_password(vm_id, protocol, password, valid_until)

    def agent_command(self, vm_id: uuid.UUID, command: str,
                      arguments: dict[str, Any] | None = None, timeout_s: int = 5) -> Any:
        return self._fake.agent_command(vm_id, command, arguments, timeout_s)

    def probe_kvm_boots(self, kernel: Path) -> bool:
        return bool(self._fake.probe_kvm_boots(kernel))

    def load_sample(self) -> LoadSample:
        result: LoadSample = self._fake.load_sample()
        return result

    @property
    def copies_volumes(self) -> bool:
        return True

    def read_volume(self, name: str, *, chunk_bytes: int = 4 * 2**20) -> Iterator[bytes]:
        data: bytes = self._fake.volume_bytes(name)
        for start in range(0, len(data), max(chunk_bytes, 1)):
            yield data[start:start + chunk_bytes]

    def receive_volume(self, name: str, chunks: Iterable[bytes], *, size: int, sha256: str,
                       progress: Callable[[int], None] | None = None) -> VolumeInfo:
        # Step by step on the shared host: a broker killed between two steps leaves the
        # partial volume there, as on a real host.
        existing: VolumeInfo | None = self._fake.receive_begin(name, size, sha256)
        if existing is not None:
            return existing
        try:
            for chunk in chunks:
                done: int = self._fake.receive_chunk(name, chunk, size)
                if progress is not None:
                    progress(done)
        except BaseException:
            self._fake.receive_abort(name)
            raise
        result: VolumeInfo = self._fake.receive_finish(name, size, sha256)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve deskpool fake hosts over TCP.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve_fake_hosts(args.port, os.environ.get(AUTHKEY_ENV, "").encode())


if __name__ == "__main__":
    main()

"""The driver contract's volume copy between hosts (``HypervisorDriver.read_volume`` and
``receive_volume``), run against every driver: two fake hosts; libvirt ``test:///``, which
holds no bytes (refused, nothing made); and ``qemu:///system``, where the second "host" is a
second storage pool of the same daemon (volume streams need no VM, so none is booted)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain.errors import ChecksumMismatch, Conflict, DriverError, NotFound
from deskpool.drivers.base import HypervisorDriver, partial_volume_name
from deskpool.drivers.fake import FakeDriver
from tests.contract.conftest import POOL_PREFIX, ContractEnv, _remove_pools, make_base_qcow2


@pytest.fixture
def peer(env: ContractEnv, tmp_path: Path) -> Iterator[HypervisorDriver]:
    """A second host of the same kind: its own storage."""
    pool_name = f"{POOL_PREFIX}{uuid.uuid4().hex[:10]}"
    if env.kind == "fake":
        target: HypervisorDriver = FakeDriver(f"fake://peer-{uuid.uuid4().hex[:8]}")
    else:
        from deskpool.drivers.libvirt import LibvirtDriver

        uri = "test:///default" if env.kind == "libvirt-test" else "qemu:///system"
        target = LibvirtDriver(uri, storage_dir=tmp_path / "peer-pool", pool_name=pool_name)
    before = set(target.list_volumes())
    try:
        yield target
    finally:
        for name in set(target.list_volumes()) - before:
            target.delete_volume(name)
        target.close()
        if env.kind != "fake":
            _remove_pools(env.kind, pool_name)


def _layer(env: ContractEnv, name: str = "layer.qcow2") -> tuple[str, int, str]:
    """A qcow2 file with data in it, imported into the source host: (name, size, sha256)."""
    path = make_base_qcow2(env.tmp / f"src-{uuid.uuid4().hex[:6]}.qcow2", "8M")
    with path.open("ab") as fh:  # a few MiB beyond the header: several stream chunks
        fh.write(bytes(range(256)) * 12_000)
    data = path.read_bytes()
    env.driver.import_volume(name, path)
    return name, len(data), hashlib.sha256(data).hexdigest()


def _refused(env: ContractEnv) -> bool:
    return env.kind == "libvirt-test"


class TestVolumeCopyContract:
    def test_copy_arrives_whole_under_its_name_with_progress(
            self, env: ContractEnv, peer: HypervisorDriver) -> None:
        name, size, digest = _layer(env)
        if _refused(env):
            with pytest.raises(DriverError, match="not supported"):
                next(iter(env.driver.read_volume(name)))
            with pytest.raises(DriverError, match="not supported"):
                peer.receive_volume(name, [b"x"], size=1, sha256=digest)
            assert name not in peer.list_volumes()
            assert partial_volume_name(name) not in peer.list_volumes()
            return
        seen: list[int] = []
        info = peer.receive_volume(name, env.driver.read_volume(name, chunk_bytes=1 << 20),
                                   size=size, sha256=digest, progress=seen.append)
        assert info.name == name
        assert seen and seen[-1] == size and seen == sorted(seen) and len(seen) >= 2
        back = b"".join(peer.read_volume(name))
        assert len(back) == size and hashlib.sha256(back).hexdigest() == digest
        assert partial_volume_name(name) not in peer.list_volumes()

    def test_reading_a_missing_volume_is_not_found(self, env: ContractEnv) -> None:
        if _refused(env):
            pytest.skip("test:/// refuses every read (see the test above)")
        with pytest.raises(NotFound):
            next(iter(env.driver.read_volume("ghost.qcow2")))

    def test_wrong_checksum_or_size_keeps_nothing(
            self, env: ContractEnv, peer: HypervisorDriver) -> None:
        if _refused(env):
            pytest.skip("test:/// refuses every copy")
        name, size, digest = _layer(env)
        with pytest.raises(ChecksumMismatch):
            peer.receive_volume(name, env.driver.read_volume(name), size=size,
                                sha256="0" * 64)
        assert name not in peer.list_volumes()
        assert partial_volume_name(name) not in peer.list_volumes()
        short = b"".join(env.driver.read_volume(name))[: size // 2]
        with pytest.raises(ChecksumMismatch):
            peer.receive_volume(name, [short], size=size, sha256=digest)
        assert not {name, partial_volume_name(name)} & set(peer.list_volumes())

    def test_a_failing_sender_leaves_nothing_and_a_rerun_completes(
            self, env: ContractEnv, peer: HypervisorDriver) -> None:
        if _refused(env):
            pytest.skip("test:/// refuses every copy")
        name, size, digest = _layer(env)

        def dies_halfway() -> Iterator[bytes]:
            sent = 0
            for chunk in env.driver.read_volume(name, chunk_bytes=1 << 20):
                if sent * 2 >= size:
                    raise OSError("the sending host went away")
                sent += len(chunk)
                yield chunk

        with pytest.raises(OSError, match="went away"):
            peer.receive_volume(name, dies_halfway(), size=size, sha256=digest)
        assert not {name, partial_volume_name(name)} & set(peer.list_volumes())
        peer.receive_volume(name, env.driver.read_volume(name), size=size, sha256=digest)
        assert name in peer.list_volumes()

    def test_a_partial_left_by_a_killed_copy_is_replaced(
            self, env: ContractEnv, peer: HypervisorDriver) -> None:
        """A process killed mid-copy leaves ``NAME.part``: never read as the volume, and the
        next receive writes it again from the start."""
        if _refused(env):
            pytest.skip("test:/// refuses every copy")
        name, size, digest = _layer(env)
        partial = partial_volume_name(name)
        junk = env.tmp / "junk.bin"
        junk.write_bytes(b"\xff" * 4096)
        peer.import_volume(partial, junk)  # what a cut leaves, as far as the host can tell
        with pytest.raises(NotFound):
            peer.volume_info(name)
        peer.receive_volume(name, env.driver.read_volume(name), size=size, sha256=digest)
        assert partial not in peer.list_volumes()
        assert hashlib.sha256(b"".join(peer.read_volume(name))).hexdigest() == digest

    def test_an_existing_copy_is_kept_and_other_bytes_are_a_conflict(
            self, env: ContractEnv, peer: HypervisorDriver) -> None:
        if _refused(env):
            pytest.skip("test:/// refuses every copy")
        name, size, digest = _layer(env)
        peer.receive_volume(name, env.driver.read_volume(name), size=size, sha256=digest)

        def never() -> Iterator[bytes]:
            raise AssertionError("an existing copy must not be sent again")
            yield b""

        assert peer.receive_volume(name, never(), size=size, sha256=digest).name == name
        with pytest.raises(Conflict):
            peer.receive_volume(name, never(), size=size, sha256="1" * 64)
        assert hashlib.sha256(b"".join(peer.read_volume(name))).hexdigest() == digest


def test_fake_cut_leaves_a_partial_that_is_never_the_volume() -> None:
    """The fake's ``receive_volume.cut``: half written, then the "process dies" (the armed
    error) and the partial stays, as after a SIGKILL; a re-run replaces it."""
    target = FakeDriver("fake://cut-b")
    data = bytes(range(256)) * 4096
    digest = hashlib.sha256(data).hexdigest()
    target.fail_next("receive_volume.cut", RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        target.receive_volume("l.qcow2", [data[:300_000], data[300_000:600_000], data[600_000:]],
                              size=len(data), sha256=digest)
    assert target.list_volumes() == ["l.qcow2.part"]
    target.receive_volume("l.qcow2", [data], size=len(data), sha256=digest)
    assert target.list_volumes() == ["l.qcow2"]
    assert b"".join(target.read_volume("l.qcow2", chunk_bytes=1000)) == data


def test_libvirt_without_a_rename_publishes_the_bytes_or_nothing(
        env: ContractEnv, peer: HypervisorDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose pool directory this process cannot write (one on another machine) has
    no rename: the checked partial is copied on the host (``createXMLFrom``). libvirt copies
    its bytes while it takes it for raw, but converts it once a refresh probed its content
    as qcow2 (when is up to the daemon). Either way, what is published is read back: the
    layer's own bytes, or nothing under either name and a ``DriverError`` saying so."""
    if env.kind != "libvirt-qemu":
        pytest.skip("the rename-or-copy choice is libvirt qemu's")
    # As for a host on another machine: this process neither writes nor sees its files.
    monkeypatch.setattr(peer, "_local_pool_dir", lambda: None)
    monkeypatch.setattr(peer, "_local_file_exists", lambda _name: False)
    outcomes = set()
    for attempt in range(3):
        name, size, digest = _layer(env, f"layer-{attempt}.qcow2")
        try:
            peer.receive_volume(name, env.driver.read_volume(name), size=size, sha256=digest)
        except DriverError as exc:
            assert "could not be published" in str(exc)
            assert not {name, partial_volume_name(name)} & set(peer.list_volumes())
            outcomes.add("refused")
            continue
        assert partial_volume_name(name) not in peer.list_volumes()
        assert hashlib.sha256(b"".join(peer.read_volume(name))).hexdigest() == digest
        outcomes.add("published")
    assert outcomes  # every attempt ended in one of the two

"""The laptop client (``deskpool offline checkout|start|stop|sync|checkin|...``) against a real
broker over HTTP on the fake driver: check-out and download, a start with the broker stopped
(on a stub libvirt connection that records what it is given), the refusals of a start (wrong
password, expired lease, revoked check-out), resumed downloads and check-ins after a cut, a
check-in on another base refused, too little space refused before anything is downloaded,
and a busy host's 503 waited out."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from deskpool.api.app import create_app
from deskpool.cli import client as client_module
from deskpool.cli import offline_user
from deskpool.cli.laptop import transfers
from deskpool.cli.laptop.broker import Broker, BrokerUnreachable
from deskpool.cli.laptop.store import DesktopRecord, LaptopDir
from deskpool.cli.main import app
from deskpool.domain.offline_keys import KeyBinding, UserWrappedKey, unwrap_for_user
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.images.layer_apply import roll_back
from deskpool.images.layer_delta import (
    BlockManifest,
    LayerDelta,
    file_sha256,
    layer_digest,
    plan_delta,
    read_chunk,
)
from deskpool.images.offline_layers import layer_spec
from deskpool.services import offline as offline_service
from deskpool.services import offline_transfers
from deskpool.services.host_slots import SlotKind, host_slot
from deskpool.services.offline_secrets import secrets_dir
from deskpool.store.models import HostSlot
from tests.broker_world import PASSWORD, BrokerWorld, ServerThread, make_world

API = "/api/v1"
LAPTOP = "alice-laptop"
OFFLINE_PASSWORD = "offline-pass-9"
POLICY = {
    "may_go_offline": True,
    "max_days_offline": 10,
    "sync_every_days": 3,
    "may_roll_back": True,
}


class StubDomain:
    def __init__(self, conn: StubLibvirt, xml: str) -> None:
        self.conn, self.xml, self.active = conn, xml, False

    def XMLDesc(self, flags: int) -> str:
        return self.xml

    def create(self) -> None:
        # What QEMU would be handed at start: the secret, with its value, defined now.
        self.conn.keys_at_start.append(dict(self.conn.secret_values))
        self.active = True

    def isActive(self) -> bool:
        return self.active

    def shutdown(self) -> None:
        self.active = False

    def destroy(self) -> None:
        self.active = False

    def undefine(self) -> None:
        self.conn.domains = {k: v for k, v in self.conn.domains.items() if v is not self}


class StubSecret:
    def __init__(self, conn: StubLibvirt, xml: str) -> None:
        self.conn = conn
        self.uuid = xml.split("<uuid>")[1].split("</uuid>")[0]
        assert "ephemeral='yes'" in xml and "private='yes'" in xml

    def setValue(self, value: bytes) -> None:
        self.conn.secret_values[self.uuid] = value

    def undefine(self) -> None:
        self.conn.secret_values.pop(self.uuid, None)


class StubLibvirt:
    """The laptop's libvirt as far as the client uses it (``test:///default`` has no
    secrets driver)."""

    def __init__(self) -> None:
        self.domains: dict[str, StubDomain] = {}
        self.secret_values: dict[str, bytes] = {}
        self.keys_at_start: list[dict[str, bytes]] = []

    def secretDefineXML(self, xml: str) -> StubSecret:
        return StubSecret(self, xml)

    def defineXML(self, xml: str) -> StubDomain:
        name = xml.split("<name>")[1].split("</name>")[0]
        self.domains[name] = StubDomain(self, xml)
        return self.domains[name]

    def lookupByName(self, name: str) -> StubDomain:
        if name not in self.domains:
            raise LookupError(f"no domain {name}")
        return self.domains[name]

    def close(self) -> None:
        pass


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerWorld]:
    """alice's desktop home-01, ready, in pool ``home`` that may go offline; alice signed in
    through the CLI's config (the server is started by each test)."""
    monkeypatch.setattr(client_module, "CONFIG", tmp_path / "config")
    offline_transfers._open.clear()
    w = make_world(tmp_path)
    w.user("root", admin=True)
    made = w.client("root").post(
        f"{API}/admin/pools",
        json={
            "name": "home",
            "template": "golden",
            "kind": "stateful",
            "assignment": "dedicated",
            "on_logout": "recycle-as-is",
            "max_size": 2,
            "spare": 1,
            "naming_pattern": "home-{n:02}",
            "offline": POLICY,
        },
    )
    assert made.status_code == 200, made.text
    w.user("alice", entitled_to=("home",))
    w.fill()
    got = w.client("alice").post(f"{API}/pools/home/connect").json()
    w.client("alice").post(f"{API}/desktops/{got['desktop_id']}/logoff")
    w.fill()
    libvirt = StubLibvirt()
    monkeypatch.setattr(offline_user, "libvirt_opener", lambda uri: libvirt)
    w.libvirt = libvirt  # type: ignore[attr-defined]
    try:
        yield w
    finally:
        offline_transfers._open.clear()
        w.ctx.close()
        forget_fake_hosts()


def offline(
    laptop_dir: Path, *args: str, password: str | None = OFFLINE_PASSWORD, exit_code: int = 0
) -> str:
    """Run ``deskpool offline ARGS --dir LAPTOP_DIR``; its output, or the error's sentence."""
    argv = ["offline", *args, "--dir", str(laptop_dir)]
    if password is not None:
        argv.append("--password-stdin")
    result = CliRunner().invoke(app, argv, input=f"{password}\n" if password else None)
    assert result.exit_code == exit_code, (argv, result.output, result.exception)
    if exit_code:
        return str(result.exception)
    return result.output


def sign_in(server: ServerThread) -> None:
    said = CliRunner().invoke(app, ["client", "login", server.url, "alice", "--password", PASSWORD])
    assert said.exit_code == 0, said.output


def record(laptop_dir: Path) -> DesktopRecord:
    return LaptopDir(laptop_dir).load("home-01")


def guest_writes(laptop_dir: Path, writes: list[tuple[int, int]]) -> None:
    """The guest's writes to the laptop's layer (offset, pattern), through qemu-io."""
    rec = record(laptop_dir)
    key = unwrap_for_user(
        UserWrappedKey.from_json(rec.wrapped_key),
        OFFLINE_PASSWORD,
        KeyBinding(rec.user, uuid.UUID(rec.desktop_id), rec.laptop),
    )
    layer = LaptopDir(laptop_dir).layer(rec)
    for offset, pattern in writes:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, key.hex().encode())
        os.close(write_fd)
        try:
            subprocess.run(
                [
                    "qemu-io",
                    "--object",
                    f"secret,id=layerkey0,file=/dev/fd/{read_fd}",
                    "-c",
                    f"write -P {pattern} {offset} 65536",
                    layer_spec(layer, with_backing=True),
                ],
                check=True,
                pass_fds=(read_fd,),
                capture_output=True,
            )
        finally:
            os.close(read_fd)


def server_layer(world: BrokerWorld) -> Path:
    rec_id = next((secrets_dir(world.ctx.settings) / "layers").iterdir())
    return rec_id / "layer.qcow2"


def desktop_state(world: BrokerWorld) -> str:
    answer = world.client("alice").get(f"{API}/offline/desktops").json()
    return str(answer[0]["state"])


def checked_out(world: BrokerWorld, laptop_dir: Path) -> None:
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        said = offline(laptop_dir, "checkout", "home-01", "--laptop", LAPTOP, "--quiet")
        assert "is ready on this laptop" in said


def test_checkout_then_start_with_the_broker_stopped_then_sync_and_checkin(
    world: BrokerWorld, tmp_path: Path
) -> None:
    laptop_dir = tmp_path / "laptop"
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        listed = offline(laptop_dir, "desktops", password=None)
        assert "home-01" in listed and "home" in listed
        said = offline(laptop_dir, "checkout", "home-01", "--laptop", LAPTOP, "--quiet")
        assert "checked home-01 out to alice-laptop until" in said
        again = offline(laptop_dir, "checkout", "home-01", "--quiet")
        assert "already on this laptop" in again
    rec = record(laptop_dir)
    here = LaptopDir(laptop_dir)
    assert file_sha256(here.base(rec.base_sha256)) == rec.base_sha256
    assert layer_digest(here.layer(rec)) == rec.layer_sha256
    assert file_sha256(here.layer(rec)) == file_sha256(server_layer(world))
    assert here.layer(rec).stat().st_mode & 0o077 == 0
    # Neither the password nor the data key rests anywhere on the laptop.
    for path in laptop_dir.rglob("*"):
        if path.is_file():
            assert OFFLINE_PASSWORD.encode() not in path.read_bytes(), path

    # The broker is stopped: the start needs nothing but the laptop's files.
    started = offline(laptop_dir, "start", "home-01", "--libvirt-uri", "test:///default")
    assert "home-01 is running as deskpool-offline-home-01" in started
    assert "sync within" in started
    stub: StubLibvirt = world.libvirt  # type: ignore[attr-defined]
    (defined,) = stub.domains.values()
    assert "format='luks'" in defined.xml or 'format="luks"' in defined.xml
    assert str(here.layer(rec)) in defined.xml
    (keys,) = stub.keys_at_start
    assert len(keys) == 1 and len(next(iter(keys.values()))) == 64  # the key's hex, at start
    assert stub.secret_values == {}  # and forgotten once QEMU has it
    refused = offline(laptop_dir, "sync", "home-01", password=None, exit_code=1)
    assert "home-01 is running; 'deskpool offline stop home-01' first" in refused
    assert "is shut down" in offline(laptop_dir, "stop", "home-01", password=None)
    assert stub.domains == {}

    guest_writes(laptop_dir, [(0, 0x11), (8 << 20, 0x22)])
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        synced = offline(laptop_dir, "sync", "home-01", "--quiet", password=None)
        assert "synced home-01; its lease runs until" in synced
        assert file_sha256(server_layer(world)) == file_sha256(here.layer(rec))
        assert desktop_state(world) == "checked_out"
        guest_writes(laptop_dir, [(16 << 20, 0x33)])
        final = file_sha256(here.layer(rec))
        done = offline(laptop_dir, "checkin", "home-01", "--quiet", password=None)
        assert "checked home-01 in; it is back online" in done
    assert file_sha256(server_layer(world)) == final
    assert desktop_state(world) == "ready"
    assert not here.layer(rec).exists() and here.base(rec.base_sha256).is_file()
    assert "home-01" not in offline(laptop_dir, "status", password=None)


def test_start_refuses_a_wrong_password_an_expired_lease_and_a_revoked_checkout(
    world: BrokerWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop_dir = tmp_path / "laptop"
    checked_out(world, laptop_dir)
    stub: StubLibvirt = world.libvirt  # type: ignore[attr-defined]
    wrong = offline(laptop_dir, "start", "home-01", password="not-it", exit_code=1)
    assert "wrong password" in wrong.lower()
    later = datetime.now(UTC) + timedelta(days=4)
    monkeypatch.setattr(offline_user, "now", lambda: later)
    expired = offline(laptop_dir, "start", "home-01", exit_code=1)
    assert "offline lease expired on" in expired and "connect to the network and sync" in expired
    monkeypatch.undo()
    monkeypatch.setattr(offline_user, "libvirt_opener", lambda uri: stub)
    monkeypatch.setattr(client_module, "CONFIG", tmp_path / "config")
    assert stub.domains == {}
    revoked = world.client("root").post(f"{API}/admin/offline/checkouts/home-01/revoke")
    assert revoked.status_code == 200, revoked.text
    # Still allowed until the laptop hears of it...
    assert "is running" in offline(laptop_dir, "start", "home-01")
    offline(laptop_dir, "stop", "home-01", "--force", password=None)
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        offline(laptop_dir, "desktops", password=None)  # a contact: the revoked list cached
    refused = offline(laptop_dir, "start", "home-01", exit_code=1)
    assert "revoked by an administrator" in refused and "check it in" in refused
    assert stub.domains == {}


def test_a_cut_download_and_a_cut_checkin_resume_where_they_stopped(
    world: BrokerWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop_dir = tmp_path / "laptop"
    monkeypatch.setattr(transfers, "DOWNLOAD_CHUNK", 64 * 1024)
    monkeypatch.setattr(transfers, "BATCH_BYTES", 1)  # a request per chunk: cut between two
    real_record = transfers.DownloadJournal.record
    recorded: list[int] = []

    def cut_after_three(journal: transfers.DownloadJournal, index: int) -> None:
        real_record(journal, index)
        recorded.append(index)
        if len(recorded) == 3:
            raise BrokerUnreachable("connection dropped (test)")

    ranges: list[str] = []
    real_stream = Broker.stream

    def spy_stream(self: Broker, path: str, **kw: Any) -> Any:
        ranges.append(kw["headers"]["range"])
        return real_stream(self, path, **kw)

    monkeypatch.setattr(transfers.DownloadJournal, "record", cut_after_three)
    monkeypatch.setattr(Broker, "stream", spy_stream)
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        cut = offline(laptop_dir, "checkout", "home-01", "--laptop", LAPTOP, "--quiet", exit_code=1)
        assert "connection dropped" in cut
        assert ranges == ["bytes=0-"] and not record(laptop_dir).downloaded
        monkeypatch.setattr(transfers.DownloadJournal, "record", real_record)
        resumed = offline(laptop_dir, "checkout", "home-01", "--quiet", password=None)
        assert "is ready on this laptop" in resumed
        assert ranges[1] == f"bytes={3 * 64 * 1024}-"  # from the first chunk not on disk
        rec = record(laptop_dir)
        here = LaptopDir(laptop_dir)
        assert layer_digest(here.layer(rec)) == rec.layer_sha256

        guest_writes(laptop_dir, [(i << 20, 0x40 + i) for i in range(0, 48, 4)])
        before = file_sha256(server_layer(world))
        puts: list[str] = []
        real_call = Broker.call

        def cut_on_fourth_chunk(self: Broker, method: str, path: str, **kw: Any) -> Any:
            if method == "PUT":
                puts.append(kw["params"]["indexes"])
                if len(puts) == 4:
                    raise BrokerUnreachable("connection dropped mid-check-in (test)")
            return real_call(self, method, path, **kw)

        monkeypatch.setattr(Broker, "call", cut_on_fourth_chunk)
        cut = offline(laptop_dir, "checkin", "home-01", "--quiet", password=None, exit_code=1)
        assert "connection dropped mid-check-in" in cut
        # Part of it is in the server's layer, under its undo journal: nothing reads it
        # meanwhile, and undoing it (tried on a copy) gives the old copy back exactly.
        fetch = world.client("alice").get(f"{API}/offline/desktops/home-01/layer",
                                          params={"laptop": LAPTOP})
        assert fetch.status_code == 409 and "in flight" in fetch.json()["detail"]
        trial = tmp_path / "undo-trial"
        shutil.copytree(server_layer(world).parent, trial)
        roll_back(trial / "layer.qcow2", trial / "staging")
        assert file_sha256(trial / "layer.qcow2") == before
        assert desktop_state(world) == "checked_out"
        assert "yes" in offline(laptop_dir, "status", password=None).split("home-01")[1]
        plan = LayerDelta.decode(here.upload_plan(rec).read_bytes())  # kept for the re-run
        assert len(plan.chunks) > 4
        sent_before = len(puts)
        final = file_sha256(here.layer(rec))
        done = offline(laptop_dir, "checkin", "home-01", "--quiet", password=None)
        assert "checked home-01 in" in done
        # Only the rest travels: the 3 chunks the server applied are not sent again.
        assert len(puts) - sent_before == len(plan.chunks) - 3
        assert set(puts[sent_before:]).isdisjoint(puts[:3])
    assert file_sha256(server_layer(world)) == final
    assert desktop_state(world) == "ready"


def test_a_checkin_on_another_base_is_refused_and_changes_nothing(
    world: BrokerWorld, tmp_path: Path
) -> None:
    laptop_dir = tmp_path / "laptop"
    checked_out(world, laptop_dir)
    guest_writes(laptop_dir, [(0, 0x55)])
    here = LaptopDir(laptop_dir)
    rec = record(laptop_dir)
    rec.base_sha256 = "ab" * 32  # as if this laptop held another template's base
    here.save(rec)
    before = file_sha256(server_layer(world))
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        refused = offline(laptop_dir, "checkin", "home-01", "--quiet", password=None, exit_code=1)
    assert "the check-in was made on base image sha256 abababab" in refused
    assert "nothing was applied" in refused and "(HTTP 409)" in refused
    assert file_sha256(server_layer(world)) == before
    assert desktop_state(world) == "checked_out"  # the lock is kept
    assert here.layer(rec).is_file()  # and nothing is lost on the laptop


def test_too_little_space_is_refused_before_anything_is_downloaded(
    world: BrokerWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop_dir = tmp_path / "laptop"
    full = os.statvfs(tmp_path)
    monkeypatch.setattr(
        offline_user.shutil,
        "disk_usage",
        lambda path: type("Usage", (), {"free": 10 * 2**20, "total": full.f_blocks})(),
    )
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        refused = offline(laptop_dir, "checkout", "home-01", "--laptop", LAPTOP, exit_code=1)
    assert "home-01 needs" in refused and "MiB free in" in refused
    assert "there is 10 MiB" in refused and "nothing was downloaded" in refused
    assert desktop_state(world) == "ready"  # not checked out
    assert not (laptop_dir / "bases").exists()


def test_a_busy_host_answers_503_and_the_client_waits_its_turn(
    world: BrokerWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop_dir = tmp_path / "laptop"
    monkeypatch.setattr(offline_service, "SLOT_WAIT_S", 0.2)
    monkeypatch.setattr(offline_service, "SLOT_RETRY_S", 1.0)
    with world.ctx.uow() as uow:
        (host,) = uow.hosts.list()
        host.transfer_slots = 1
        host_id = host.id
        uow.commit()
    release = threading.Event()
    held = threading.Event()

    def hold_the_only_slot() -> None:
        with host_slot(world.ctx, host_id, SlotKind.TRANSFER, 1, holder="someone-else"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    assert held.wait(10)
    try:
        with ServerThread(create_app(world.ctx, directories=[])) as server:
            sign_in(server)
            grant = (
                world.client("alice")
                .post(f"{API}/offline/desktops/home-01/checkout", json={"laptop": "other-laptop"})
                .json()
            )
            busy = world.client("alice").get(
                f"{API}/offline/desktops/home-01/layer", params={"laptop": "other-laptop"}
            )
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "host h1 is busy with 1 other transfer(s)" in busy.json()["detail"]
            assert grant["base_size"] > 0 and grant["layer_size"] > 0
            rolled = world.client("alice").post(f"{API}/offline/desktops/home-01/rollback")
            assert rolled.status_code == 200, rolled.text
            threading.Timer(1.5, release.set).start()
            started = time.monotonic()
            said = offline(laptop_dir, "checkout", "home-01", "--laptop", LAPTOP)
            assert "is busy with 1 other transfer(s)" in said
            assert "waiting 1 s and trying again" in said
            assert "is ready on this laptop" in said
            assert time.monotonic() - started >= 1.0
    finally:
        release.set()
        holder.join()


def test_a_lost_commit_answer_is_told_apart_and_a_bad_batch_is_refused(
    world: BrokerWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop_dir = tmp_path / "laptop"
    checked_out(world, laptop_dir)
    guest_writes(laptop_dir, [(0, 0x61), (4 << 20, 0x62)])
    here = LaptopDir(laptop_dir)
    rec = record(laptop_dir)
    final = file_sha256(here.layer(rec))
    real_call = Broker.call

    def lose_the_commit_answer(self: Broker, method: str, path: str, **kw: Any) -> Any:
        answer = real_call(self, method, path, **kw)
        if path.endswith("/commit"):
            raise BrokerUnreachable("answer lost (test)")
        return answer

    with ServerThread(create_app(world.ctx, directories=[])) as server:
        sign_in(server)
        alice = world.client("alice")
        begun = alice.post(
            f"{API}/offline/desktops/home-01/transfer",
            params={"laptop": LAPTOP, "kind": "sync"},
            content=here.manifest(rec).read_bytes(),
        )
        assert begun.status_code == 400 and "this is not a layer delta" in begun.text
        monkeypatch.setattr(Broker, "call", lose_the_commit_answer)
        cut = offline(laptop_dir, "checkin", "home-01", "--quiet", password=None, exit_code=1)
        assert "answer lost" in cut
        monkeypatch.setattr(Broker, "call", real_call)
        again = offline(laptop_dir, "checkin", "home-01", "--quiet", password=None, exit_code=1)
    assert "the broker has no check-out of home-01 any more" in again
    assert "this laptop's copy is kept" in again and here.layer(rec).is_file()
    assert file_sha256(server_layer(world)) == final
    assert desktop_state(world) == "ready"


def test_batched_chunks_must_match_the_plan(world: BrokerWorld, tmp_path: Path) -> None:
    laptop_dir = tmp_path / "laptop"
    checked_out(world, laptop_dir)
    guest_writes(laptop_dir, [(0, 0x71)])
    here = LaptopDir(laptop_dir)
    rec = record(laptop_dir)
    since = BlockManifest.decode(here.manifest(rec).read_bytes())
    delta = plan_delta(here.layer(rec), since, rec.base_sha256)
    alice = world.client("alice")
    base = f"{API}/offline/desktops/home-01/transfer"
    begun = alice.post(
        base,
        params={"laptop": LAPTOP},
        content=delta.encode(),
        headers={"content-type": "application/octet-stream"},
    )
    assert begun.status_code == 200 and begun.json()["missing"] == list(range(len(delta.chunks)))
    body = b"".join(read_chunk(here.layer(rec), c) for c in delta.chunks)
    everything = ",".join(str(c.index) for c in delta.chunks)
    short = alice.put(
        f"{base}/chunks",
        params={"laptop": LAPTOP, "indexes": everything},
        content=body[:-1],
        headers={"content-type": "application/octet-stream"},
    )
    assert short.status_code == 400 and "the plan says" in short.json()["detail"]
    outside = alice.put(
        f"{base}/chunks",
        params={"laptop": LAPTOP, "indexes": "9999"},
        content=b"",
        headers={"content-type": "application/octet-stream"},
    )
    assert outside.status_code == 400 and "chunk indexes must be 0 to" in outside.text
    assert alice.get(f"{API}/offline/desktops").json()[0]["checkout"]["bytes_pending"] > 0
    whole = alice.put(
        f"{base}/chunks",
        params={"laptop": LAPTOP, "indexes": everything},
        content=body,
        headers={"content-type": "application/octet-stream"},
    )
    assert whole.status_code == 200 and whole.json()["missing"] == []


def test_downloads_answer_ranges_with_their_checksum_and_refuse_bad_ones(
    world: BrokerWorld,
) -> None:
    alice = world.client("alice")
    grant = alice.post(f"{API}/offline/desktops/home-01/checkout", json={"laptop": LAPTOP})
    assert grant.status_code == 200, grant.text
    layer = server_layer(world).read_bytes()
    url = f"{API}/offline/desktops/home-01/layer"
    whole = alice.get(url, params={"laptop": LAPTOP})
    assert whole.status_code == 200 and whole.content == layer
    assert whole.headers["x-deskpool-sha256"] == grant.json()["layer_sha256"]
    part = alice.get(url, params={"laptop": LAPTOP}, headers={"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == layer[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(layer)}"
    tail = alice.get(url, params={"laptop": LAPTOP}, headers={"range": f"bytes={len(layer) - 5}-"})
    assert tail.status_code == 206 and tail.content == layer[-5:]
    for bad in ("bytes=-5", "lines=0-1", f"bytes={len(layer)}-"):
        refused = alice.get(url, params={"laptop": LAPTOP}, headers={"range": bad})
        assert refused.status_code == 400 and "Range" in refused.json()["detail"], bad
    base = alice.get(f"{API}/offline/desktops/home-01/base", params={"laptop": LAPTOP})
    assert base.status_code == 200 and len(base.content) == grant.json()["base_size"]
    assert hashlib.sha256(base.content).hexdigest() == grant.json()["base_sha256"]
    other = alice.get(url, params={"laptop": "not-this-one"})
    assert other.status_code == 403 and "not checked out to you on laptop" in other.text
    # Every stream above, whole, partial or refused, gave its transfer slot back.
    with world.ctx.uow(read_only=True) as uow:
        holders = (
            uow.session.execute(select(HostSlot.holder).where(HostSlot.kind == "transfer"))
            .scalars()
            .all()
        )
        assert holders and all(h is None for h in holders), holders

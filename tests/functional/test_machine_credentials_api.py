"""Machine credentials and SSH host keys through the admin API and the CLI: given as base64,
shown back only by size and sha256, refused with a reason where they may not go, audited;
every desktop's host key as a known_hosts file."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from deskpool.api.app import create_app
from deskpool.broker.accounts import AccountService
from deskpool.cli.main import app as cli
from deskpool.config import Settings
from deskpool.services.audit import audit_log
from deskpool.services.context import ServiceContext
from deskpool.services.machine_secrets import MachineSecrets, ssh_host_key


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    AccountService(context).create_user("root-admin", "admin-password-1", is_admin=True)
    yield context
    context.close()


def admin_client(ctx: ServiceContext) -> TestClient:
    client = TestClient(create_app(ctx, directories=[]), headers={"origin": "http://testserver"})
    signed = client.post("/api/v1/auth/login", json={"username": "root-admin",
                                                      "password": "admin-password-1"})
    assert signed.status_code == 200, signed.text
    return client


def test_credentials_through_the_api(ctx: ServiceContext) -> None:
    api = admin_client(ctx)
    keytab = b"\x05\x02binary keytab\x00"
    body = {"desktop": "lab-01", "path": "/etc/krb5.keytab",
            "content_base64": base64.b64encode(keytab).decode()}
    put = api.put("/api/v1/admin/machine-credentials", json=body)
    assert put.status_code == 200, put.text
    assert put.json() == {"desktop": "lab-01", "path": "/etc/krb5.keytab", "size": 16,
                          "sha256": hashlib.sha256(keytab).hexdigest()}
    listed = api.get("/api/v1/admin/machine-credentials", params={"desktop": "lab-01"})
    assert listed.json() == [put.json()] and "content" not in listed.text
    files = {f.path: f.content for f in MachineSecrets(ctx).files_for("lab-01", "lab-01")}
    assert files["/etc/krb5.keytab"] == keytab
    assert any(e.action == "desktop.credential.set" for e in audit_log(ctx))

    for bad, why in (({**body, "path": "/etc/shadow"}, "cannot go to '/etc/shadow'"),
                     ({**body, "content_base64": "not base64!"}, "not base64"),
                     ({**body, "desktop": "a b"}, "desktop")):
        refused = api.put("/api/v1/admin/machine-credentials", json=bad)
        assert refused.status_code in (400, 422), refused.text
        assert why in refused.text, refused.text
    assert len(MachineSecrets(ctx).credentials()) == 1  # nothing else kept

    gone = api.delete("/api/v1/admin/machine-credentials",
                      params={"desktop": "lab-01", "path": "/etc/krb5.keytab"})
    assert gone.status_code == 204
    again = api.delete("/api/v1/admin/machine-credentials",
                       params={"desktop": "lab-01", "path": "/etc/krb5.keytab"})
    assert again.status_code == 404 and "no machine credential" in again.text


def test_only_admins_reach_them(ctx: ServiceContext) -> None:
    AccountService(ctx).create_user("alice", "alice-password-1")
    client = TestClient(create_app(ctx, directories=[]), headers={"origin": "http://testserver"})
    client.post("/api/v1/auth/login", json={"username": "alice",
                                            "password": "alice-password-1"})
    assert client.get("/api/v1/admin/machine-credentials").status_code == 403
    assert client.get("/api/v1/admin/known-hosts").status_code == 403


def test_the_cli_sets_lists_and_removes_and_prints_known_hosts(
        ctx: ServiceContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))
    source = tmp_path / "keytab"
    source.write_bytes(b"keytab")
    runner = CliRunner()
    done = runner.invoke(cli, ["desktop", "credential", "set", "lab-02", "/etc/krb5.keytab",
                               "--from", str(source)])
    assert done.exit_code == 0, done.output
    assert "lab-02" in done.output and "6 bytes" in done.output
    listed = runner.invoke(cli, ["desktop", "credential", "list"])
    assert "lab-02" in listed.output and "/etc/krb5.keytab" in listed.output
    missing = runner.invoke(cli, ["desktop", "credential", "set", "lab-02",
                                  "/etc/krb5.keytab", "--from", str(tmp_path / "none")])
    assert missing.exit_code != 0
    removed = runner.invoke(cli, ["desktop", "credential", "remove", "lab-02",
                                  "/etc/krb5.keytab"])
    assert removed.exit_code == 0, removed.output
    assert MachineSecrets(ctx).credentials() == []
    # The host key the desktop name gets, from this installation's key.
    public = ssh_host_key(MachineSecrets(ctx).key, "lab-02", "lab-02")[1]
    assert public.startswith(b"ssh-ed25519 ")


def test_bad_names_and_paths_are_refused_before_any_lookup(ctx: ServiceContext) -> None:
    """A NUL or a path outside the allowed places is a 400 naming it (PostgreSQL refuses
    NUL in text: it must never get there)."""
    api = admin_client(ctx)
    for params in ({"desktop": "lab\x0001", "path": "/etc/krb5.keytab"},
                   {"desktop": "lab-01", "path": "/etc/krb5\x00.keytab"},
                   {"desktop": "lab-01", "path": "/etc/passwd"}):
        gone = api.delete("/api/v1/admin/machine-credentials", params=params)
        assert gone.status_code == 400, (params, gone.text)
    listed = api.get("/api/v1/admin/machine-credentials", params={"desktop": "a\x00"})
    assert listed.status_code == 400 and "no desktop name" in listed.text

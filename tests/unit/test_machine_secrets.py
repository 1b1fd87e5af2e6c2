"""A desktop's machine secrets: its SSH host key derived from its name (the same at every
boot, another for another name or installation), credentials only where they may go, kept
encrypted and bound to their desktop and path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput
from deskpool.domain.machine_secrets import (
    INSTALL_SCRIPT,
    MachineFile,
    credential_path,
    desktop_name,
    install_argv,
)
from deskpool.services.context import ServiceContext
from deskpool.services.machine_secrets import (
    MachineSecrets,
    MachineSecretsBroken,
    machine_key,
    ssh_fingerprint,
    ssh_host_key,
)


def test_the_ssh_host_key_is_the_names_and_the_installations() -> None:
    key, other = b"k" * 32, b"o" * 32
    private, public = ssh_host_key(key, "lab-01", "lab-01")
    again_private, again_public = ssh_host_key(key, "lab-01", "lab-01")
    assert public == again_public and public.startswith(b"ssh-ed25519 ")
    assert public.endswith(b" root@lab-01\n")
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert ssh_host_key(key, "lab-02", "lab-02")[1].split()[1] != public.split()[1]
    assert ssh_host_key(other, "lab-01", "lab-01")[1].split()[1] != public.split()[1]
    assert again_private  # (OpenSSH's format adds random check bytes: the key is the same)


def test_ssh_keygen_reads_the_private_key_as_this_public_one(tmp_path: Path) -> None:
    private, public = ssh_host_key(b"k" * 32, "lab-01", "lab-01")
    path = tmp_path / "key"
    path.write_bytes(private)
    path.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True,
                             check=True, text=True).stdout.split()
    assert derived[:2] == public.decode().split()[:2]
    (tmp_path / "key.pub").write_bytes(public)
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "key.pub")],
                            capture_output=True, check=True, text=True).stdout.split()
    assert listed[1] == ssh_fingerprint(public)


@pytest.mark.parametrize("path", ["/etc/krb5.keytab", "/etc/deskpool/credentials/ldap.pem",
                                  "/var/lib/deskpool/credentials/a/b.key"])
def test_credentials_go_where_they_may(path: str) -> None:
    assert credential_path(path) == path


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/fstab", "etc/krb5.keytab",
                                  "/etc/deskpool/credentials/", "/etc/deskpool/credentials",
                                  "/etc/deskpool/credentials/../../shadow",
                                  "/etc/deskpool/credentials/a b", "/etc/krb5.keytab/x",
                                  "/etc/deskpool/credentials//x"])
def test_credentials_go_nowhere_else(path: str) -> None:
    with pytest.raises(InvalidInput, match="cannot go to"):
        credential_path(path)


@pytest.mark.parametrize("name", ["", "-x", "a" * 64, "a/b", "a b", "x;rm"])
def test_only_desktop_names_get_secrets(name: str) -> None:
    with pytest.raises(InvalidInput, match="no desktop name"):
        desktop_name(name)


def test_the_install_command_names_each_staged_file() -> None:
    argv = install_argv([MachineFile("/etc/a", "600", b"x"), MachineFile("/etc/b", "644", b"")])
    assert argv[:5] == ["/bin/sh", "-c", INSTALL_SCRIPT, "sh", "/run/deskpool/machine-secrets"]
    assert argv[5:] == ["0", "/etc/a", "600", "1", "/etc/b", "644"]
    assert "b'x'" not in repr(MachineFile("/etc/a", "600", b"x"))  # never its content


def test_the_install_script_moves_the_files_with_their_modes_and_drops_other_keys(
        tmp_path: Path) -> None:
    """The guest's side, run here on a scratch tree (the paths rewritten under it)."""
    etc = tmp_path / "etc" / "ssh"
    etc.mkdir(parents=True)
    for kind in ("rsa", "ecdsa", "ed25519"):
        (etc / f"ssh_host_{kind}_key").write_text(kind)
        (etc / f"ssh_host_{kind}_key.pub").write_text(kind)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "0").write_text("new key")
    (staging / "1").write_text("keytab")
    script = INSTALL_SCRIPT.replace("/etc/ssh", str(etc)).replace(
        "systemctl", "true")  # no sshd here
    keytab = tmp_path / "etc" / "krb5.keytab"
    subprocess.run(["sh", "-c", script, "sh", str(staging), "0",
                    str(etc / "ssh_host_ed25519_key"), "600", "1", str(keytab), "600"],
                   check=True)
    assert sorted(p.name for p in etc.iterdir()) == ["ssh_host_ed25519_key",
                                                    "ssh_host_ed25519_key.pub"]
    assert (etc / "ssh_host_ed25519_key").read_text() == "new key"
    assert (etc / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert keytab.read_text() == "keytab" and not list(staging.iterdir())


def test_credentials_are_kept_encrypted_and_bound_to_their_desktop(tmp_path: Path) -> None:
    ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
    try:
        secrets = MachineSecrets(ctx)
        info = secrets.set_credential("lab-01", "/etc/krb5.keytab", b"KEYTAB-BYTES")
        assert (info.size, len(info.sha256)) == (12, 64)
        with ctx.uow(read_only=True) as uow:
            (row,) = uow.machine_credentials.list()
            assert b"KEYTAB-BYTES" not in row.ciphertext
        files = {f.path: f for f in secrets.files_for("lab-01", "lab-01")}
        assert files["/etc/krb5.keytab"].content == b"KEYTAB-BYTES"
        assert files["/etc/ssh/ssh_host_ed25519_key"].mode == "600"
        assert set(files) == {"/etc/ssh/ssh_host_ed25519_key",
                              "/etc/ssh/ssh_host_ed25519_key.pub", "/etc/krb5.keytab"}
        assert {f.path for f in secrets.files_for("lab-02", "lab-02")} == {
            "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub"}
        # Moved to another desktop's name in the database, it does not open.
        with ctx.uow() as uow:
            uow.machine_credentials.list()[0].desktop_name = "lab-02"
            uow.commit()
        with pytest.raises(MachineSecretsBroken, match="does not open"):
            secrets.files_for("lab-02", "lab-02")
        with pytest.raises(InvalidInput, match="empty"):
            secrets.set_credential("lab-01", "/etc/krb5.keytab", b"")
        key_file = tmp_path / "data" / "machine-secrets" / "machine-key.bin"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert machine_key(ctx.settings) == key_file.read_bytes()
    finally:
        ctx.close()

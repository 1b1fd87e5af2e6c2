"""A real Samba server for the tests, as ``ldap_server`` runs slapd and ``libvirt_hosts`` a
second libvirtd: deskpool's own ``smb.conf`` (``deskpool.fileshare.samba``) under a fresh
temporary directory, ``smbd`` in the foreground on a free port of 127.0.0.1, share accounts
with a prefix of this run's own (so concurrent test runs never share one), all removed at
``stop``. Needs root (smbd, useradd) and the Debian packages samba and smbclient."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from deskpool.fileshare.samba import SambaLayout, SambaServer, smbd_binary

SMBCLIENT = shutil.which("smbclient", path="/usr/bin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def needs_samba() -> None:
    """Skip, saying why, where the test cannot run a real smbd."""
    if os.geteuid() != 0:
        pytest.skip("a real smbd and its share accounts need root")
    if smbd_binary() is None or SMBCLIENT is None:
        pytest.skip("needs the Debian packages samba and smbclient (scripts/setup-host.sh)")


class SambaForTests:
    def __init__(self, *, quota_mib: int = 64) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="deskpool-smb-"))
        self.root.chmod(0o755)  # smbd, as each share account, walks down to its share
        self.layout = SambaLayout(state_dir=self.root / "samba", share_root=self.root / "shares",
                                  port=_free_port(), listen="127.0.0.1", quota_mib=quota_mib,
                                  account_prefix=f"dpt{secrets.token_hex(2)}-u")
        self.server = SambaServer(self.layout)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SambaForTests:
        self.server.write_config()
        smbd = smbd_binary()
        assert smbd is not None
        self.process = subprocess.Popen(
            [smbd, "--foreground", "--no-process-group", "-s", str(self.layout.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.server.reachable(timeout_s=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.layout.state_dir / "log" / "smbd.log"
                raise RuntimeError("the test smbd did not start: " + (
                    log.read_text(errors="replace")[-2000:] if log.exists() else "no log"))
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """The server goes down (its children, serving connections, with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        self.kill()
        for entry in pwd.getpwall():
            if entry.pw_name.startswith(self.layout.account_prefix):
                subprocess.run(["userdel", entry.pw_name], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def smbclient(self, share: str, user: str, password: str, command: str,
                  ) -> subprocess.CompletedProcess[str]:
        """``smbclient //127.0.0.1/SHARE -c COMMAND`` as ``user``, the password through the
        environment (never on a command line)."""
        assert SMBCLIENT is not None
        env = {"PATH": "/usr/bin:/bin", "PASSWD": password}
        return subprocess.run(
            [SMBCLIENT, f"//127.0.0.1/{share}", "-p", str(self.layout.port), "-U", user,
             "-m", "SMB3", "-c", command], env=env, capture_output=True, text=True,
            timeout=60, check=False)

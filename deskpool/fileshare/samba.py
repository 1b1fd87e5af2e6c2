"""deskpool's own Samba server: its configuration, one share per user, per-session passwords.

deskpool writes a dedicated ``smb.conf`` (never the machine's ``/etc/samba/smb.conf``) whose
directories (private, lock, state, cache, pid) all lie under one state directory, so the
server it describes shares nothing with another Samba on the machine; ``smbd -s CONF``
serves it (the tests start their own on a free port).

**One share per user.** Each user's share is served by Samba's ``[homes]`` section: the share
``deskpool-u<uid>`` is the directory ``<share_root>/deskpool-u<uid>``, and ``valid users =
%S`` lets only the account of that name connect to it. The account is a Unix system account
of its own on the file server (no shell, no home, made on first use), which owns its
directory (mode 0700): smbd switches to that uid for every file operation, so even a
mistake in the Samba configuration cannot give one user's connection another's files,
and a kernel user quota on the share filesystem (``setquota -u``) applies per user. The
account is named by the user's deskpool uid (allocated once, unique): a bounded, valid Unix
name whatever the user name is.

**Per-session credentials.** ``issue`` sets a fresh random password in Samba's own password
database (tdbsam, in the private directory, root-only) and enables the account; ``revoke``
disables it, sets another random password nobody learns, and ends smbd's connections of
that account, so neither the old password nor a connection made with it works after. The
password is only ever returned to the caller (who hands it to the guest): it is kept
nowhere else.

**Quota.** ``dfree command`` makes each share report ``quota_mib`` as its size, less what the
user's directory holds (clients see the quota as the disk); :meth:`SambaServer.usage_bytes`
lets the caller refuse a share already at its quota.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import DriverError, InvalidInput

ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TIMEOUT_S = 30.0


class FileServerUnavailable(DriverError):
    """The file server does not answer, or refused to set a user's share up."""


@dataclass(frozen=True)
class SambaLayout:
    """Where deskpool's Samba server keeps everything, and how it listens."""

    state_dir: Path  # smb.conf, the dfree script, and Samba's own directories under it
    share_root: Path  # one directory per user's share
    port: int = 445
    listen: str = "127.0.0.1"  # the address smbd binds (user-mode guests reach loopback)
    quota_mib: int = 2048  # each user's share
    account_prefix: str = "deskpool-u"

    @property
    def config(self) -> Path:
        return self.state_dir / "smb.conf"

    @property
    def private_dir(self) -> Path:
        return self.state_dir / "private"

    @property
    def dfree_script(self) -> Path:
        return self.state_dir / "dfree"


def account_for(layout: SambaLayout, uid: int) -> str:
    """The file server's account (and share name) of the user with deskpool uid ``uid``."""
    name = f"{layout.account_prefix}{uid}"
    if uid < 0 or not ACCOUNT.match(name):
        raise InvalidInput(f"no valid share account name for uid {uid} with prefix "
                           f"{layout.account_prefix!r}")
    return name


def render_config(layout: SambaLayout) -> str:
    """The whole smb.conf of deskpool's Samba server."""
    s = layout.state_dir
    return f"""# Written by deskpool (deskpool/fileshare/samba.py): changes are overwritten.
[global]
  server role = standalone server
  passdb backend = tdbsam:{s}/private/passdb.tdb
  private dir = {s}/private
  lock directory = {s}/lock
  state directory = {s}/state
  cache directory = {s}/cache
  pid directory = {s}/run
  ncalrpc dir = {s}/run/ncalrpc
  log file = {s}/log/smbd.log
  logging = file
  max log size = 10000
  smb ports = {layout.port}
  interfaces = {layout.listen}
  bind interfaces only = yes
  disable netbios = yes
  server min protocol = SMB3
  # Only the accounts deskpool made, with the password of the session it issued.
  map to guest = never
  restrict anonymous = 2
  obey pam restrictions = no
  unix password sync = no
  usershare max shares = 0
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes

[homes]
  comment = deskpool redirected folders
  path = {layout.share_root}/%S
  valid users = %S
  browseable = no
  read only = no
  hide unreadable = yes
  create mask = 0600
  directory mask = 0700
  dfree command = {layout.dfree_script}
  dfree cache time = 10
"""


def render_dfree(layout: SambaLayout) -> str:
    """smbd runs this in the share with the directory as argument: total and free 1 KiB
    blocks, so a client sees the user's quota as the size of the disk."""
    return f"""#!/bin/sh
# Written by deskpool: the user's quota as the share's size (KiB), less what it holds.
quota={layout.quota_mib * 1024}
used=$(du -sk "${{1:-.}}" 2>/dev/null | cut -f1)
free=$((quota - ${{used:-0}}))
[ "$free" -gt 0 ] || free=0
echo "$quota $free 1024"
"""


def _run(argv: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=_TIMEOUT_S, check=False, env={"PATH": _SYSTEM_PATH})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FileServerUnavailable(f"{argv[0]} could not be run: {exc}") from exc


class SambaServer:
    """deskpool's Samba server on this machine (see the module docstring). Needs root."""

    def __init__(self, layout: SambaLayout) -> None:
        self.layout = layout

    # --- configuration ---------------------------------------------------------------------

    def write_config(self) -> Path:
        """Write smb.conf and the dfree script (only when they changed); the config path."""
        lay = self.layout
        for sub in ("private", "lock", "state", "cache", "run/ncalrpc", "log"):
            (lay.state_dir / sub).mkdir(parents=True, exist_ok=True)
        lay.private_dir.chmod(0o700)  # the password database
        lay.share_root.mkdir(parents=True, exist_ok=True)
        lay.share_root.chmod(0o755)  # each share directory below is its owner's alone
        _write_if_changed(lay.dfree_script, render_dfree(lay), 0o755)
        _write_if_changed(lay.config, render_config(lay), 0o644)
        return lay.config

    def start_daemon(self, timeout_s: float = 20.0) -> None:
        """Run smbd on this configuration as a daemon (where no service manager does) and
        wait until it answers; ``FileServerUnavailable`` with its log's end if it does not."""
        smbd = smbd_binary()
        if smbd is None:
            raise FileServerUnavailable("smbd is not installed (Debian package samba)")
        started = _run([smbd, "-D", "-s", str(self.write_config())])
        deadline = time.monotonic() + timeout_s
        while not self.reachable(timeout_s=0.5):
            if started.returncode != 0 or time.monotonic() > deadline:
                log_file = self.layout.state_dir / "log" / "smbd.log"
                tail = (log_file.read_text(errors="replace")[-600:] if log_file.exists()
                        else started.stderr)
                raise FileServerUnavailable(f"smbd did not start on {self.layout.listen}:"
                                            f"{self.layout.port}: {tail.strip()}")
            time.sleep(0.2)

    def shares(self) -> list[str]:
        """The shares made so far, by name."""
        root = self.layout.share_root
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and p.name.startswith(self.layout.account_prefix))

    def reachable(self, address: str | None = None, timeout_s: float = 2.0) -> bool:
        """Whether smbd accepts TCP connections on its port."""
        try:
            with socket.create_connection((address or self.layout.listen, self.layout.port),
                                          timeout=timeout_s):
                return True
        except OSError:
            return False

    # --- one user's share ------------------------------------------------------------------

    def ensure_share(self, uid: int) -> str:
        """The user's share account and directory, made on first use; the share's name."""
        name = account_for(self.layout, uid)
        try:
            pwd.getpwnam(name)
        except KeyError:
            made = _run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                         "--shell", "/usr/sbin/nologin", "--comment", "deskpool share", name])
            if made.returncode not in (0, 9):  # 9: made meanwhile by another broker
                raise FileServerUnavailable(f"could not make the share account {name}: "
                                            f"{made.stderr.strip()[:300]}") from None
        entry = pwd.getpwnam(name)
        directory = self.layout.share_root / name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (directory.stat().st_uid, directory.stat().st_gid) != (entry.pw_uid, entry.pw_gid):
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o700)
        return name

    def issue(self, name: str) -> str:
        """A fresh random password for the share account ``name``, enabled now; the only copy
        is the one returned."""
        password = secrets.token_urlsafe(24)
        conf = str(self.layout.config)
        added = _run(["smbpasswd", "-c", conf, "-s", "-a", name],
                     stdin=f"{password}\n{password}\n")
        if added.returncode != 0:
            raise FileServerUnavailable(f"could not set the session password of {name}: "
                                        f"{(added.stderr or added.stdout).strip()[:300]}")
        enabled = _run(["smbpasswd", "-c", conf, "-e", name])
        if enabled.returncode != 0:
            raise FileServerUnavailable(f"could not enable {name}: "
                                        f"{(enabled.stderr or enabled.stdout).strip()[:300]}")
        return password

    def revoke(self, name: str) -> None:
        """The session's password no longer works: the account is disabled, its password
        replaced by one nobody knows, and its open connections ended. Nothing to do for an
        account that was never given one."""
        conf = str(self.layout.config)
        known = _run(["pdbedit", "-s", conf, "-u", name])
        if known.returncode != 0:
            return
        junk = secrets.token_urlsafe(24)
        changed = _run(["smbpasswd", "-c", conf, "-s", name], stdin=f"{junk}\n{junk}\n")
        disabled = _run(["smbpasswd", "-c", conf, "-d", name])
        if changed.returncode != 0 or disabled.returncode != 0:
            raise FileServerUnavailable(
                f"could not revoke the session password of {name}: "
                f"{(changed.stderr or disabled.stderr or disabled.stdout).strip()[:300]}")
        self.end_connections(name)

    def end_connections(self, name: str) -> list[int]:
        """End smbd's processes serving ``name`` (an authenticated connection outlives a
        password change); their pids."""
        listed = _run(["smbstatus", "-s", str(self.layout.config), "-p", "-u", name])
        pids = sorted({int(m) for m in re.findall(rf"^\s*(\d+)\s+{re.escape(name)}\s",
                                                  listed.stdout, flags=re.MULTILINE)})
        for pid in pids:
            with suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGTERM)
        return pids

    def usage_bytes(self, name: str) -> int:
        """What the user's share holds on disk."""
        total = 0
        for root, dirs, files in os.walk(self.layout.share_root / name):
            for entry in (*dirs, *files):
                try:
                    total += os.lstat(os.path.join(root, entry)).st_blocks * 512
                except OSError:
                    continue  # removed meanwhile
        return total


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(mode)
        tmp.replace(path)


def smbd_binary() -> str | None:
    """Where smbd is (``/usr/sbin`` is not on every user's PATH)."""
    return shutil.which("smbd", path=_SYSTEM_PATH)

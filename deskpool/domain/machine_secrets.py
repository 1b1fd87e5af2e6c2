"""A desktop's machine secrets: what makes it the same machine at every boot besides its
name, machine-id and MAC (``deskpool.domain.identity``).

* its **SSH host key** (Ed25519), the same for the same desktop name at every boot, so a
  stateless desktop reset at every logoff keeps the host key its users' ``known_hosts``
  hold;
* its **machine credentials**: files an administrator gives for a desktop name (a Kerberos
  keytab from the domain join, a client certificate), kept encrypted by the broker and put
  back in place at every boot.

They reach the guest through its agent, never through the domain definition (which
libvirt's read-only clients may read): the broker writes each file under ``STAGING`` (qemu-ga
creates new files 0600) and runs ``INSTALL_SCRIPT``, which moves them into place with their
modes, drops every other SSH host key, and restarts an enabled sshd so it serves this one.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from deskpool.domain.errors import InvalidInput

STAGING = "/run/deskpool/machine-secrets"
SSH_KEY_PATH = "/etc/ssh/ssh_host_ed25519_key"
# Where credentials may go: a keytab, or a folder of deskpool's own. Not anywhere in /etc: a
# mistyped path must not overwrite the desktop's passwd, fstab or sudoers.
CREDENTIAL_PATHS = ("/etc/krb5.keytab",)
CREDENTIAL_DIRS = ("/etc/deskpool/credentials/", "/var/lib/deskpool/credentials/")
MAX_CREDENTIAL_BYTES = 64 * 1024
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]{1,254}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# sh -c INSTALL_SCRIPT sh STAGING NAME PATH MODE [NAME PATH MODE ...]
INSTALL_SCRIPT = """set -eu
dir=$1; shift
while [ $# -ge 3 ]; do
    mkdir -p "${2%/*}"
    chmod "$3" "$dir/$1"
    mv -f "$dir/$1" "$2"
    shift 3
done
for key in /etc/ssh/ssh_host_*_key; do
    [ "$key" = /etc/ssh/ssh_host_ed25519_key ] || [ ! -e "$key" ] || rm -f "$key" "$key.pub"
done
if systemctl is-enabled --quiet ssh.service 2>/dev/null; then
    systemctl reset-failed ssh.service 2>/dev/null || true
    systemctl restart ssh.service
fi
"""


@dataclass(frozen=True)
class MachineFile:
    """One file to put in the guest: where, with what mode, and its bytes."""

    path: str
    mode: str  # octal, as chmod takes it
    content: bytes

    def __repr__(self) -> str:  # never the content: it is a secret
        return f"MachineFile({self.path!r}, {self.mode}, {len(self.content)} bytes)"


def desktop_name(name: str) -> str:
    """``name`` if it can be a desktop's (machine secrets may be given before it exists)."""
    if not _NAME_RE.match(name):
        raise InvalidInput(f"{name!r} is no desktop name: 1 to 63 characters of letters, "
                           "digits, '.', '_' and '-'")
    return name


def credential_path(path: str) -> str:
    """``path`` if a machine credential may be put there; ``InvalidInput`` saying where
    credentials may go otherwise."""
    normal = posixpath.normpath(path) if path.startswith("/") else ""
    allowed = normal in CREDENTIAL_PATHS or any(
        normal.startswith(d) and len(normal) > len(d) for d in CREDENTIAL_DIRS)
    if normal != path or not _PATH_RE.match(path) or not allowed:
        raise InvalidInput(
            f"a machine credential cannot go to {path!r}: it goes to "
            f"{', '.join(CREDENTIAL_PATHS)} or a file under {' or '.join(CREDENTIAL_DIRS)} "
            "(letters, digits, '.', '_', '-' and '/' only)")
    return path


def credential_content(content: bytes, path: str) -> bytes:
    if not content:
        raise InvalidInput(f"the machine credential for {path} is empty")
    if len(content) > MAX_CREDENTIAL_BYTES:
        raise InvalidInput(f"the machine credential for {path} is {len(content)} bytes; at "
                           f"most {MAX_CREDENTIAL_BYTES} are kept")
    return content


def install_argv(files: list[MachineFile]) -> list[str]:
    """The agent command that moves ``files`` (written as ``STAGING/<n>``) into place."""
    argv = ["/bin/sh", "-c", INSTALL_SCRIPT, "sh", STAGING]
    for number, file in enumerate(files):
        argv += [str(number), file.path, file.mode]
    return argv

"""A throw-away OpenLDAP ``slapd`` for tests: its own config, database and port in a temp dir.

Uses a ``slapd.conf`` passed with ``-f``, so the machine's /etc/ldap/slapd.d (whatever the
Debian package set up, or a slapd already running on port 389) plays no part. The directory is
loaded offline with ``slapadd`` before the server starts, then slapd runs in the foreground
(``-d 0``) as a child of the test process and is stopped and deleted on exit.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ldap3 import NONE, Connection, Server

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")  # Debian builds back_mdb as a loadable module

BASE_DN = "dc=deskpool,dc=test"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
READER_DN = f"cn=reader,{BASE_DN}"
READER_PASSWORD = "reader-pw"
# A DN with parentheses: a group filter that does not escape {user_dn} breaks on it.
DAVE_DN = f"cn=Dave (IT),{PEOPLE_DN}"


def ssha(password: str) -> str:
    """The ``{SSHA}`` userPassword value slappasswd would produce."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _person(dn: str, uid: str, cn: str, sn: str, password: str) -> str:
    return (f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {sn}\n"
            f"userPassword: {ssha(password)}\n")


def _posix_person(uid: str, cn: str, password: str, uid_number: int, gid_number: int) -> str:
    """An RFC 2307 user (posixAccount): what nslcd or sssd on a desktop resolve."""
    return (f"dn: uid={uid},{PEOPLE_DN}\nobjectClass: inetOrgPerson\n"
            f"objectClass: posixAccount\nuid: {uid}\ncn: {cn}\nsn: {cn.split()[-1]}\n"
            f"userPassword: {ssha(password)}\nuidNumber: {uid_number}\n"
            f"gidNumber: {gid_number}\nhomeDirectory: /home/{uid}\nloginShell: /bin/bash\n")


# RFC 2307 users: erin (uidNumber 20001, Devs' gidNumber 5000), frank with a system account's
# uidNumber, and gus sharing erin's uidNumber (a directory mistake deskpool must refuse).
POSIX_USERS = {"erin": (20001, 5000), "frank": (500, 5000), "gus": (20001, 20001)}


def directory_ldif() -> str:
    """alice (vdi-users, devs), bob (staff), dave (vdi-users), the RFC 2307 users of
    ``POSIX_USERS`` (vdi-users; their password is NAME-pw) and the reader service account."""
    return "\n".join([
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\n"
        "dc: deskpool\no: deskpool\n",
        f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS_DN}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: reader\nuserPassword: {ssha(READER_PASSWORD)}\n",
        _person(f"uid=alice,{PEOPLE_DN}", "alice", "Alice Liddell", "Liddell", "alice-pw"),
        _person(f"uid=bob,{PEOPLE_DN}", "bob", "Bob Builder", "Builder", "bob-pw"),
        _person(DAVE_DN, "dave", "Dave (IT)", "Dave", "dave-pw"),
        *(_posix_person(name, f"{name.title()} Posix", f"{name}-pw", *numbers)
          for name, numbers in POSIX_USERS.items()),
        f"dn: cn=vdi-users,{GROUPS_DN}\nobjectClass: groupOfNames\ncn: vdi-users\n"
        f"member: uid=alice,{PEOPLE_DN}\nmember: {DAVE_DN}\n"
        + "".join(f"member: uid={name},{PEOPLE_DN}\n" for name in POSIX_USERS),
        f"dn: cn=staff,{GROUPS_DN}\nobjectClass: groupOfNames\ncn: staff\n"
        f"member: uid=bob,{PEOPLE_DN}\n",
        # An RFC 2307 group, matched by memberUid rather than by DN.
        f"dn: cn=Devs,{GROUPS_DN}\nobjectClass: posixGroup\ncn: Devs\ngidNumber: 5000\n"
        "memberUid: alice\n",
    ])


def slapd_conf(work_dir: Path) -> str:
    schemas = "".join(f'include "{SCHEMA_DIR / name}.schema"\n'
                      for name in ("core", "cosine", "inetorgperson", "nis"))
    # Passwords are only usable to bind; entries are readable by the reader service account
    # and by each user for their own entry, so group lookups must go through the reader.
    return f"""{schemas}
pidfile "{work_dir / 'slapd.pid'}"
argsfile "{work_dir / 'slapd.args'}"
modulepath "{MODULE_DIR}"
moduleload back_mdb
database mdb
maxsize 16777216
suffix "{BASE_DN}"
rootdn "cn=admin,{BASE_DN}"
directory "{work_dir / 'db'}"
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{READER_DN}" read by self read by * none
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # slapd must not outlive a test run that was killed (SIGKILL skips our clean-up).
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SlapdServer:
    """``with SlapdServer() as server:`` gives a running directory at ``server.url``."""

    def __init__(self, start_timeout_s: float = 15) -> None:
        self.start_timeout_s = start_timeout_s
        self.work_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def __enter__(self) -> SlapdServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        for tool in (SLAPD, SLAPADD):
            if not os.access(tool, os.X_OK):
                raise RuntimeError(f"{tool} is missing: apt-get install slapd ldap-utils")
        self.work_dir = Path(tempfile.mkdtemp(prefix="deskpool-slapd-"))
        (self.work_dir / "db").mkdir()
        conf = self.work_dir / "slapd.conf"
        conf.write_text(slapd_conf(self.work_dir))
        ldif = self.work_dir / "directory.ldif"
        ldif.write_text(directory_ldif())
        subprocess.run([SLAPADD, "-q", "-f", str(conf), "-l", str(ldif)], check=True,
                       capture_output=True, timeout=60)
        # The free port may be taken by someone else before slapd binds it: try another.
        for _attempt in range(3):
            self.port = free_port()
            log = (self.work_dir / "slapd.log").open("wb")
            self.process = subprocess.Popen(
                [SLAPD, "-f", str(conf), "-h", f"{self.url}/", "-d", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
            log.close()
            if self._wait_until_answering():
                return
        output = (self.work_dir / "slapd.log").read_text(errors="replace")
        raise RuntimeError(f"slapd did not start on {self.url}: {output}")

    def _wait_until_answering(self) -> bool:
        """True once the reader can bind; False if slapd exited (a port clash, most likely)."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            conn = Connection(Server(self.url, get_info=NONE, connect_timeout=1),
                              READER_DN, READER_PASSWORD, receive_timeout=1)
            try:
                if conn.bind():
                    return True
            except Exception:  # not listening yet
                pass
            finally:
                conn.unbind()
            time.sleep(0.05)
        self._terminate()
        raise RuntimeError(f"slapd on {self.url} did not answer within {self.start_timeout_s}s")

    def _terminate(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # slapd shuts down cleanly on SIGTERM
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        self._terminate()
        self.process = None
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

"""A second, independent libvirt hypervisor host on this machine, for multi-host tests.

``SecondLibvirtHost`` runs its own ``libvirtd`` in *session* mode as the unprivileged system user
``deskpool-host2`` (created with ``useradd --system`` when missing), with every directory the
daemon uses (``XDG_RUNTIME_DIR``, ``XDG_CONFIG_HOME``, ``XDG_CACHE_HOME``, ``HOME``) and its storage
directory inside one fresh temporary directory. It is reached as

    qemu+unix:///session?socket=<tmp>/run/libvirt/libvirt-sock

so it shares nothing with the system daemon (``qemu:///system``): not its socket, not its state
under /run/libvirt and /var/lib/libvirt, not its storage pools, not its QEMU processes, which run
as ``deskpool-host2`` with TCG (the user cannot open ``/dev/kvm``) and user-mode networking.
Several test sessions may each run one at the same time.

Why not a second root ``libvirtd -f other.conf``: a privileged daemon's drivers keep their state
in compiled-in directories (/run/libvirt/qemu...) and each holds an fcntl lock on
``/run/libvirt/<driver>/driver.pid`` there, which the system daemon already holds, so a second one
cannot start; only ``unix_sock_dir`` and its own pid file are configurable. ``qemu:///embed``
would work but has no daemon to kill.

``kill_daemon()`` SIGKILLs the daemon and leaves its QEMU processes running (libvirt starts QEMU
daemonized, so it does not die with the daemon); ``start_daemon()`` starts it again, and libvirt
re-attaches the running guests from the status files under ``<tmp>/run``. ``lose_host()`` loses
the host whole: the daemon and every QEMU process of it SIGKILLed, and (by default) its runtime
directory emptied as a reboot empties ``/run``; the restarted daemon then finds its persistent
domains shut off.

Needs root (to create the user and switch to it; as another user the daemon runs as that user),
and the Debian packages libvirt-daemon (``libvirtd``), qemu-system-x86, qemu-utils (``qemu-img``,
used by the storage driver) and passwd (``useradd``).
"""

from __future__ import annotations

import atexit
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import suppress
from pathlib import Path
from types import TracebackType

import libvirt

# libvirt prints every error to stderr unless a handler swallows it (deskpool's driver does the
# same on import); polling a stopped daemon would otherwise fill the test output.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

HOST_USER = "deskpool-host2"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# UNIX socket paths must stay under 108 bytes; the longest one the daemon makes is the guest
# agent channel, <XDG_CONFIG_HOME>/libvirt/qemu/channel/target/domain-<id>-<name[:20]>/<channel>.
_LONGEST_SOCKET_SUFFIX = (
    "/cfg/libvirt/qemu/channel/target/domain-9999-" + "x" * 20 + "/org.qemu.guest_agent.0"
)
_SOCKET_PATH_MAX = 107
# VNC ports of this host's guests: a daemon checks that a port is free before handing it out,
# but another daemon may bind it in between. The system daemon counts up from 5900; each second
# host takes one of 100 blocks of 100 ports above it, at random, so concurrent test sessions
# rarely share one.
_VNC_FIRST_PORT, _VNC_BLOCK, _VNC_BLOCKS = 15900, 100, 100
_MIGRATION_FIRST_PORT = 30000  # the same block index, in 30000-39999
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


class HostSetupError(RuntimeError):
    """The second host could not be prepared or its daemon did not come up."""


def ensure_system_user(name: str = HOST_USER) -> pwd.struct_passwd:
    """The system user ``name``, created (with its own group, no home) if missing. Safe when
    several test sessions race to create it."""
    for attempt in range(20):
        with suppress(KeyError):
            return pwd.getpwnam(name)
        useradd = shutil.which("useradd", path=_SYSTEM_PATH)
        if useradd is None:
            raise HostSetupError("useradd not found (Debian package: passwd)")
        result = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             "--comment", "deskpool test hypervisor host", name],
            capture_output=True, text=True, check=False,
        )
        if result.returncode == 0:
            continue
        # 9: exists already (another session won the race); 1/10: /etc/passwd locked meanwhile.
        if attempt == 19:
            raise HostSetupError(f"useradd {name} failed: {result.stderr.strip()}")
        time.sleep(0.2)
    return pwd.getpwnam(name)


class SecondLibvirtHost:
    """A session-mode libvirtd with its own socket, storage and QEMU processes.

    Use as a context manager; ``uri`` and ``storage_dir`` are what a test hands to deskpool
    (``open_driver(host.uri, storage_dir=host.storage_dir)``).
    """

    def __init__(
        self, *, user: str = HOST_USER, parent: Path = Path("/tmp"), start_timeout_s: float = 60
    ) -> None:
        self.start_timeout_s = start_timeout_s
        self._user_name = user
        self._parent = parent
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._uid = self._gid = -1
        self.last_start_s: float | None = None  # seconds until the last start answered
        low = _VNC_FIRST_PORT + _VNC_BLOCK * random.randrange(_VNC_BLOCKS)
        self.vnc_ports = (low, low + _VNC_BLOCK - 1)

    # --- paths ---------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise HostSetupError("the second host is not started (use it as a context manager)")
        return self._base

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket_path}"

    @property
    def storage_dir(self) -> Path:
        return self.base_dir / "pool"

    @property
    def daemon_log(self) -> Path:
        return self.base_dir / "libvirtd.log"

    @property
    def qemu_log_dir(self) -> Path:
        return self.base_dir / "cache" / "libvirt" / "qemu" / "log"

    def qemu_log(self, domain_name: str, lines: int = 40) -> str:
        """The end of a guest's QEMU log (command line, QEMU's own messages), for diagnostics."""
        try:
            text = (self.qemu_log_dir / f"{domain_name}.log").read_text(errors="replace")
        except OSError:
            return "(no QEMU log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def _qemu_state_dir(self) -> Path:
        return self.base_dir / "run" / "libvirt" / "qemu" / "run"

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SecondLibvirtHost:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create the user and directories, start the daemon and let it probe QEMU once."""
        if self._base is not None:
            return
        if os.geteuid() == 0:
            account = ensure_system_user(self._user_name)
            self._uid, self._gid = account.pw_uid, account.pw_gid
        else:  # not root: the daemon runs as the current user
            self._uid, self._gid = os.getuid(), os.getgid()
        base = Path(tempfile.mkdtemp(prefix="dph2-", dir=self._parent))
        self._base = base
        atexit.register(self.close)
        try:
            if len(str(base)) + len(_LONGEST_SOCKET_SUFFIX) > _SOCKET_PATH_MAX:
                raise HostSetupError(f"{base} is too long a path for the daemon's UNIX sockets; "
                                     "pass a shorter parent")
            self._write_layout(base)
            self.start_daemon()
            conn = libvirt.open(self.uri)
            try:
                conn.getCapabilities()  # the QEMU capability probe (~4 s), cached in <tmp>/cache
            finally:
                conn.close()
        except BaseException:
            self.close()
            raise

    def _write_layout(self, base: Path) -> None:
        for sub in ("run", "cfg/libvirt", "cache", "home", "pool"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "run").chmod(0o700)
        low, high = self.vnc_ports
        migration_low = _MIGRATION_FIRST_PORT + (low - _VNC_FIRST_PORT)
        (base / "cfg" / "libvirt" / "qemu.conf").write_text(
            "# deskpool tests: second libvirt host (tests/libvirt_hosts.py)\n"
            # QEMU's stdout/stderr straight to <tmp>/cache/libvirt/qemu/log, no virtlogd to run
            'stdio_handler = "file"\n'
            # no AppArmor/SELinux labelling: an unprivileged daemon cannot load profiles
            'security_driver = "none"\n'
            f"remote_display_port_min = {low}\n"
            f"remote_display_port_max = {high}\n"
            # Live migration between the two daemons: ports apart from the system daemon's
            # (49152-49215), for the incoming migration stream and the disk copy's NBD server.
            f"migration_port_min = {migration_low}\n"
            f"migration_port_max = {migration_low + _VNC_BLOCK - 1}\n"
        )
        # libvirt refuses to migrate between daemons reporting the same host UUID, which
        # both would read from this machine's SMBIOS.
        (base / "cfg" / "libvirt" / "libvirtd.conf").write_text(
            f'host_uuid = "{uuid.uuid4()}"\n')
        if os.geteuid() == 0:
            for path in [base, *base.rglob("*")]:
                os.chown(path, self._uid, self._gid, follow_symlinks=False)

    def _daemon_env(self) -> dict[str, str]:
        base = self.base_dir
        return {
            "PATH": _SYSTEM_PATH,
            "LANG": "C.UTF-8",
            "HOME": str(base / "home"),
            "USER": self._user_name if os.geteuid() == 0 else os.environ.get("USER", ""),
            "XDG_RUNTIME_DIR": str(base / "run"),
            "XDG_CONFIG_HOME": str(base / "cfg"),
            "XDG_CACHE_HOME": str(base / "cache"),
            "XDG_DATA_HOME": str(base / "home" / "data"),
            "XDG_STATE_HOME": str(base / "home" / "state"),
        }

    def daemon_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def daemon_pid(self) -> int | None:
        return self._proc.pid if self.daemon_running() and self._proc else None

    def start_daemon(self, timeout_s: float | None = None) -> float:
        """Start the daemon and wait until its URI answers; returns the seconds that took."""
        if self.daemon_running():
            return 0.0
        binary = shutil.which("libvirtd", path=_SYSTEM_PATH)
        if binary is None:
            raise HostSetupError("libvirtd not found (Debian package: libvirt-daemon)")
        started = time.monotonic()
        as_root = os.geteuid() == 0
        with self.daemon_log.open("ab") as log:
            self._proc = subprocess.Popen(
                [binary], env=self._daemon_env(), cwd=self.base_dir / "home",
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                user=self._uid if as_root else None, group=self._gid if as_root else None,
                extra_groups=[] if as_root else None,
                start_new_session=True,  # a Ctrl-C in the test run must not reach the daemon
            )
        deadline = started + (timeout_s or self.start_timeout_s)
        while True:
            if self._proc.poll() is not None:
                raise HostSetupError(
                    f"libvirtd exited with {self._proc.returncode}; its log:\n{self._log_tail()}")
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError:
                conn = None
            if conn is not None:
                try:
                    conn.getLibVersion()
                    break
                except libvirt.libvirtError:
                    pass
                finally:
                    with suppress(libvirt.libvirtError):
                        conn.close()
            if time.monotonic() > deadline:
                self._stop_daemon()
                raise HostSetupError(
                    f"{self.uri} did not answer within {timeout_s or self.start_timeout_s} s; "
                    f"libvirtd log:\n{self._log_tail()}")
            time.sleep(0.05)
        self.last_start_s = time.monotonic() - started
        return self.last_start_s

    def kill_daemon(self) -> None:
        """SIGKILL the daemon, as a host failure would; its QEMU processes keep running."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()

    def lose_host(self, *, reboot: bool = True, timeout_s: float = 10) -> dict[str, int]:
        """The whole host is lost, as at a power cut: the daemon and then every QEMU process
        of this host are SIGKILLed (the daemon first, so it records nothing of their end);
        returns the QEMU processes killed, by domain name, once all are gone.

        ``reboot`` also empties the runtime directory (the daemon's pid files, sockets and its
        guests' status), as the reboot that brings a real host back does to its ``/run`` (a
        tmpfs): the restarted daemon has no record of the guests, and its persistent domains
        read shut off for an unknown reason. Without it, the daemon finds the status of the
        guests it ran and, their QEMU gone, marks them shut off (crashed).
        ``start_daemon()`` brings the host back either way."""
        killed = self.qemu_pids()
        self.kill_daemon()
        for pid in killed.values():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while self.qemu_pids():
            if time.monotonic() > deadline:
                raise HostSetupError(f"QEMU processes still alive: {self.qemu_pids()}")
            time.sleep(0.05)
        if reboot:
            run = self.base_dir / "run"
            for entry in run.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return killed

    def _stop_daemon(self, grace_s: float = 15) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- QEMU processes ------------------------------------------------------------------

    def qemu_pids(self) -> dict[str, int]:
        """Running QEMU processes of this host's guests, by domain name (from the daemon's
        status directory, checked against /proc so a reused pid is never reported)."""
        found: dict[str, int] = {}
        if self._base is None or not self._qemu_state_dir.is_dir():
            return found
        for pid_file in self._qemu_state_dir.glob("*.pid"):
            if pid_file.name == "driver.pid":
                continue
            try:
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, ValueError):
                continue
            if str(self.base_dir).encode() in cmdline and "\nState:\tZ" not in status:
                found[pid_file.stem] = pid
        return found

    # --- cleanup -------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy and undefine every domain, undefine the storage pools, stop the daemon,
        kill any QEMU process of this host that is left and remove the temporary directory.
        Idempotent."""
        if self._base is None:
            return
        try:
            if not self.daemon_running() and self.socket_path.parent.is_dir():
                with suppress(HostSetupError):
                    self.start_daemon(timeout_s=30)  # killed by the test: clean up through it
            if self.daemon_running():
                self._remove_libvirt_objects()
            self._stop_daemon()
            self._kill_leftover_qemu()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            atexit.unregister(self.close)

    def _remove_libvirt_objects(self) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains(0):
                with suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                if dom.isPersistent():
                    try:
                        dom.undefineFlags(_UNDEFINE_FLAGS)
                    except libvirt.libvirtError:
                        with suppress(libvirt.libvirtError):
                            dom.undefine()
            for pool in conn.listAllStoragePools(0):
                with suppress(libvirt.libvirtError):
                    if pool.isActive():
                        pool.destroy()
                with suppress(libvirt.libvirtError):
                    pool.undefine()
        finally:
            with suppress(libvirt.libvirtError):
                conn.close()

    def _kill_leftover_qemu(self, timeout_s: float = 10) -> None:
        for pid in self.qemu_pids().values():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while self.qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.1)


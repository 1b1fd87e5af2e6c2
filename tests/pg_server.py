"""A throw-away PostgreSQL server for tests: its own cluster, port and socket in a temp dir.

PostgreSQL refuses to run as root, so when the tests run as root (CI) the cluster belongs to
the ``postgres`` system user that Debian's package creates. Authentication is ``trust`` on
loopback only; the server dies with the test session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

BIN = Path("/usr/lib/postgresql/15/bin")


def available() -> str | None:
    """None when a server can be started here, else why not."""
    if not (BIN / "initdb").is_file():
        return f"PostgreSQL server binaries are missing ({BIN}); install Debian's postgresql"
    return None


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends and helpers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    def __init__(self, *, durable_commits: bool = False) -> None:
        """``durable_commits``: a commit is on disk when it returns, as in production. Off
        (faster), a SIGKILLed server may come back without the last commits before it."""
        self.durable_commits = durable_commits
        self.work = Path(tempfile.mkdtemp(prefix="deskpool-pg-"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    def _run_as(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_postgres else argv

    def __enter__(self) -> PostgresServer:
        if self._as_postgres:
            shutil.chown(self.work, "postgres", "postgres")
        subprocess.run(self._run_as([str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True)
        self.start()
        return self

    @property
    def data(self) -> Path:
        return self.work / "data"

    def start(self) -> None:
        """Start the server on its cluster and port (again, after :meth:`stop`); returns once
        it takes connections (after crash recovery, when it was killed)."""
        self.process = subprocess.Popen(self._run_as([
            str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.work}",
            "-c", "fsync=off", "-c", "max_connections=300",
            "-c", f"synchronous_commit={'on' if self.durable_commits else 'off'}",
            "-c", "full_page_writes=off"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not self.accepting():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start: " + (
                    self.process.stderr.read().decode() if self.process.stderr else ""))
            time.sleep(0.1)

    def accepting(self) -> bool:
        return subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p",
                               str(self.port)], capture_output=True).returncode == 0

    def postmaster_pid(self) -> int:
        """The server's own process (``self.process`` may be ``runuser`` above it)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, how: Literal["fast", "kill"] = "fast") -> None:
        """Stop the server as an outage would: ``fast`` is PostgreSQL's fast shutdown (every
        session is ended, the server exits cleanly); ``kill`` SIGKILLs the postmaster, as the
        OOM killer would, and waits for its backends to notice and exit, so that
        :meth:`start` (which then runs crash recovery) finds the cluster free."""
        assert self.process is not None, "the server is not running"
        pid = self.postmaster_pid()
        children = _children_of(pid)
        os.kill(pid, signal.SIGINT if how == "fast" else signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(child) for child in children):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL backends {children} outlived their postmaster")
            time.sleep(0.05)
        self.process = None

    def restart(self, how: Literal["fast", "kill"] = "fast", down_s: float = 0.0) -> None:
        """:meth:`stop`, ``down_s`` seconds of outage, :meth:`start`."""
        self.stop(how)
        time.sleep(down_s)
        self.start()

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        subprocess.run([str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.work, ignore_errors=True)

"""The fake driver's guest OS: what its QEMU guest agent shows (files, identity, exec).

Split from ``fake.py``; only ``FakeDriver`` uses it.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deskpool.domain.errors import (
    AgentUnavailable,
    DriverError,
    InvalidInput,
)
from deskpool.domain.identity import GUEST_MARKER_PATH, DesktopIdentity
from deskpool.domain.machine_secrets import INSTALL_SCRIPT
from deskpool.domain.models import (
    VmSpec,
)

# --- the fake guest: what its QEMU guest agent shows ------------------------------------


@dataclass
class _OpenFile:
    path: str
    pos: int = 0
    writable: bool = False


@dataclass
class _Process:
    exitcode: int
    out: bytes
    err: bytes
    capture: bool
    polled: bool = False  # the first status poll says "still running", as a real one may


# fopen(3) modes qemu-ga accepts.
_OPEN_MODES = frozenset({"r", "rb", "w", "wb", "a", "ab", "r+", "rb+", "r+b", "w+", "wb+", "w+b",
                         "a+", "ab+", "a+b"})
# A tmpfs in the real guest: its files live in memory, so they are gone after a boot but come
# back with a restored memory state (managed save, snapshot, instant clone).
TMPFS_PREFIX = "/run/"


class FakeGuest:
    """A running guest OS. ``files`` is the VM's disk plus its tmpfs (kept across boots, the
    tmpfs emptied at boot); handles, processes and the boot delay live only as long as this
    boot."""

    def __init__(
        self, spec: VmSpec, files: dict[str, bytes], delay_polls: int, *,
        clock_stale: bool = False,
    ) -> None:
        self._mac = spec.mac.lower()
        self._files = files
        self._silent_polls = delay_polls
        self._handles: dict[int, _OpenFile] = {}
        self._procs: dict[int, _Process] = {}
        self._next_id = 1000
        self.time_ns: int | None = None
        # True for a guest restored from saved memory until guest-set-time runs.
        self.clock_stale = clock_stale
        self.users: list[str] = []  # who is logged in to the guest's desktop
        self.idle_minutes = 0  # since their last keystroke, as ``who -u`` reports it
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "guest-ping": lambda _args: {},
            "guest-get-host-name": lambda _args: {"host-name": self._hostname()},
            "guest-network-get-interfaces": self._interfaces,
            "guest-file-open": self._file_open,
            "guest-file-read": self._file_read,
            "guest-file-write": self._file_write,
            "guest-file-flush": self._file_flush,
            "guest-file-close": self._file_close,
            "guest-exec": self._exec,
            "guest-exec-status": self._exec_status,
            "guest-set-time": self._set_time,
            "guest-get-users": lambda _args: [
                {"user": user, "login-time": 1.0} for user in self.users],
        }

    @classmethod
    def boot(cls, spec: VmSpec, files: dict[str, bytes], delay_polls: int) -> FakeGuest:
        guest = cls(spec, files, delay_polls)
        for path in [p for p in files if p.startswith(TMPFS_PREFIX)]:
            del files[path]
        files.setdefault("/etc/hostname", b"localhost\n")
        files.setdefault("/etc/machine-id", f"{spec.vm_id.hex}\n".encode())
        try:  # the boot hook: apply the identity handed over by fw_cfg, then leave the marker
            identity = DesktopIdentity.from_guest_text(spec.identity_text or "")
        except InvalidInput:
            return guest  # a real hook rejects it too: the image's defaults stay
        files["/etc/hostname"] = f"{identity.hostname}\n".encode()
        files["/etc/machine-id"] = f"{identity.machine_id}\n".encode()
        files[GUEST_MARKER_PATH] = (spec.identity_text or "").encode()
        return guest

    @classmethod
    def restore(cls, spec: VmSpec, files: dict[str, bytes]) -> FakeGuest:
        """The guest as its memory was saved: no boot hook, the agent answers at once, the
        clock is stale. ``spec.mac`` is the NIC it sees (an instant clone's swapped one)."""
        return cls(spec, files, 0, clock_stale=True)

    def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        if self._silent_polls > 0:  # still booting: the agent has not started
            self._silent_polls -= 1
            raise AgentUnavailable("guest agent not available: QEMU guest agent is not connected")
        handler = self._commands.get(command)
        if handler is None:
            raise DriverError(f"guest agent command {command} failed: "
                              f"The command {command} has not been found")
        return handler(arguments)

    def _hostname(self) -> str:
        return self._files.get("/etc/hostname", b"localhost").decode().strip()

    def _interfaces(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        def nic(name: str, mac: str, ip: str, prefix: int) -> dict[str, Any]:
            address = {"ip-address-type": "ipv4", "ip-address": ip, "prefix": prefix}
            return {"name": name, "hardware-address": mac, "ip-addresses": [address]}

        # 10.0.2.15 is what QEMU's user-mode network hands out.
        return [nic("lo", "00:00:00:00:00:00", "127.0.0.1", 8),
                nic("eth0", self._mac, "10.0.2.15", 24)]

    def _file_open(self, args: dict[str, Any]) -> int:
        path, mode = _arg(args, "path", str), args.get("mode", "r")
        if mode not in _OPEN_MODES:
            raise _agent_error(f"invalid file open mode '{mode}'")
        if path not in self._files and mode.startswith("r"):
            raise _agent_error(f"Failed to open file '{path}' (mode: '{mode}'): "
                               "No such file or directory")
        if mode.startswith("w"):
            self._files[path] = b""  # fopen(3) truncates
        self._files.setdefault(path, b"")
        self._next_id += 1
        pos = len(self._files[path]) if mode.startswith("a") else 0
        self._handles[self._next_id] = _OpenFile(path, pos, writable=mode not in ("r", "rb"))
        return self._next_id

    def _handle(self, args: dict[str, Any]) -> _OpenFile:
        handle = _arg(args, "handle", int)
        if handle not in self._handles:
            raise _agent_error(f"handle '{handle}' has not been found")
        return self._handles[handle]

    def _file_read(self, args: dict[str, Any]) -> dict[str, Any]:
        fh, count = self._handle(args), _arg(args, "count", int) if "count" in args else 4096
        if count < 0:
            raise _agent_error(f"value '{count}' is invalid for argument count")
        data = self._files.get(fh.path, b"")[fh.pos : fh.pos + count]
        fh.pos += len(data)
        # Like feof(3): set only once a read asked for more than was left.
        return {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                "eof": len(data) < count}

    def _file_write(self, args: dict[str, Any]) -> dict[str, Any]:
        fh = self._handle(args)
        if not fh.writable:
            raise _agent_error(f"failed to write to file '{fh.path}': Bad file descriptor")
        try:
            data = base64.b64decode(_arg(args, "buf-b64", str), validate=True)
        except ValueError:
            raise _agent_error("value for 'buf-b64' is not valid base64") from None
        if "count" in args:
            data = data[: _arg(args, "count", int)]
        old = self._files.get(fh.path, b"")
        self._files[fh.path] = old[: fh.pos].ljust(fh.pos, b"\0") + data + old[fh.pos + len(data):]
        fh.pos += len(data)
        return {"count": len(data), "eof": False}

    def _file_flush(self, args: dict[str, Any]) -> dict[str, Any]:
        self._handle(args)  # writes land at once here: nothing to flush
        return {}

    def _file_close(self, args: dict[str, Any]) -> dict[str, Any]:
        self._handle(args)
        del self._handles[args["handle"]]
        return {}

    def _exec(self, args: dict[str, Any]) -> dict[str, Any]:
        path = _arg(args, "path", str)
        argv = [str(a) for a in args.get("arg", [])]
        program = path.rsplit("/", 1)[-1] if path.startswith(("/bin/", "/usr/bin/")) else path
        if program == "cat":
            out, err, code = b"", b"", 0
            for name in argv:
                if name in self._files:
                    out += self._files[name]
                else:
                    err += f"cat: {name}: No such file or directory\n".encode()
                    code = 1
        elif program == "who" and argv == ["-u"]:
            idle = "." if self.idle_minutes < 1 else \
                f"{self.idle_minutes // 60:02}:{self.idle_minutes % 60:02}"
            out = "".join(f"{user:<8} tty1         2026-11-23 12:00 {idle:>5}        4242\n"
                          for user in self.users).encode()
            err, code = b"", 0
        elif program == "hostname" and not argv:
            out, err, code = f"{self._hostname()}\n".encode(), b"", 0
        elif program == "sh" and len(argv) == 2 and argv[0] == "-c":
            out, err, code = self._shell(argv[1])
        elif program == "sh" and argv[:2] == ["-c", INSTALL_SCRIPT]:
            out, err, code = self._install_machine_files(argv[3], argv[4:])
        elif program == "mkdir":
            out, err, code = b"", b"", 0  # folders are implied by the files' paths
        else:
            raise _agent_error(f"Failed to execute child process \u201c{path}\u201d "
                               "(No such file or directory)")
        self._next_id += 1
        self._procs[self._next_id] = _Process(code, out, err, bool(args.get("capture-output")))
        return {"pid": self._next_id}

    def _shell(self, script: str) -> tuple[bytes, bytes, int]:
        """Just ``echo WORDS > PATH`` (or ``>>``), enough for tests to write a guest file."""
        words = shlex.split(script)
        if len(words) >= 3 and words[0] == "echo" and words[-2] in (">", ">>"):
            path, text = words[-1], " ".join(words[1:-2]) + "\n"
            old = self._files.get(path, b"") if words[-2] == ">>" else b""
            self._files[path] = old + text.encode()
            return b"", b"", 0
        return b"", f"sh: the fake guest cannot run {script!r}\n".encode(), 127

    def _install_machine_files(self, staging: str, triples: list[str]
                               ) -> tuple[bytes, bytes, int]:
        """``INSTALL_SCRIPT``: each staged file moved to its place (modes are not kept)."""
        for i in range(0, len(triples) - 2, 3):
            name, path = triples[i], triples[i + 1]
            staged = f"{staging}/{name}"
            if staged not in self._files:
                return b"", f"chmod: cannot access '{staged}'\n".encode(), 1
            self._files[path] = self._files.pop(staged)
        return b"", b"", 0

    def _exec_status(self, args: dict[str, Any]) -> dict[str, Any]:
        pid = _arg(args, "pid", int)
        proc = self._procs.get(pid)
        if proc is None:
            raise _agent_error("Invalid parameter 'pid'")
        if not proc.polled:
            proc.polled = True
            return {"exited": False}
        del self._procs[pid]  # an exited process is reaped once reported, as qga does
        status: dict[str, Any] = {"exited": True, "exitcode": proc.exitcode}
        if proc.capture and proc.out:
            status["out-data"] = base64.b64encode(proc.out).decode()
        if proc.capture and proc.err:
            status["err-data"] = base64.b64encode(proc.err).decode()
        return status

    def _set_time(self, args: dict[str, Any]) -> dict[str, Any]:
        # Without "time" the guest copies its RTC; either way the fake just records it.
        self.time_ns = _arg(args, "time", int) if "time" in args else None
        self.clock_stale = False
        return {}


_T = TypeVar("_T")


def _arg(args: dict[str, Any], name: str, kind: type[_T]) -> _T:
    if name not in args:
        raise _agent_error(f"Parameter '{name}' is missing")
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _agent_error(f"Invalid parameter type for '{name}', expected: {kind.__name__}")
    return value


def _agent_error(message: str) -> DriverError:
    return DriverError(f"guest agent command failed: {message}")

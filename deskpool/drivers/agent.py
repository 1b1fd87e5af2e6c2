"""Typed helpers over ``HypervisorDriver.agent_command`` (the QEMU guest agent protocol).

They turn the agent's loosely typed JSON answers into Python values and check their shape, so a
malformed answer becomes a ``DriverError`` here rather than a ``KeyError`` somewhere above.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from deskpool.domain.errors import AgentUnavailable, DriverError, HostConnectionLost, InvalidInput
from deskpool.drivers.base import HypervisorDriver

_READ_CHUNK = 64 * 1024
_MAX_READ = 64 * 1024 * 1024


class GuestAgent:
    """The guest agent of one VM. Every method raises ``AgentUnavailable`` when the agent is
    silent, ``VmNotFound`` for an unknown VM and ``DriverError`` when the agent answered with
    an error."""

    def __init__(
        self,
        driver: HypervisorDriver,
        vm_id: uuid.UUID,
        *,
        command_timeout_s: int = 5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.driver = driver
        self.vm_id = vm_id
        self._timeout_s = command_timeout_s
        self._clock = clock
        self._sleep = sleep

    def _call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.driver.agent_command(self.vm_id, command, arguments, self._timeout_s)

    def _call_dict(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = self._call(command, arguments)
        if not isinstance(answer, dict):
            raise self._malformed(command, answer)
        return answer

    def _malformed(self, command: str, answer: object) -> DriverError:
        return DriverError(
            f"guest agent of VM {self.vm_id} gave a malformed answer to {command}: {answer!r:.200}"
        )

    def ping(self) -> bool:
        """Whether the agent answers now."""
        try:
            self._call("guest-ping")
        except (AgentUnavailable, HostConnectionLost):  # the guest may be fine: ask again
            return False
        return True

    def wait_until_ready(
        self,
        timeout_s: float,
        poll_s: float = 0.5,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> float:
        """Ping until the agent answers; returns the seconds waited. ``AgentUnavailable``
        after ``timeout_s`` without an answer."""
        if timeout_s < 0 or poll_s <= 0:
            raise InvalidInput("timeout_s must be >= 0 and poll_s > 0")
        clock = clock or self._clock
        sleep = sleep or self._sleep
        start = clock()
        deadline = start + timeout_s
        while True:
            if self.ping():
                return clock() - start
            now = clock()
            if now >= deadline:
                raise AgentUnavailable(
                    f"guest agent of VM {self.vm_id} did not answer within {timeout_s:g} s"
                )
            sleep(min(poll_s, deadline - now))

    def host_name(self) -> str:
        name = self._call_dict("guest-get-host-name").get("host-name")
        if not isinstance(name, str):
            raise self._malformed("guest-get-host-name", name)
        return name

    def users(self) -> list[str]:
        """Users logged in to the guest (``guest-get-users``), each named once."""
        answer = self._call("guest-get-users")
        if not isinstance(answer, list):
            raise self._malformed("guest-get-users", answer)
        names: list[str] = []
        for entry in answer:
            if not isinstance(entry, dict) or not isinstance(entry.get("user"), str):
                raise self._malformed("guest-get-users", entry)
            if entry["user"] not in names:
                names.append(entry["user"])
        return names

    def idle_seconds(self) -> int | None:
        """How long the least idle logged-in session has had no input, from ``who -u`` in
        the guest (its "IDLE" column: "." under a minute, "HH:MM", or "old" past a day);
        None when nobody is logged in."""
        code, out, err = self.exec_capture(["who", "-u"], timeout_s=10)
        if code != 0:
            raise DriverError(f"who -u in VM {self.vm_id} failed: {err.strip()[:200]}")
        idles: list[int] = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            idle = fields[4]
            if idle == ".":
                idles.append(0)
            elif idle == "old":
                idles.append(86_400)
            elif re.fullmatch(r"\d+:\d\d", idle):
                hours, minutes = idle.split(":")
                idles.append(int(hours) * 3600 + int(minutes) * 60)
        return min(idles) if idles else None

    def interfaces(self) -> dict[str, str]:
        """Network interface name -> MAC address (lowercase); interfaces without one are left
        out."""
        answer = self._call("guest-network-get-interfaces")
        if not isinstance(answer, list):
            raise self._malformed("guest-network-get-interfaces", answer)
        result: dict[str, str] = {}
        for nic in answer:
            if not isinstance(nic, dict) or not isinstance(nic.get("name"), str):
                raise self._malformed("guest-network-get-interfaces", nic)
            mac = nic.get("hardware-address")
            if isinstance(mac, str):
                result[nic["name"]] = mac.lower()
        return result

    def read_file(self, path: str, *, max_bytes: int = _MAX_READ) -> bytes:
        """The whole content of a file in the guest (``DriverError`` when missing or larger than
        ``max_bytes``)."""
        handle = self._call("guest-file-open", {"path": path, "mode": "r"})
        if not isinstance(handle, int):
            raise self._malformed("guest-file-open", handle)
        try:
            data = self._read_all(handle, path, max_bytes)
        except BaseException:
            # Close anyway, but never let a failed close hide why the read failed.
            with contextlib.suppress(DriverError):
                self._call("guest-file-close", {"handle": handle})
            raise
        self._call("guest-file-close", {"handle": handle})
        return data

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace a file in the guest with ``data``."""
        handle = self._call("guest-file-open", {"path": path, "mode": "w"})
        if not isinstance(handle, int):
            raise self._malformed("guest-file-open", handle)
        try:
            encoded = base64.b64encode(data).decode("ascii")
            self._call("guest-file-write", {"handle": handle, "buf-b64": encoded})
        finally:
            self._call("guest-file-close", {"handle": handle})

    def _read_all(self, handle: int, path: str, max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            answer = self._call_dict("guest-file-read", {"handle": handle, "count": _READ_CHUNK})
            chunk = self._b64(answer.get("buf-b64", ""), "guest-file-read")
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise DriverError(f"{path} in VM {self.vm_id} is larger than {max_bytes} bytes")
            # An empty chunk also ends the loop: an agent that never says eof cannot hang us.
            if answer.get("eof") or not chunk:
                return b"".join(chunks)

    def set_time(self, time_ns: int | None = None, *, from_hardware_clock: bool = False) -> None:
        """Set the guest's clock (needed after a memory restore, a revert or a resume): to
        ``time_ns`` (ns since the epoch), by default the host's time now. The agent then sets
        it directly; ``from_hardware_clock`` has the guest run ``hwclock`` instead, as
        ``virsh domtime --sync`` does, which takes about a second under TCG."""
        if from_hardware_clock:
            self._call("guest-set-time", None)
        else:
            self._call("guest-set-time", {"time": time.time_ns() if time_ns is None
                                          else time_ns})

    def exec_capture(
        self, argv: list[str], timeout_s: float = 30.0, poll_s: float = 0.05,
        max_poll_s: float = 0.5,
    ) -> tuple[int, str, str]:
        """Run ``argv`` in the guest and wait for it: (exit code, stdout, stderr). A process
        killed by a signal gives the negative signal number, as ``subprocess`` does.
        ``DriverError`` when it has not finished within ``timeout_s``.

        The guest is asked every ``poll_s`` at first, then less often up to ``max_poll_s``:
        each question wakes the guest's agent, and a long command (a session starting on one
        vCPU under TCG) should not share its CPU with twenty of them a second."""
        if not argv:
            raise InvalidInput("exec_capture needs a program to run")
        started = self._call_dict(
            "guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True}
        )
        pid = started.get("pid")
        if not isinstance(pid, int):
            raise self._malformed("guest-exec", started)
        deadline = self._clock() + timeout_s
        while True:
            status = self._call_dict("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if self._clock() >= deadline:
                raise DriverError(
                    f"{argv[0]} in VM {self.vm_id} did not finish within {timeout_s:g} s"
                )
            self._sleep(poll_s)
            poll_s = min(poll_s * 1.5, max(max_poll_s, poll_s))
        code = status.get("exitcode")
        if not isinstance(code, int):
            signal = status.get("signal")
            code = -signal if isinstance(signal, int) else -1
        out = self._b64(status.get("out-data", ""), "guest-exec-status")
        err = self._b64(status.get("err-data", ""), "guest-exec-status")
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _b64(self, value: object, command: str) -> bytes:
        if not isinstance(value, str):
            raise self._malformed(command, value)
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise self._malformed(command, value) from exc

"""A desktop's customization after its identity is confirmed: waiting for cloud-init to finish
(cloud-init versions) and the template version's join hook, run once per desktop.

The join hook is the administrator's script (``template publish --join-hook FILE``): the place
for ``realm join``, ``adcli`` or an nslcd/sssd set-up in real deployments. The factory runs it
through the guest agent after the guest carries its identity and (cloud-init) cloud-init is
done, before the factory snapshot and before the desktop is ready. It runs as root with a
clean environment holding the desktop's identity (``hook_environment``); its exit status 0 is
success. On success the runner leaves ``JOIN_MARKER_PATH`` on the desktop's disk naming the
desktop: a reboot, a repair or a revert to the factory snapshot (taken after the hook) keeps
that file, so the hook does not run again; only a disk older than the hook's run (a fresh
clone, an instant clone restored from the template's memory) runs it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from deskpool.domain.errors import (
    AgentUnavailable,
    DriverError,
    HostConnectionLost,
    InvalidInput,
    VmNotFound,
)
from deskpool.domain.models import Customization
from deskpool.drivers.agent import GuestAgent

JOIN_HOOK_PATH = "/var/lib/deskpool/join-hook"
JOIN_MARKER_PATH = "/var/lib/deskpool/joined"
JOIN_LOG_PATH = "/var/lib/deskpool/join-hook.log"  # the last run's output, kept for admins
JOIN_HOOK_TIMEOUT_S = 600.0
CLOUD_INIT_TIMEOUT_S = 600.0
# An argument of execve may be at most 128 KiB (MAX_ARG_STRLEN); the hook travels as one.
MAX_JOIN_HOOK_BYTES = 64 * 1024
MAX_USER_DATA_BYTES = 256 * 1024
_EXCERPT_CHARS = 600
_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs in the guest as: sh -c RUNNER deskpool-join MARKER_TEXT HOOK_TEXT. Writes the hook
# (only root may read it), runs it with stdin closed, umask 022 and its output in a log file
# (not the agent's pipe, which a daemon the hook starts would hold open until the timeout),
# prints the log's end for the broker, and only when the hook succeeded writes the marker
# (via a rename) and syncs it to disk.
_RUNNER = f"""set -u
hook={JOIN_HOOK_PATH} marker={JOIN_MARKER_PATH} log={JOIN_LOG_PATH}
mkdir -p "${{hook%/*}}" || exit 125
(umask 077 && printf '%s' "$2" >"$hook") && chmod 0700 "$hook" || exit 125
umask 022
"$hook" </dev/null >"$log" 2>&1
code=$?
tail -c 65536 "$log"
if [ "$code" -ne 0 ]; then echo "deskpool: the join hook exited with status $code"; exit "$code"; fi
printf '%s\\n' "$1" >"$marker.new" && mv -f "$marker.new" "$marker" && sync || exit 125
"""


class JoinHookFailed(DriverError):
    """The template's join hook failed on a desktop (its output's end is in the message)."""


@dataclass(frozen=True)
class JoinContext:
    """What the join hook is told about the desktop it runs on."""

    desktop_id: uuid.UUID
    desktop_name: str
    hostname: str
    mac: str
    machine_id: str
    pool: str | None
    template: str
    template_version: int
    customization: Customization

    def marker_text(self) -> str:
        return f"desktop_id={self.desktop_id}\nhostname={self.hostname}"


def check_join_hook(text: str) -> str:
    """The hook as published: a script the guest can execute (``#!`` first line), at most
    ``MAX_JOIN_HOOK_BYTES``; ``InvalidInput`` naming the problem otherwise."""
    if not text.strip():
        raise InvalidInput("the join hook is empty")
    if "\0" in text:
        raise InvalidInput("the join hook contains a NUL byte; it must be a text script")
    if not text.startswith("#!"):
        raise InvalidInput("the join hook must start with an interpreter line such as "
                           "'#!/bin/sh' (it is executed as a program in the guest)")
    if len(text.encode()) > MAX_JOIN_HOOK_BYTES:
        raise InvalidInput(f"the join hook is {len(text.encode())} bytes; at most "
                           f"{MAX_JOIN_HOOK_BYTES} are allowed (keep large payloads in the image)")
    return text


def check_user_data(text: str) -> str:
    if len(text.encode()) > MAX_USER_DATA_BYTES:
        raise InvalidInput(f"the cloud-init user data is {len(text.encode())} bytes; at most "
                           f"{MAX_USER_DATA_BYTES} are allowed")
    return text


def hook_environment(ctx: JoinContext) -> dict[str, str]:
    """The hook's whole environment: the desktop's identity, ``PATH``, ``HOME`` and ``LANG``."""
    return {
        "PATH": _GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DESKPOOL_DESKTOP_ID": str(ctx.desktop_id),
        "DESKPOOL_DESKTOP_NAME": ctx.desktop_name,
        "DESKPOOL_HOSTNAME": ctx.hostname,
        "DESKPOOL_MAC": ctx.mac,
        "DESKPOOL_MACHINE_ID": ctx.machine_id,
        "DESKPOOL_POOL": ctx.pool or "",
        "DESKPOOL_TEMPLATE": ctx.template,
        "DESKPOOL_TEMPLATE_VERSION": str(ctx.template_version),
        "DESKPOOL_IDENTITY_METHOD": ctx.customization.value,
    }


def already_joined(agent: GuestAgent, ctx: JoinContext) -> bool:
    """Whether the desktop's disk holds this desktop's join marker (``AgentUnavailable``
    propagates: a silent agent is not an answer)."""
    try:
        text = agent.read_file(JOIN_MARKER_PATH, max_bytes=4096).decode(errors="replace")
    except (AgentUnavailable, VmNotFound, HostConnectionLost):
        raise  # no answer at all, not a wrong one  # no answer at all
    except DriverError:
        return False  # the agent answered: no such file
    return f"desktop_id={ctx.desktop_id}" in text.splitlines()


def run_join_hook(agent: GuestAgent, hook: str, ctx: JoinContext, *,
                  timeout_s: float = JOIN_HOOK_TIMEOUT_S) -> tuple[float, str]:
    """Run ``hook`` in the guest; (seconds it took, its output's end). ``JoinHookFailed``
    with the output's end when it exits non-zero or does not finish in ``timeout_s``."""
    env = [f"{key}={value}" for key, value in hook_environment(ctx).items()]
    argv = ["/usr/bin/env", "-i", *env, "/bin/sh", "-c", _RUNNER, "deskpool-join",
            ctx.marker_text(), hook]
    started = time.monotonic()
    try:
        code, out, err = agent.exec_capture(argv, timeout_s=timeout_s, poll_s=0.5)
    except (AgentUnavailable, VmNotFound, HostConnectionLost):
        raise  # no answer at all, not a wrong one
    except DriverError as exc:  # it did not finish in time
        raise JoinHookFailed(f"the join hook of template {ctx.template} v"
                             f"{ctx.template_version} did not finish on {ctx.desktop_name}: "
                             f"{exc}") from exc
    output = excerpt(out + err)
    if code != 0:
        raise JoinHookFailed(f"the join hook of template {ctx.template} v{ctx.template_version} "
                             f"failed on {ctx.desktop_name} (exit {code}): "
                             f"{output or 'no output'}")
    return time.monotonic() - started, output


def wait_for_cloud_init(agent: GuestAgent, desktop_name: str, *,
                        timeout_s: float = CLOUD_INIT_TIMEOUT_S) -> None:
    """Wait until cloud-init has run every stage (the admin's runcmd included); ``DriverError``
    with cloud-init's own report when it ended in error or did not finish in time."""
    argv = ["/usr/bin/cloud-init", "status", "--wait", "--long"]
    try:
        code, out, err = agent.exec_capture(argv, timeout_s=timeout_s, poll_s=0.5)
    except (AgentUnavailable, VmNotFound, HostConnectionLost):
        raise  # no answer at all, not a wrong one
    except DriverError as exc:
        raise DriverError(f"cloud-init did not finish on {desktop_name}: {exc}") from exc
    if code != 0:
        raise DriverError(f"cloud-init failed on {desktop_name} (exit {code}): "
                          f"{excerpt(out + err) or 'no output'}")


def excerpt(text: str) -> str:
    """The end of a command's output, on one line, at most ``_EXCERPT_CHARS`` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines)
    return joined if len(joined) <= _EXCERPT_CHARS else "..." + joined[-_EXCERPT_CHARS:]


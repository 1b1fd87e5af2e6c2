"""cloud-init NoCloud seed images, for guests that customise themselves with cloud-init.

The seed is a small vfat image labelled ``cidata`` holding ``meta-data`` and ``user-data``,
made with ``mkfs.vfat`` and ``mcopy`` (no loop mounts, no root needed).

``user-data`` is deskpool's ``#cloud-config`` (hostname, ``locale: C.UTF-8``, which cloud-init
needs on a minimal Debian, and the machine-id when given). Extra user data from the admin is
added as further parts of a MIME multipart message, which cloud-init merges itself: deskpool's
part sets ``merge_how`` so a later ``#cloud-config`` adds keys and appends to lists
(``bootcmd``, ``runcmd``, ``packages``...) but cannot replace the identity keys deskpool set.
Scripts (``#!``), ``#include`` and the other cloud-init part types are passed through as their
own parts; an admin's MIME multipart is split into its parts.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import tempfile
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from deskpool.domain.errors import ImageBuildError, InvalidInput
from deskpool.domain.identity import validate_hostname

SEED_LABEL = "cidata"
META_DATA = "meta-data"
USER_DATA = "user-data"

_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Fixed so the same inputs always give the same seed bytes (apart from vfat timestamps).
_BOUNDARY = "==deskpool-user-data=="
# cloud-init's own first-line markers -> MIME type; longer prefixes first.
_PART_TYPES = (
    ("#cloud-config-archive", "cloud-config-archive"),
    ("#cloud-config", "cloud-config"),
    ("#cloud-boothook", "cloud-boothook"),
    ("#include-once", "x-include-once-url"),
    ("#include", "x-include-url"),
    ("#part-handler", "part-handler"),
    ("## template: jinja", "jinja2"),
    ("#!", "x-shellscript"),
)
# mtools refuses images whose geometry it finds odd; mkfs.vfat's is fine.
_MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def write_nocloud_seed(
    path: Path,
    *,
    instance_id: str,
    hostname: str,
    machine_id: str | None = None,
    user_data: str | None = None,
) -> Path:
    """Write a NoCloud seed image to ``path`` (replaced atomically if it exists)."""
    if not _INSTANCE_ID_RE.match(instance_id):
        raise InvalidInput(
            f"instance-id {instance_id!r} must be 1-128 characters of letters, digits and ._:-"
        )
    validate_hostname(hostname)
    if machine_id is not None and not _MACHINE_ID_RE.match(machine_id):
        raise InvalidInput(f"machine-id {machine_id!r} is not 32 lowercase hex digits")
    files = {
        META_DATA: f'instance-id: "{instance_id}"\nlocal-hostname: "{hostname}"\n',
        USER_DATA: _user_data(hostname, machine_id, user_data),
    }
    payload = sum(len(text.encode()) for text in files.values())
    size_kib = max(1440, 2 * payload // 1024 + 512)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # mkfs.vfat -C wants to create the file itself
    try:
        _run("mkfs.vfat", ["mkfs.vfat", "-n", SEED_LABEL, "-C", str(tmp), str(size_kib)])
        with tempfile.TemporaryDirectory(prefix="deskpool-seed-") as staging:
            for name, text in files.items():
                src = Path(staging) / name
                src.write_text(text)
                _run(f"mcopy {name}", ["mcopy", "-i", str(tmp), str(src), f"::/{name}"])
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_user_data(user_data: str) -> None:
    """``InvalidInput`` naming the problem when cloud-init would not use ``user_data``."""
    _admin_parts(user_data)


def read_nocloud_seed(path: Path) -> dict[str, str]:
    """The files in a seed image's root directory: name -> text (for tests and diagnostics)."""
    if not path.is_file():
        raise InvalidInput(f"seed image {path} does not exist")
    listing = _run("mdir", ["mdir", "-i", str(path), "-b", "::/"])
    files: dict[str, str] = {}
    for line in listing.splitlines():
        name = line.strip().removeprefix("::/")
        if not name or name.endswith("/") or name in (".", ".."):
            continue
        files[name] = _run(f"mtype {name}", ["mtype", "-i", str(path), f"::/{name}"])
    return files


def _user_data(hostname: str, machine_id: str | None, extra: str | None) -> str:
    lines = [
        "#cloud-config",
        "# deskpool: this desktop's identity. Later parts add keys and list items but do not",
        "# replace these (merge_how).",
        f'hostname: "{hostname}"',
        "preserve_hostname: false",
        "manage_etc_hosts: localhost",
        "locale: C.UTF-8",
    ]
    if machine_id is not None:
        # bootcmd runs early on every boot; an empty /etc/machine-id has systemd's transient
        # id bind-mounted over it, which must go before the real file can be written.
        lines += [
            "bootcmd:",
            "  - [sh, -c, 'if mountpoint -q /etc/machine-id; then umount /etc/machine-id; fi;"
            f" echo {machine_id} > /etc/machine-id']",
        ]
    lines += [
        "merge_how:",
        "  - name: list",
        "    settings: [append]",
        "  - name: dict",
        "    settings: [no_replace, recurse_list]",
    ]
    ours = "\n".join(lines) + "\n"
    if extra is None or not extra.strip():
        return ours

    message = MIMEMultipart(boundary=_BOUNDARY)
    message.attach(_part(ours, "cloud-config", "deskpool.cfg"))
    for index, (text, subtype) in enumerate(_admin_parts(extra), start=1):
        message.attach(_part(text, subtype, f"admin-{index}"))
    return message.as_string()


def _admin_parts(extra: str) -> list[tuple[str, str]]:
    """(text, MIME subtype) for each part of the admin's user data."""
    head = extra.lstrip()[:200].lower()
    if head.startswith(("content-type:", "mime-version:")):
        parts = []
        for part in email.message_from_string(extra).walk():
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "utf-8"
            parts.append((payload.decode(charset, errors="replace"), part.get_content_subtype()))
        if not parts:
            raise InvalidInput("the admin's MIME user data has no parts")
        return parts
    for prefix, subtype in _PART_TYPES:
        if extra.startswith(prefix):
            return [(extra, subtype)]
    raise InvalidInput(
        "user data must start with #cloud-config, #!, #include or another cloud-init marker "
        "(cloud-init ignores anything else)"
    )


def _part(text: str, subtype: str, filename: str) -> Message:
    # 7bit text when possible, so the seed stays readable with mtype.
    part = MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _run(step: str, cmd: list[str]) -> str:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", env=_MTOOLS_ENV, timeout=60
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"writing the cloud-init seed needs {cmd[0]} installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{step} on the cloud-init seed did not finish in 60 s") from exc
    if proc.returncode != 0:
        detail = " | ".join(proc.stderr.strip().splitlines()[-4:]) or "no output"
        raise ImageBuildError(f"{step} on the cloud-init seed failed: {detail}")
    return proc.stdout

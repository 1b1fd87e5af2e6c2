"""Folder redirection: which folders of a user's home a pool puts on their file share."""

from __future__ import annotations

import re
from collections.abc import Iterable

from deskpool.domain.errors import InvalidInput

MAX_FOLDERS = 16
# One folder directly in the home, by the name the user sees ("Documents", "My Music"): no
# path separators, nothing hidden, no control characters; the guest's hook binds the share's
# folder of the same name over it.
FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,63}$")
DEFAULT_FOLDERS = ("Documents", "Desktop", "Downloads")


def redirect_folders(given: str | Iterable[str]) -> tuple[str, ...]:
    """The folders named (a comma-separated text, or a sequence), checked, duplicates once;
    ``InvalidInput`` naming the first bad one. Empty: no redirection."""
    names = given.split(",") if isinstance(given, str) else list(given)
    found: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if not FOLDER.match(name) or name.endswith((" ", ".")) or ".." in name:
            raise InvalidInput(f"redirected folder {name!r} must be one folder in the home: "
                               "1-64 letters, digits, spaces, '.', '_', '+' or '-', starting "
                               "with a letter or digit (e.g. Documents)")
        if name not in found:
            found.append(name)
    if len(found) > MAX_FOLDERS:
        raise InvalidInput(f"at most {MAX_FOLDERS} redirected folders, not {len(found)}")
    return tuple(found)

"""The user layer's manifest: which base version each changed path was made against.

Stored as JSON on the layer's own disk (``LAYER/.deskpool/manifest.json``). Per path: the base
version the user's change was made against and the fingerprint of the base's entry at that time
(``null``: the base had nothing there). The rebase uses that fingerprint as the ancestor of its
three-way comparison, so a file carried over several versions is still judged against the base
the user actually saw. A checksum over the content catches a truncated or edited manifest that
still parses. Pure: turning text into a ``Manifest`` and back; the file I/O is elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deskpool.domain.layers import ManifestError

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ManifestEntry:
    base_version: str
    base: str | None  # fingerprint of the base's entry when the change was made


@dataclass(frozen=True)
class Manifest:
    base_version: str  # the template version the layer currently sits on
    files: Mapping[str, ManifestEntry] = field(default_factory=dict)
    generation: int = 1  # how many rebases made this layer (1: a fresh one)
    rebased_from: str | None = None  # identity of the layer this one was rebased from

    def checksum(self) -> str:
        return hashlib.sha256(_canonical(self._body()).encode()).hexdigest()

    def _body(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "base_version": self.base_version,
            "generation": self.generation,
            "rebased_from": self.rebased_from,
            "files": {p: {"base_version": e.base_version, "base": e.base}
                      for p, e in sorted(self.files.items())},
        }

    def dumps(self) -> str:
        body = self._body()
        body["checksum"] = self.checksum()
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _valid_path(path: object) -> bool:
    return (isinstance(path, str) and path.startswith("/") and path != "/"
            and posixpath.normpath(path) == path and "\0" not in path)


def _valid_fingerprint(value: object) -> bool:
    return value is None or (isinstance(value, str) and len(value) == 64
                             and all(c in "0123456789abcdef" for c in value))


def parse_manifest(text: str, *, source: str = "the manifest") -> Manifest:
    """Parse and validate; every problem is a ``ManifestError`` naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{source} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{source} is not a JSON object")
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{source} has format {data.get('format')!r}, "
                            f"this deskpool reads format {MANIFEST_FORMAT}")
    version, generation = data.get("base_version"), data.get("generation")
    if not isinstance(version, str) or not version:
        raise ManifestError(f"{source} names no base version")
    if not isinstance(generation, int) or generation < 1:
        raise ManifestError(f"{source} has a bad generation {generation!r}")
    rebased_from = data.get("rebased_from")
    if rebased_from is not None and not isinstance(rebased_from, str):
        raise ManifestError(f"{source} has a bad rebased_from {rebased_from!r}")
    files_data = data.get("files")
    if not isinstance(files_data, dict):
        raise ManifestError(f"{source} has no file table")
    files: dict[str, ManifestEntry] = {}
    for path, item in files_data.items():
        if not _valid_path(path):
            raise ManifestError(f"{source} lists a bad path {path!r}")
        if (not isinstance(item, dict) or not isinstance(item.get("base_version"), str)
                or not _valid_fingerprint(item.get("base"))):
            raise ManifestError(f"{source} has a malformed entry for {path}")
        files[path] = ManifestEntry(item["base_version"], item["base"])
    manifest = Manifest(version, files, generation, rebased_from)
    if data.get("checksum") != manifest.checksum():
        raise ManifestError(f"{source} fails its checksum: it was truncated or edited")
    return manifest

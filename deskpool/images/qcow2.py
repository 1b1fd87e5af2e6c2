"""Facts about a disk image file, from ``qemu-img info`` (read-only; never changes the image)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import InvalidInput, NotFound


@dataclass(frozen=True)
class ImageFileInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None


def image_file_info(path: Path) -> ImageFileInfo:
    if not path.is_file():
        raise NotFound(f"image file {path} does not exist")
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise InvalidInput(f"{path} is not a disk image qemu-img can read: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    return ImageFileInfo(
        format=str(info["format"]),
        virtual_size=int(info["virtual-size"]),
        actual_size=int(info.get("actual-size", 0)),
        backing_file=info.get("backing-filename"),
    )

"""NoCloud seed images: written with mkfs.vfat + mcopy, read back with mtools."""

from __future__ import annotations

import email
import shutil
import subprocess
from pathlib import Path

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.images.cloudinit import read_nocloud_seed, write_nocloud_seed

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.vfat", "mcopy", "mtype", "mdir", "mlabel")),
    reason="needs dosfstools and mtools",
)

MACHINE_ID = "0123456789abcdef0123456789abcdef"


def _parts(user_data: str) -> list[tuple[str, str]]:
    """(content type, text) of each part of a multipart user-data."""
    message = email.message_from_string(user_data)
    assert message.is_multipart()
    out = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append((part.get_content_type(), payload.decode()))
    return out


def test_round_trip_has_label_identity_and_locale(tmp_path: Path) -> None:
    seed = write_nocloud_seed(tmp_path / "seed.img", instance_id="desk-1", hostname="desk-01")
    label = subprocess.run(
        ["mlabel", "-i", str(seed), "-s", "::"], capture_output=True, text=True, check=True
    ).stdout
    assert label.split()[-1] == "cidata"

    files = read_nocloud_seed(seed)
    assert set(files) == {"meta-data", "user-data"}
    assert 'instance-id: "desk-1"' in files["meta-data"].splitlines()
    assert 'local-hostname: "desk-01"' in files["meta-data"].splitlines()
    user_data = files["user-data"].splitlines()
    assert user_data[0] == "#cloud-config"
    assert 'hostname: "desk-01"' in user_data
    assert "locale: C.UTF-8" in user_data
    assert "machine-id" not in files["user-data"]


def test_machine_id_is_written_by_bootcmd(tmp_path: Path) -> None:
    seed = write_nocloud_seed(
        tmp_path / "seed.img", instance_id="i-2", hostname="desk-02", machine_id=MACHINE_ID
    )
    user_data = read_nocloud_seed(seed)["user-data"]
    bootcmd = user_data.split("bootcmd:", 1)[1].splitlines()[1]
    assert f"echo {MACHINE_ID} > /etc/machine-id" in bootcmd
    assert "umount /etc/machine-id" in bootcmd


def test_admin_cloud_config_becomes_a_second_part(tmp_path: Path) -> None:
    extra = "#cloud-config\nruncmd:\n  - [touch, /tmp/admin-was-here]\n"
    seed = write_nocloud_seed(
        tmp_path / "seed.img", instance_id="i-3", hostname="desk-03", user_data=extra
    )
    parts = _parts(read_nocloud_seed(seed)["user-data"])
    assert [ctype for ctype, _ in parts] == ["text/cloud-config", "text/cloud-config"]
    ours, theirs = parts[0][1], parts[1][1]
    assert 'hostname: "desk-03"' in ours and "merge_how:" in ours
    assert theirs == extra


def test_admin_script_and_mime_parts_keep_their_types(tmp_path: Path) -> None:
    script = "#!/bin/sh\necho hello > /tmp/hello\n"
    seed = write_nocloud_seed(
        tmp_path / "a.img", instance_id="i-4", hostname="desk-04", user_data=script
    )
    parts = _parts(read_nocloud_seed(seed)["user-data"])
    assert parts[1] == ("text/x-shellscript", script)

    # An admin's own multipart is split into its parts, not nested.
    mime = read_nocloud_seed(seed)["user-data"]
    seed2 = write_nocloud_seed(
        tmp_path / "b.img", instance_id="i-5", hostname="desk-05", user_data=mime
    )
    types = [ctype for ctype, _ in _parts(read_nocloud_seed(seed2)["user-data"])]
    assert types == ["text/cloud-config", "text/cloud-config", "text/x-shellscript"]


def test_rewriting_a_seed_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "seed.img"
    write_nocloud_seed(path, instance_id="old", hostname="old-name")
    write_nocloud_seed(path, instance_id="new", hostname="new-name")
    assert 'local-hostname: "new-name"' in read_nocloud_seed(path)["meta-data"]
    assert [p.name for p in tmp_path.iterdir()] == ["seed.img"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hostname": "Bad_Host"},
        {"hostname": "-leading-dash"},
        {"instance_id": "has space"},
        {"instance_id": 'quote"d'},
        {"machine_id": "NOT-HEX"},
        {"machine_id": MACHINE_ID.upper()},
        {"user_data": "plain text cloud-init would ignore"},
    ],
)
def test_bad_input_is_rejected_before_anything_is_written(
    tmp_path: Path, kwargs: dict[str, str]
) -> None:
    args = {"instance_id": "i-1", "hostname": "desk-01", **kwargs}
    with pytest.raises(InvalidInput):
        write_nocloud_seed(tmp_path / "seed.img", **args)
    assert list(tmp_path.iterdir()) == []


def test_reading_a_missing_seed_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        read_nocloud_seed(tmp_path / "nope.img")

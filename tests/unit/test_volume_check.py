"""The libvirt driver's check of a template volume already on a host: hashed again only when
libvirt's modification time or sizes of it changed since it was last hashed or written, and
a mismatch refused without touching the volume."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from deskpool.domain.errors import ChecksumMismatch
from deskpool.drivers.libvirt import volume_check
from deskpool.drivers.libvirt.volume_check import VerifiedVolumes, volume_stamp

GOOD, BAD = "a" * 64, "b" * 64


class Volume:
    """What the check reads of a ``virStorageVol``: its XML (timestamps) and its sizes."""

    def __init__(self) -> None:
        self.mtime, self.size, self.content = "1733490000.100000000", 1 << 20, GOOD

    def XMLDesc(self, _flags: int) -> str:
        return (f"<volume><target><timestamps><mtime>{self.mtime}</mtime></timestamps>"
                "</target></volume>")

    def info(self) -> tuple[int, int, int]:
        return 0, self.size, self.size


@pytest.fixture()
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each volume hashed, in order (the hash is the volume's ``content``)."""
    calls: list[str] = []

    def fake_hash(_conn: Any, vol: Volume) -> str:
        calls.append(vol.mtime)
        return vol.content

    monkeypatch.setattr(volume_check, "hash_volume", fake_hash)
    return calls


def test_an_unchanged_volume_is_not_hashed_again(hashed: list[str]) -> None:
    vol, known = Volume(), VerifiedVolumes()
    known.remember("tv.qcow2", volume_stamp(vol), GOOD)  # as after its import
    for _ in range(3):
        known.verify(None, "tv.qcow2", vol, GOOD, "qemu:///system")
    assert hashed == []


def test_a_volume_unknown_to_this_process_is_hashed_once(hashed: list[str]) -> None:
    vol, known = Volume(), VerifiedVolumes()
    for _ in range(3):
        known.verify(None, "tv.qcow2", vol, GOOD, "h")
    assert hashed == [vol.mtime]


def test_changed_bytes_are_refused_every_time_and_the_volume_left_alone(
    hashed: list[str]
) -> None:
    vol, known = Volume(), VerifiedVolumes()
    known.remember("tv.qcow2", volume_stamp(vol), GOOD)
    vol.mtime, vol.content = "1733490099.000000001", BAD  # written in place: mtime moves
    for _ in range(2):
        with pytest.raises(ChecksumMismatch, match=f"volume tv.qcow2 on h is corrupt: its "
                                                   f"checksum is {BAD}, expected {GOOD}"):
            known.verify(None, "tv.qcow2", vol, GOOD, "h")
    assert len(hashed) == 2  # a bad volume is never remembered as good
    vol.mtime, vol.content = "1733490200.000000000", GOOD  # restored
    known.verify(None, "tv.qcow2", vol, GOOD, "h")
    known.verify(None, "tv.qcow2", vol, GOOD, "h")
    assert len(hashed) == 3


def test_a_size_change_alone_is_enough_to_hash_again(hashed: list[str]) -> None:
    vol, known = Volume(), VerifiedVolumes()
    known.remember("tv.qcow2", volume_stamp(vol), GOOD)
    vol.size += 4096
    known.verify(None, "tv.qcow2", vol, GOOD, "h")
    assert len(hashed) == 1


class Gone(Volume):
    """A volume whose file was removed behind libvirt's back: libvirt no longer knows it."""

    def XMLDesc(self, _flags: int) -> str:
        raise VolumeMissing()


class VolumeMissing(libvirt.libvirtError):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__("Storage volume not found: no storage vol with matching path")

    def get_error_code(self) -> int:
        return int(libvirt.VIR_ERR_NO_STORAGE_VOL)


def test_a_volume_removed_by_hand_is_reported_gone_not_corrupt(hashed: list[str]) -> None:
    known = VerifiedVolumes()
    known.remember("tv.qcow2", volume_stamp(Volume()), GOOD)
    assert known.verify(None, "tv.qcow2", Gone(), GOOD, "h") is False
    assert hashed == []

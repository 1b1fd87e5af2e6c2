"""Save image header parsing and cloning, on synthetic files laid out as libvirt 9.0 writes them."""

from __future__ import annotations

import os
import struct
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deskpool.drivers.libvirt import save_image
from deskpool.drivers.libvirt.save_image import (
    HEADER_SIZE,
    SaveImageError,
    read_save_image,
    retarget_domain_xml,
    write_save_image_clone,
)

OLD_UUID = "a694557b-e1bb-4c6e-b160-d98e4f3e95fa"
DOMAIN_XML = f"""<domain type='qemu'>
  <name>tmpl</name>
  <uuid>{OLD_UUID}</uuid>
  <metadata>
    <deskpool:vm xmlns:deskpool="https://deskpool.dev/xmlns/vm/1">
      <deskpool:desktop-name>tmpl</deskpool:desktop-name>
    </deskpool:vm>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <sysinfo type='smbios'>
    <system><entry name='uuid'>{OLD_UUID}</entry><entry name='serial'>s1</entry></system>
  </sysinfo>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/pool/template.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/pool/seed.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>
"""
COOKIE_XML = "<cookie>\n  <slirpHelper/>\n</cookie>\n"
STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 64 + b"tail"


def build(
    path: Path,
    *,
    magic: bytes = b"LibvirtQemudSave",
    version: int = 2,
    compressed: int = 0,
    domain_xml: str = DOMAIN_XML,
    cookie_xml: str | None = COOKIE_XML,
    padding: int = 64 * 1024,
    data_len: int | None = None,
    stream: bytes = STREAM,
) -> Path:
    """A save image as libvirt writes one: header, XML, NUL, cookie, NUL, zeros, stream."""
    xml = domain_xml.encode() + b"\0"
    cookie = b"" if cookie_xml is None else cookie_xml.encode() + b"\0"
    area = xml + cookie + bytes(padding)
    length = len(area) if data_len is None else data_len
    cookie_offset = len(xml) if cookie_xml is not None else 0
    header = struct.pack("=16s5I14I", magic, version, length, 1, compressed, cookie_offset,
                         *([0] * 14))
    path.write_bytes(header + area + stream)
    return path


def test_header_is_92_bytes_like_libvirts() -> None:
    assert HEADER_SIZE == 92


def test_round_trip_read(tmp_path: Path) -> None:
    image = read_save_image(build(tmp_path / "t.save"))
    xml_len = len(DOMAIN_XML.encode()) + 1
    assert image.version == 2
    assert image.was_running is True
    assert image.compressed == 0
    assert image.cookie_offset == xml_len
    assert image.data_len == xml_len + len(COOKIE_XML) + 1 + 64 * 1024
    assert image.domain_xml == DOMAIN_XML
    assert image.cookie_xml == COOKIE_XML
    assert image.stream_offset == HEADER_SIZE + image.data_len
    assert (tmp_path / "t.save").read_bytes()[image.stream_offset:] == STREAM


def test_read_without_cookie(tmp_path: Path) -> None:
    image = read_save_image(build(tmp_path / "t.save", cookie_xml=None))
    assert (image.cookie_offset, image.cookie_xml, image.domain_xml) == (0, None, DOMAIN_XML)


def test_rewrite_that_fits_keeps_data_len_and_stream(tmp_path: Path) -> None:
    source = build(tmp_path / "t.save")
    before = read_save_image(source)
    new_xml = DOMAIN_XML.replace("<name>tmpl</name>", "<name>clone-with-a-longer-name</name>")
    write_save_image_clone(source, tmp_path / "c.save", new_xml)
    after = read_save_image(tmp_path / "c.save")
    assert after.domain_xml == new_xml
    assert after.cookie_xml == COOKIE_XML
    assert after.cookie_offset == len(new_xml.encode()) + 1
    assert (after.data_len, after.stream_offset) == (before.data_len, before.stream_offset)
    assert (after.version, after.was_running, after.compressed) == (2, True, 0)
    data = (tmp_path / "c.save").read_bytes()
    assert data[after.stream_offset:] == STREAM
    # the rest of the area is zero padding, no left-over of the old, longer or shorter XML
    used = after.cookie_offset + len(COOKIE_XML) + 1
    assert data[HEADER_SIZE + used:after.stream_offset] == bytes(after.data_len - used)
    assert source.read_bytes()[before.stream_offset:] == STREAM  # the source is untouched
    assert (tmp_path / "c.save").stat().st_mode & 0o777 == 0o600


def test_rewrite_that_does_not_fit_grows_data_len_and_keeps_stream(tmp_path: Path) -> None:
    source = build(tmp_path / "t.save", padding=16)
    before = read_save_image(source)
    new_xml = DOMAIN_XML.replace("</devices>", "<!--" + "x" * 5000 + "--></devices>")
    write_save_image_clone(source, tmp_path / "c.save", new_xml)
    after = read_save_image(tmp_path / "c.save")
    needed = len(new_xml.encode()) + 1 + len(COOKIE_XML) + 1
    assert after.data_len == needed + 64 * 1024 > before.data_len
    assert after.stream_offset == HEADER_SIZE + after.data_len
    assert (after.domain_xml, after.cookie_xml) == (new_xml, COOKIE_XML)
    data = (tmp_path / "c.save").read_bytes()
    assert data[after.stream_offset:] == STREAM
    assert len(data) == after.stream_offset + len(STREAM)


def test_durable_rewrite(tmp_path: Path) -> None:
    write_save_image_clone(build(tmp_path / "t.save"), tmp_path / "c.save", DOMAIN_XML,
                           durable=True)
    assert read_save_image(tmp_path / "c.save").domain_xml == DOMAIN_XML


def test_rewrite_without_cookie_keeps_no_cookie(tmp_path: Path) -> None:
    source = build(tmp_path / "t.save", cookie_xml=None)
    write_save_image_clone(source, tmp_path / "c.save", DOMAIN_XML)
    after = read_save_image(tmp_path / "c.save")
    assert (after.cookie_offset, after.cookie_xml) == (0, None)


def test_rewrite_replaces_an_existing_target(tmp_path: Path) -> None:
    source = build(tmp_path / "t.save")
    (tmp_path / "c.save").write_bytes(b"old")
    write_save_image_clone(source, tmp_path / "c.save", DOMAIN_XML)
    assert read_save_image(tmp_path / "c.save").domain_xml == DOMAIN_XML
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.save", "t.save"]


@pytest.mark.parametrize(
    ("kwargs", "truncate", "problem"),
    [
        ({"magic": b"NotASaveImage!!!"}, None, "bad magic"),
        ({"magic": b"LibvirtQemudPart"}, None, "incomplete"),
        ({}, 50, "truncated"),
        ({"version": 3}, None, "unknown version 3"),
        ({"version": 2 << 24}, None, "other byte order"),
        ({"compressed": 1}, None, "compressed"),
        ({"data_len": 10_000_000}, None, "runs past the end"),
        ({"data_len": 0}, None, "data_len 0"),
        ({"padding": 0, "cookie_xml": None, "data_len": 20}, None, "no terminating NUL"),
        ({"stream": b"garbage-not-a-stream"}, None, "no QEMU migration stream"),
    ],
)
def test_refusals_name_the_file_and_the_problem(
    tmp_path: Path, kwargs: dict[str, object], truncate: int | None, problem: str
) -> None:
    path = build(tmp_path / "bad.save", **kwargs)  # type: ignore[arg-type]
    if truncate is not None:
        path.write_bytes(path.read_bytes()[:truncate])
    with pytest.raises(SaveImageError, match=problem) as info:
        read_save_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(SaveImageError, match=problem):
        write_save_image_clone(path, tmp_path / "c.save", DOMAIN_XML)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.save"]


def test_cookie_without_nul_is_refused(tmp_path: Path) -> None:
    xml = DOMAIN_XML.encode() + b"\0"
    area = xml + b"<cookie/>"
    header = struct.pack("=16s5I14I", b"LibvirtQemudSave", 2, len(area), 1, 0, len(xml),
                         *([0] * 14))
    path = tmp_path / "bad.save"
    path.write_bytes(header + area + STREAM)
    with pytest.raises(SaveImageError, match="cookie XML has no terminating NUL"):
        read_save_image(path)


def test_failed_write_leaves_no_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = build(tmp_path / "t.save", padding=16)

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_image, "_copy_range", broken)
    with pytest.raises(SaveImageError, match=r"c\.save.*No space left"):
        write_save_image_clone(source, tmp_path / "c.save", DOMAIN_XML + "<!--grow-->" * 9000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.save"]


@pytest.mark.parametrize("padding", [16, 64 * 1024])
def test_failure_after_copying_leaves_no_target_in_either_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, padding: int
) -> None:
    source = build(tmp_path / "t.save", padding=padding)
    (tmp_path / "c.save").write_bytes(b"previous clone")

    def broken(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fchmod", broken)
    with pytest.raises(SaveImageError, match="Input/output error"):
        write_save_image_clone(source, tmp_path / "c.save", DOMAIN_XML + "<!-- longer -->" * 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.save", "t.save"]
    assert (tmp_path / "c.save").read_bytes() == b"previous clone"  # replaced only on success


def test_malformed_new_xml_is_refused_before_writing(tmp_path: Path) -> None:
    source = build(tmp_path / "t.save")
    for bad in ("<domain>", "<domain/>\0"):
        with pytest.raises(SaveImageError, match=r"c\.save"):
            write_save_image_clone(source, tmp_path / "c.save", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.save"]


def _disk(root: ET.Element, dev: str) -> ET.Element:
    (disk,) = [d for d in root.iterfind("devices/disk") if d.find(f"target[@dev='{dev}']")
               is not None]
    return disk


def _canonical(element: ET.Element) -> list[tuple[str, dict[str, str], str]]:
    return [(e.tag, dict(e.attrib), (e.text or "").strip()) for e in element.iter()]


def test_retarget_changes_only_name_uuid_and_disk_source() -> None:
    new_uuid = uuid.uuid4()
    out = retarget_domain_xml(DOMAIN_XML, name="clone-01", uuid=new_uuid,
                              disk_path="/pool/clone-01.qcow2")
    root = ET.fromstring(out)
    assert root.findtext("name") == "clone-01"
    assert root.findtext("uuid") == str(new_uuid)
    disk = _disk(root, "vda")
    source = disk.find("source")
    assert source is not None and source.get("file") == "/pool/clone-01.qcow2"
    assert disk.find("backingStore") is None  # libvirt probes the overlay's own chain
    assert root.findtext("sysinfo/system/entry[@name='uuid']") == str(new_uuid)
    # everything else as it was: the other disk, the MAC, metadata (same namespace), serial
    expected = ET.fromstring(DOMAIN_XML)
    for el in expected.iter():
        if el.tag in ("name", "uuid") or el.get("name") == "uuid":
            el.text = {"name": "clone-01"}.get(el.tag, str(new_uuid))
        if el.tag == "source" and el.get("file") == "/pool/template.qcow2":
            el.set("file", "/pool/clone-01.qcow2")
    vda = _disk(expected, "vda")
    for backing in vda.findall("backingStore"):
        vda.remove(backing)
    assert _canonical(root) == _canonical(expected)
    mac = root.find("devices/interface/mac")
    assert mac is not None and mac.get("address") == "52:54:00:12:34:56"


def test_retarget_other_disk_target_and_refusals() -> None:
    out = retarget_domain_xml(DOMAIN_XML, name="c", uuid=uuid.uuid4(), disk_path="/x.iso",
                              disk_target="sda")
    source = _disk(ET.fromstring(out), "sda").find("source")
    assert source is not None and source.get("file") == "/x.iso"
    with pytest.raises(SaveImageError, match="0 disks with target 'vdb'"):
        retarget_domain_xml(DOMAIN_XML, name="c", uuid=uuid.uuid4(), disk_path="/x",
                            disk_target="vdb")
    block = DOMAIN_XML.replace("<disk type='file' device='disk'>", "<disk type='block'>")
    with pytest.raises(SaveImageError, match="not a file disk"):
        retarget_domain_xml(block, name="c", uuid=uuid.uuid4(), disk_path="/x")
    with pytest.raises(SaveImageError, match="not well-formed"):
        retarget_domain_xml("<domain>", name="c", uuid=uuid.uuid4(), disk_path="/x")

"""Instant clones on qemu:///system: one ``virDomainSave`` of a running template, two copies of
the save file with retargeted embedded XML (one rewritten in place, one whose XML outgrows the
data area), both restored and running side by side.

The guest has no OS (an empty qcow2: SeaBIOS sits at "no bootable device"), which is enough to
exercise the save image format and libvirt's restore path. ``conn.restore(path)`` needs no flags:
a name/UUID libvirt does not know yet becomes a new *transient* domain (gone once destroyed).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from deskpool.drivers.libvirt.save_image import (
    read_save_image,
    retarget_domain_xml,
    write_save_image_clone,
)
from tests.conftest import qemu_system_unreachable_reason, skip_or_fail_without_real_vms

pytestmark = pytest.mark.realvm


def _template_xml(name: str, disk: Path) -> str:
    domain = ET.Element("domain", type="qemu")  # TCG: KVM is not usable on these machines
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "64"
    ET.SubElement(domain, "vcpu").text = "1"
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk_el, "source", file=str(disk))
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    return ET.tostring(domain, encoding="unicode")


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _backing_files(domain_xml: str) -> list[str]:
    vda = ET.fromstring(domain_xml).find("devices/disk")
    assert vda is not None
    return [s.get("file", "") for s in vda.iterfind(".//backingStore/source")]


def _remove_domain(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
        persistent = dom.isPersistent()
        if dom.isActive():
            dom.destroy()  # a transient domain is gone after this
        if persistent:
            dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def test_two_instant_clones_from_one_save_run_side_by_side() -> None:
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    work = Path(tempfile.mkdtemp(prefix="deskpool-saveimg-"))
    work.chmod(0o755)  # QEMU may run as an unprivileged user elsewhere
    tag = uuid.uuid4().hex[:8]
    names = [f"deskpool-sv-{tag}-tmpl", f"deskpool-sv-{tag}-a", f"deskpool-sv-{tag}-b"]
    conn = libvirt.open("qemu:///system")
    try:
        base = work / "base.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
        template = conn.createXML(_template_xml(names[0], base), 0)
        template_uuid = template.UUIDString()
        time.sleep(1)  # let SeaBIOS run a little, so there is some state to save
        saved = work / "template.save"
        started = time.perf_counter()
        template.save(str(saved))
        print(f"\nsave: {time.perf_counter() - started:.3f} s, {saved.stat().st_size} bytes")

        started = time.perf_counter()
        image = read_save_image(saved)
        read_s = time.perf_counter() - started
        assert image.version == 2
        assert saved.read_bytes()[:16] == b"LibvirtQemudSave"
        assert ET.fromstring(image.domain_xml).findtext("name") == names[0]
        assert ET.fromstring(image.domain_xml).findtext("uuid") == template_uuid
        print(f"read_save_image: {read_s * 1000:.2f} ms; header: version {image.version}, "
              f"data_len {image.data_len}, cookie at {image.cookie_offset}, "
              f"stream at {image.stream_offset}")

        clones: dict[str, str] = {}
        for name in names[1:]:
            overlay = work / f"{name}.qcow2"
            _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                      str(overlay))
            clone_uuid = str(uuid.uuid4())
            target = work / f"{name}.save"
            t0 = time.perf_counter()
            source = read_save_image(saved)
            xml = retarget_domain_xml(source.domain_xml, name=name, uuid=uuid.UUID(clone_uuid),
                                      disk_path=str(overlay))
            if name == names[2]:  # the second clone's XML outgrows the 64 KiB of room
                description = f"<description>{'x' * 70_000}</description>"
                xml = xml.replace("</domain>", f"{description}</domain>")
            write_save_image_clone(saved, target, xml)
            t1 = time.perf_counter()
            conn.restore(str(target))
            t2 = time.perf_counter()
            grown = read_save_image(target).data_len > source.data_len
            assert grown == (name == names[2])
            how = "data_len grown" if grown else "XML rewritten in place"
            print(f"{name} ({how}): read+clone {t1 - t0:.4f} s, restore {t2 - t1:.3f} s, "
                  f"total {t2 - t0:.3f} s")
            clones[name] = clone_uuid

        for name, clone_uuid in clones.items():
            dom = conn.lookupByName(name)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert dom.UUIDString() == clone_uuid != template_uuid
            live = dom.XMLDesc(0)
            source_el = ET.fromstring(live).find("devices/disk/source")
            assert source_el is not None and source_el.get("file") == str(work / f"{name}.qcow2")
            assert _backing_files(live) == [str(base)]  # the overlay's chain, not a cut one
        assert all(conn.lookupByName(n).isActive() for n in clones)  # both at the same time
    finally:
        try:
            for name in names:
                _remove_domain(conn, name)
        finally:
            conn.close()
            shutil.rmtree(work, ignore_errors=True)

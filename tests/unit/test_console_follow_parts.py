"""The pure parts of native consoles following a live move: the address a CONNECT names,
the .rdp file asking its client to come back by itself, and the definition a moved VM gets
(its SPICE password valid there for the move, nothing else changed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from deskpool.api.spice_proxy import requested_of
from deskpool.broker.console import rdp_file_text
from deskpool.drivers.libvirt.migration import target_definition

DOMAIN = """<domain type='qemu'><name>d</name><devices>
<disk type='file'><source file='/a/root.qcow2'/><target dev='vda'/></disk>
<graphics type='vnc' port='5901' passwd='v' passwdValidTo='2026-01-01T00:00:00'/>
<graphics type='spice' port='5902' passwd='s' passwdValidTo='2026-01-01T00:00:00'/>
</devices></domain>"""


@pytest.mark.parametrize(("head", "expected"), [
    (b"CONNECT 127.0.0.1:16101 HTTP/1.0\r\nHost: x", ("127.0.0.1", 16101)),
    (b"CONNECT [::1]:5900 HTTP/1.1", ("::1", 5900)),
    (b"CONNECT mv-01:5900 HTTP/1.0", ("mv-01", 5900)),
    (b"CONNECT mv-01 HTTP/1.0", None),
    (b"CONNECT :5900 HTTP/1.0", None),
    (b"CONNECT host:99999 HTTP/1.0", None),
    (b"CONNECT host:0 HTTP/1.0", None),
    (b"CONNECT", None),
])
def test_the_address_a_connect_names(head: bytes, expected: tuple[str, int] | None) -> None:
    assert requested_of(head) == expected


def test_the_rdp_file_asks_its_client_to_reconnect_by_itself() -> None:
    lines = rdp_file_text(host="broker", port=3390, account="sam", token="T").split("\r\n")
    assert "autoreconnection enabled:i:1" in lines
    assert "autoreconnect max retries:i:60" in lines


def test_a_moved_vm_keeps_its_spice_password_valid_for_the_move_only() -> None:
    moved = ET.fromstring(target_definition(DOMAIN, {"/a/root.qcow2": "/b/root.qcow2"},
                                            "2026-12-07T15:00:00"))
    spice = moved.find("devices/graphics[@type='spice']")
    vnc = moved.find("devices/graphics[@type='vnc']")
    assert spice is not None and vnc is not None
    assert (spice.get("passwd"), spice.get("passwdValidTo")) == ("s", "2026-12-07T15:00:00")
    assert vnc.get("passwdValidTo") == "2026-01-01T00:00:00"  # the browser gets a new one
    source = moved.find("devices/disk/source")
    assert source is not None and source.get("file") == "/b/root.qcow2"


def test_a_spice_display_without_an_expiry_gets_none() -> None:
    plain = DOMAIN.replace(" passwdValidTo='2026-01-01T00:00:00'/>\n</devices>", "/>\n</devices>")
    moved = ET.fromstring(target_definition(plain, {}, "2026-12-07T15:00:00"))
    spice = moved.find("devices/graphics[@type='spice']")
    assert spice is not None and spice.get("passwdValidTo") is None

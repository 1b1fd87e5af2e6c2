"""The RDP way in, piece by piece: the proxy's reading and rewriting of the client's first
packet, the ``.rdp`` file, and the libvirt driver's reading of QEMU's forwards."""

from __future__ import annotations

import socket
import struct

import pytest

from deskpool.api.rdp_proxy import (
    FIRST_PACKET_LIMIT,
    BadRequest,
    ConnectionRequest,
    connection_request,
    parse_connection_request,
    read_first_packet,
)
from deskpool.broker.console import rdp_file_text
from deskpool.drivers.libvirt.rdp_forward import forwarded_port, user_netdev

# What xfreerdp 2.11 sent for `loadbalanceinfo:s:tok-ABC_123` (captured by hand).
XFREERDP = bytes.fromhex("030000201be00000000000746f6b2d4142435f3132330d0a0100080003000000")
NEG_REQ = bytes.fromhex("0100080003000000")


def test_the_routing_token_is_the_ticket_and_the_rest_is_kept() -> None:
    request = parse_connection_request(XFREERDP)
    assert request == ConnectionRequest(token="tok-ABC_123", cookie=None, rest=NEG_REQ)


def test_the_guest_gets_the_request_without_the_token() -> None:
    stripped = connection_request(parse_connection_request(XFREERDP))
    # TPKT length and X.224 length indicator rewritten: 19 bytes, indicator 14.
    assert stripped == bytes.fromhex("030000130ee00000000000") + NEG_REQ
    assert parse_connection_request(stripped) == ConnectionRequest(None, None, NEG_REQ)


def test_a_cookie_is_no_ticket_and_is_kept_for_the_guest() -> None:
    variable = b"Cookie: mstshash=sam\r\n" + NEG_REQ
    packet = (struct.pack(">BBH", 3, 0, 11 + len(variable))
              + bytes([6 + len(variable), 0xE0, 0, 0, 0, 0, 0]) + variable)
    request = parse_connection_request(packet)
    assert request.token is None and request.cookie == b"Cookie: mstshash=sam\r\n"
    assert connection_request(request) == packet


@pytest.mark.parametrize(("packet", "why"), [
    (b"\x03\x00\x00\x05\x00", "too short"),
    (b"\x04" + XFREERDP[1:], "TPKT"),
    (XFREERDP[:3] + b"\x21" + XFREERDP[4:], "TPKT"),  # its own length lies
    (XFREERDP[:4] + b"\x1c" + XFREERDP[5:], "Connection Request"),  # indicator lies
    (XFREERDP[:5] + b"\xf0" + XFREERDP[6:], "Connection Request"),  # a data packet
    (bytes.fromhex("0300000e09e00000000000746f6b"), "CR LF"),
])
def test_broken_requests_are_refused_by_name(packet: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_connection_request(packet)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_the_first_packet_is_read_whole_and_bounded() -> None:
    a, b = _pair()
    with a, b:
        b.sendall(XFREERDP[:5])
        b.sendall(XFREERDP[5:] + b"next")  # what follows stays unread
        assert read_first_packet(a) == XFREERDP
        assert a.recv(4) == b"next"
    a, b = _pair()
    with a, b:
        b.sendall(struct.pack(">BBH", 3, 0, FIRST_PACKET_LIMIT + 1))
        with pytest.raises(BadRequest, match="at most"):
            read_first_packet(a)
    a, b = _pair()
    with a, b:
        b.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(BadRequest, match="TPKT"):
            read_first_packet(a)
    a, b = _pair()
    with a, b:
        b.sendall(XFREERDP[:10])  # and then nothing
        with pytest.raises(BadRequest, match="in time"):
            read_first_packet(a, timeout_s=0.2)


def test_the_rdp_file_names_the_proxy_the_account_and_the_ticket() -> None:
    text = rdp_file_text(host="vdi.example", port=3390, account="sam_smith", token="T0k-en")
    lines = text.split("\r\n")
    assert lines[:3] == ["full address:s:vdi.example:3390", "username:s:sam_smith",
                         "loadbalanceinfo:s:T0k-en"]
    assert text.endswith("\r\n") and "password" not in text
    v6 = rdp_file_text(host="::1", port=3390, account="a", token="t")
    assert v6.startswith("full address:s:[::1]:3390\r\n")


USERNET = """Hub -1 (hostnet1):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  13       127.0.0.1 41000       10.0.2.15  3389     0     0
Hub -1 (hostnet0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  12       127.0.0.1 49829       10.0.2.15  3389     0     0
  TCP[ESTABLISHED]   25       127.0.0.1 49829       10.0.2.15  3389     0     0
  UDP[236 sec]       27       10.0.2.15    68        10.0.2.2    67     0     0
"""


def test_the_forward_is_read_from_qemus_own_list() -> None:
    assert forwarded_port(USERNET, "hostnet0", "127.0.0.1") == 49829
    assert forwarded_port(USERNET, "hostnet1", "127.0.0.1") == 41000
    assert forwarded_port(USERNET, "hostnet0", "0.0.0.0") is None
    assert forwarded_port(USERNET, "hostnet2", "127.0.0.1") is None
    assert forwarded_port("", "hostnet0", "127.0.0.1") is None


def test_the_user_mode_nic_is_found_by_its_alias() -> None:
    live = ("<domain><devices><interface type='network'><alias name='net0'/></interface>"
            "<interface type='user'><mac address='52:54:00:00:00:01'/>"
            "<alias name='net1'/></interface></devices></domain>")
    assert user_netdev(live) == "hostnet1"
    assert user_netdev("<domain><devices/></domain>") is None

"""The RDP proxy: an RDP client's connection in, the desktop's RDP server (xrdp) out.

The way in is the one Microsoft's RD Connection Broker uses. The ``.rdp`` file the portal
hands out names this proxy (``full address``) and carries the console ticket as its
``loadbalanceinfo``; mstsc and xfreerdp send that, verbatim and ended by CR LF, as the
*routing token* of their first packet, the X.224 Connection Request (MS-RDPBCGR 2.2.1.1,
in a TPKT frame). Checked with xfreerdp 2.11: ``03 00 00 20 | 1b e0 00 00 00 00 00 |
TOKEN 0d 0a | 01 00 08 00 03 00 00 00`` (the token, then RDP_NEG_REQ asking for TLS or
CredSSP).

The proxy reads that one packet (at most ``FIRST_PACKET_LIMIT`` bytes, within
``HANDSHAKE_TIMEOUT_S``), spends the ticket (``Admission``: single use, unexpired, for RDP,
its desktop still its user's), and sends the desktop the same request without the token
(lengths rewritten), so the ticket never reaches the guest. Then it relays bytes both ways;
TLS runs end to end between the client and the guest's xrdp, and xrdp asks for the user's
one-time password. Anything else (no token, a bad or spent ticket, not a Connection Request,
too long, too slow) is closed without a byte sent and nothing opened.

The connection is the console's for the session service: its opening and closing are
reported as the other consoles' are, and it is closed once the desktop is no longer its
user's.

A client whose connection ended comes back with the same token: RDP clients reconnect by
themselves (``autoreconnection enabled`` in the file), and a live move of the desktop ends the
connection (the guest's forwarded port stays behind on the old host). Within
``RDP_RECONNECT_WINDOW`` of its connection closing here, a spent ticket is admitted again
(``Admission.admit(..., reconnect=True)``), to wherever the desktop runs now.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from deskpool.api.relay import RECHECK_S, TrackingTcpServer, pump
from deskpool.broker.console import RDP_RECONNECT_WINDOW, ConsoleTarget
from deskpool.domain.errors import AuthenticationFailed, DeskpoolError

log = logging.getLogger(__name__)
# The X.224 length indicator is one byte: no Connection Request is longer than 260 bytes.
FIRST_PACKET_LIMIT = 260
HANDSHAKE_TIMEOUT_S = 10.0
_TPKT_HEADER = 4
_X224_FIXED = 7  # length indicator, CR code, DST-REF, SRC-REF, class
_X224_CR = 0xE0
_NEG_REQ = 0x01
_MSTSHASH = b"Cookie: mstshash="


class BadRequest(ValueError):
    """The client's first packet is no X.224 Connection Request (or too long, too slow)."""


@dataclass(frozen=True)
class ConnectionRequest:
    token: str | None  # the routing token (the ticket); None when the client sent none
    cookie: bytes | None  # a ``Cookie: mstshash=...`` line, CR LF included, kept as sent
    rest: bytes  # RDP_NEG_REQ and anything after it, as sent


def parse_connection_request(packet: bytes) -> ConnectionRequest:
    """The parts of a TPKT-framed X.224 Connection Request; ``BadRequest`` naming what is
    wrong with it."""
    if len(packet) < _TPKT_HEADER + _X224_FIXED:
        raise BadRequest(f"{len(packet)} bytes are too short for a Connection Request")
    version, _reserved, length = struct.unpack(">BBH", packet[:_TPKT_HEADER])
    if version != 3 or length != len(packet):
        raise BadRequest("not a TPKT frame (version 3, its own length)")
    indicator, code = packet[4], packet[5]
    if indicator != len(packet) - 5 or code & 0xF0 != _X224_CR:
        raise BadRequest("not an X.224 Connection Request")
    variable = packet[_TPKT_HEADER + _X224_FIXED:]
    if variable[:1] == bytes([_NEG_REQ]) and variable[2:4] == b"\x08\x00":
        return ConnectionRequest(token=None, cookie=None, rest=variable)
    line, crlf, rest = variable.partition(b"\r\n")
    if not crlf:
        if variable:
            raise BadRequest("a routing token or cookie without its CR LF")
        return ConnectionRequest(token=None, cookie=None, rest=b"")
    if line.startswith(_MSTSHASH):
        return ConnectionRequest(token=None, cookie=line + crlf, rest=rest)
    try:
        token = line.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadRequest("a routing token that is not ASCII") from exc
    return ConnectionRequest(token=token or None, cookie=None, rest=rest)


def connection_request(request: ConnectionRequest) -> bytes:
    """The request as a packet again, without its routing token: what the guest gets."""
    variable = (request.cookie or b"") + request.rest
    x224 = bytes([_X224_FIXED - 1 + len(variable), _X224_CR, 0, 0, 0, 0, 0]) + variable
    return struct.pack(">BBH", 3, 0, _TPKT_HEADER + len(x224)) + x224


def read_first_packet(sock: socket.socket, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> bytes:
    """The client's first TPKT packet, whole; ``BadRequest`` for one longer than
    ``FIRST_PACKET_LIMIT``, not TPKT, or not complete within ``timeout_s`` in all."""
    deadline = time.monotonic() + timeout_s

    def read(n: int, data: bytes) -> bytes:
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BadRequest("the first packet did not come in time")
            sock.settimeout(left)
            try:
                chunk = sock.recv(n - len(data))
            except TimeoutError as exc:
                raise BadRequest("the first packet did not come in time") from exc
            if not chunk:
                raise BadRequest("the client closed before its first packet was complete")
            data += chunk
        return data

    head = read(_TPKT_HEADER, b"")
    if head[0] != 3:
        raise BadRequest("not a TPKT frame: is this an RDP client?")
    length = struct.unpack(">H", head[2:4])[0]
    if not _TPKT_HEADER + _X224_FIXED <= length <= FIRST_PACKET_LIMIT:
        raise BadRequest(f"a first packet of {length} bytes (at most {FIRST_PACKET_LIMIT})")
    return read(length, head)


class Admission(Protocol):
    """What the proxy asks the broker."""

    def admit(self, secret: str, reconnect: bool = False) -> ConsoleTarget:
        """Spend the RDP ticket ``secret``: the desktop's forwarded RDP port. With
        ``reconnect`` (its connection closed here a moment ago) a spent ticket is taken back
        once more. ``AuthenticationFailed`` otherwise."""

    def still_held(self, target: ConsoleTarget) -> bool: ...

    def opened(self, target: ConsoleTarget) -> None: ...

    def closed(self, target: ConsoleTarget) -> None: ...


class _Handler(socketserver.BaseRequestHandler):
    server: RdpProxyServer

    def handle(self) -> None:
        client: socket.socket = self.request
        peer = self.client_address[0]
        admission = self.server.admission
        try:
            request = parse_connection_request(read_first_packet(client))
            if request.token is None:
                raise AuthenticationFailed("no ticket: open the .rdp file the portal gives")
            target = admission.admit(request.token,
                                     self.server.came_back(request.token))
        except (AuthenticationFailed, BadRequest) as exc:
            log.warning("RDP console refused for %s: %s", peer, exc)
            return
        except OSError as exc:
            log.info("RDP console connection from %s ended early: %s", peer, exc)
            return
        except DeskpoolError as exc:
            log.warning("RDP console for %s unavailable: %s", peer, exc)
            return
        try:
            upstream = socket.create_connection((target.host, target.port), timeout=5)
        except OSError as exc:
            log.warning("RDP console of %s: cannot reach %s:%s: %s", target.desktop,
                        target.host, target.port, exc)
            return
        with upstream:
            client.settimeout(None)
            upstream.settimeout(None)
            if not self.server.track(client, request.token):
                return
            admission.opened(target)
            log.info("%s opened the RDP console of %s", target.user, target.desktop)
            try:
                upstream.sendall(connection_request(request))
                pump(client, upstream, lambda: admission.still_held(target),
                     self.server.recheck_s, self.server.stopping)
            except OSError as exc:
                log.info("RDP console of %s: %s", target.desktop, exc)
            finally:
                self.server.untrack(client, request.token)
                try:
                    admission.closed(target)
                except Exception:  # the close must not depend on the database
                    log.exception("could not record the RDP console of %s closing",
                                  target.desktop)
                log.info("%s closed the RDP console of %s", target.user, target.desktop)


class RdpProxyServer(TrackingTcpServer):
    """The proxy: one thread per connection; ``stop`` closes every open one."""

    def __init__(self, admission: Admission, listen_host: str, listen_port: int, *,
                 recheck_s: float = RECHECK_S) -> None:
        self.admission = admission
        self.reconnect_window_s = RDP_RECONNECT_WINDOW.total_seconds()
        self._open: set[str] = set()  # tickets with a connection open here
        self._closed_at: dict[str, float] = {}  # when a ticket's connection closed here
        super().__init__(listen_host, listen_port, _Handler, recheck_s=recheck_s)

    def came_back(self, token: str) -> bool:
        """Whether ``token``'s connection closed here within the reconnect window (and
        none of it is open): its client reconnecting."""
        now = time.monotonic()
        with self._lock:
            for old in [t for t, at in self._closed_at.items()
                        if now - at > self.reconnect_window_s]:
                del self._closed_at[old]
            return token not in self._open and token in self._closed_at

    def track(self, sock: socket.socket, token: str = "") -> bool:
        with self._lock:
            if not super().track(sock):
                return False
            self._open.add(token)
            self._closed_at.pop(token, None)
            return True

    def untrack(self, sock: socket.socket, token: str = "") -> None:
        with self._lock:
            super().untrack(sock)
            self._open.discard(token)
            self._closed_at[token] = time.monotonic()

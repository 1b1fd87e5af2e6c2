"""The native console proxy: remote-viewer's SPICE connections in, the desktop's SPICE port out.

An HTTP CONNECT proxy, as oVirt's SPICE proxy is, that admits only ticketed clients: the
``.vv`` file the portal hands out names this proxy with the console ticket as its credentials
(``proxy=http://deskpool:TICKET@broker:port``), and remote-viewer sends them as
``Proxy-Authorization: Basic`` on every CONNECT. The ticket alone says which desktop; the
CONNECT target the client names is ignored, except where a live move takes the desktop: QEMU
tells the client the display's address on the target host, and the broker admits that one
(``ConsoleTickets.admit_spice``), so no client can reach another port through the proxy.

SPICE opens several TCP connections per client (main, display, inputs, cursor...). The first
spends the ticket; the others, opened within a short window after it or while one of the
ticket's channels is still open here (a move's channels come minutes later), are admitted on
the same ticket. The client's channels are the console's "connection" for the session
service: its opening (the first channel) and closing (the last) are reported as a noVNC
console's are. Every open channel is closed once its
desktop is no longer its user's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import socket
import socketserver
from collections import Counter
from typing import Protocol

from deskpool.api.relay import RECHECK_S, TrackingTcpServer, pump
from deskpool.broker.console import SPICE_PROXY_USER, ConsoleTarget
from deskpool.domain.errors import AuthenticationFailed, DeskpoolError

log = logging.getLogger(__name__)
HEAD_LIMIT = 8192  # bytes of request head a client may send before it is cut
HANDSHAKE_TIMEOUT_S = 10.0


class Admission(Protocol):
    """What the proxy asks the broker."""

    def admit(self, secret: str, requested: tuple[str, int] | None = None,
              joined: bool = False) -> tuple[ConsoleTarget, bool]:
        """The desktop's SPICE display for ``secret``, and whether this connection is the
        one that spent the ticket (the client's first). ``requested``: the CONNECT target;
        ``joined``: a channel of this ticket is open here. ``AuthenticationFailed``
        otherwise."""

    def still_held(self, target: ConsoleTarget) -> bool: ...

    def opened(self, target: ConsoleTarget) -> None: ...

    def closed(self, target: ConsoleTarget) -> None: ...


def ticket_of(head: bytes) -> str:
    """The console ticket in a CONNECT request's ``Proxy-Authorization``; raises
    ``AuthenticationFailed`` naming what is missing or malformed."""
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0] if lines else ""
    if method != "CONNECT":
        raise AuthenticationFailed(f"only CONNECT is served here, not {method or 'nothing'}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() != "proxy-authorization":
            continue
        scheme, _, encoded = value.strip().partition(" ")
        if scheme.lower() != "basic":
            break
        try:
            user, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            break
        if user == SPICE_PROXY_USER and secret:
            return secret
        break
    raise AuthenticationFailed("no console ticket in the proxy credentials")


def requested_of(head: bytes) -> tuple[str, int] | None:
    """The ``host:port`` a CONNECT request names (``[v6]:port`` too); None when it names
    none that parses."""
    first = head.decode("latin-1").split("\r\n", 1)[0].split(" ")
    if len(first) < 2:
        return None
    host, _, port = first[1].rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class _Handler(socketserver.BaseRequestHandler):
    server: SpiceProxyServer

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(HANDSHAKE_TIMEOUT_S)
        peer = self.client_address[0]
        try:
            head = _read_head(client)
            secret = ticket_of(head)
            target, _first = self.server.admission.admit(
                secret, requested_of(head), self.server.channels_open(secret) > 0)
        except AuthenticationFailed as exc:
            log.warning("SPICE console refused for %s: %s", peer, exc)
            _answer(client, 407, "Proxy Authentication Required",
                    'Proxy-Authenticate: Basic realm="deskpool console"\r\n')
            return
        except (OSError, ValueError) as exc:
            log.info("SPICE console connection from %s ended early: %s", peer, exc)
            return
        except DeskpoolError as exc:
            log.warning("SPICE console for %s unavailable: %s", peer, exc)
            _answer(client, 503, "Service Unavailable")
            return
        try:
            upstream = socket.create_connection((target.host, target.port), timeout=5)
        except OSError as exc:
            log.warning("SPICE console of %s: cannot reach %s:%s: %s", target.desktop,
                        target.host, target.port, exc)
            _answer(client, 502, "Bad Gateway")
            return
        with upstream:
            _answer(client, 200, "Connection Established")
            client.settimeout(None)
            self._relay(client, upstream, target, secret)

    def _relay(self, client: socket.socket, upstream: socket.socket, target: ConsoleTarget,
               secret: str) -> None:
        admission = self.server.admission
        # The console is open while any channel of the client is: a live move opens the
        # channels on the target before the source's close, so it never reads as closed.
        opened = self.server.track(client, secret)
        if opened is None:
            return
        if opened:
            admission.opened(target)
            log.info("%s opened the SPICE console of %s", target.user, target.desktop)
        try:
            pump(client, upstream, lambda: admission.still_held(target),
                  self.server.recheck_s, self.server.stopping)
        finally:
            if self.server.untrack(client, secret):
                try:
                    admission.closed(target)
                except Exception:  # the close must not depend on the database
                    log.exception("could not record the SPICE console of %s closing",
                                  target.desktop)
                log.info("%s closed the SPICE console of %s", target.user, target.desktop)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1024)
        if not chunk:
            raise ValueError("the client closed before its request was complete")
        data += chunk
        if len(data) > HEAD_LIMIT:
            raise ValueError("request head too long")
    head, _, rest = data.partition(b"\r\n\r\n")
    if rest:  # a client that speaks before it was answered is no SPICE client
        raise ValueError("data sent before the tunnel was established")
    return head


def _answer(sock: socket.socket, code: int, reason: str, extra: str = "") -> None:
    with contextlib.suppress(OSError):
        sock.sendall(f"HTTP/1.1 {code} {reason}\r\n{extra}Content-Length: 0\r\n\r\n".encode())


class SpiceProxyServer(TrackingTcpServer):
    """The proxy: one thread per channel; ``stop`` closes every open channel."""

    def __init__(self, admission: Admission, listen_host: str, listen_port: int, *,
                 recheck_s: float = RECHECK_S) -> None:
        self.admission = admission
        self._open: Counter[str] = Counter()  # open channels by ticket
        super().__init__(listen_host, listen_port, _Handler, recheck_s=recheck_s)

    def channels_open(self, secret: str) -> int:
        with self._lock:
            return self._open[secret]

    def track(self, sock: socket.socket, secret: str = "") -> bool | None:  # type: ignore[override]
        """None when the proxy stops; else whether this is the client's only open channel
        (its console opens now)."""
        with self._lock:
            if not super().track(sock):
                return None
            self._open[secret] += 1
            return self._open[secret] == 1

    def untrack(self, sock: socket.socket, secret: str = "") -> bool:  # type: ignore[override]
        """Whether this was the client's last open channel (its console closes now)."""
        with self._lock:
            super().untrack(sock)
            self._open[secret] -= 1
            if self._open[secret] > 0:
                return False
            del self._open[secret]
            return True

"""The browser console proxy: noVNC's WebSocket in, the desktop's VNC port out.

Built on websockify as a library, the way OpenStack nova's novncproxy is: a
``ProxyRequestHandler`` subclass whose target comes from a console ticket
(``ws://proxy/?token=TICKET``), never from the client. A ticket is consumed once; the session
service hears of every console opened and closed.

A browser's WebSocket must come from a page of the same host name as the proxy (the portal
builds the URL from its own ``location.hostname``) or of one in
``DESKPOOL_CONSOLE_ALLOWED_ORIGINS``, as nova's novncproxy checks: a page elsewhere that got
hold of a ticket cannot open the console with it. Clients that send no ``Origin`` (native
clients, which are not browsers) need only the ticket.

Run it with ``python -m deskpool.api.console_proxy --listen 127.0.0.1:6080``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import socket
import ssl
import threading
from typing import Any
from urllib.parse import parse_qs, urlparse

from websockify.websocketproxy import LibProxyServer, ProxyRequestHandler
from websockify.websockifyserver import WebSockifyServer

from deskpool.api.tls import tls_files
from deskpool.broker.console import ConsoleTarget, ConsoleTickets
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.errors import AuthenticationFailed, DeskpoolError
from deskpool.services.context import ServiceContext

log = logging.getLogger("deskpool.api.console_proxy")  # the same under `python -m`
HANDSHAKE_TIMEOUT_S = 10.0  # a client that connects and says nothing frees its thread
RECHECK_S = 10.0  # how often an open console checks its desktop is still its user's
_TOKEN_IN_LOG = re.compile(r"token=[^&\s'\"]*")


class ConsoleProxyHandler(ProxyRequestHandler):  # type: ignore[misc]
    """One browser console: consume the ticket, proxy to the desktop it names, report."""

    server: ConsoleProxyServer
    timeout = HANDSHAKE_TIMEOUT_S
    target: ConsoleTarget | None = None  # this connection's, set once its ticket is consumed

    def log_message(self, fmt: str, *args: Any) -> None:
        """websockify's own per-connection chatter: debug, and never with the ticket."""
        log.debug("%s", _TOKEN_IN_LOG.sub("token=***", fmt % args))

    def validate_connection(self) -> None:
        """No token plugin and no path-chosen target: only ``new_websocket_client`` decides."""

    def new_websocket_client(self) -> None:
        self.connection.settimeout(None)  # handshake done: a console may stay quiet for hours
        peer = self.client_address[0]
        refusal = self._origin_refusal()
        if refusal is not None:  # before the ticket is consumed: the page it came from is wrong
            log.warning("console refused for %s: %s", peer, refusal)
            raise self.CClose(1008, "console refused: the page is from another site")
        token = (parse_qs(urlparse(self.path).query).get("token") or [""])[0]
        ctx = self.server.ctx
        try:
            if not token:
                raise AuthenticationFailed("no console ticket given")
            target = ConsoleTickets(ctx).consume(token)
        except AuthenticationFailed as exc:
            log.warning("console refused for %s: %s", peer, exc)
            raise self.CClose(1008, "console ticket refused") from None
        except DeskpoolError as exc:
            log.warning("console for %s unavailable: %s", peer, exc)
            raise self.CClose(1011, "the desktop's console is not available") from None
        if target.protocol != "vnc":
            log.warning("console refused for %s: %s speaks %s, not VNC", peer, target.desktop,
                        target.protocol)
            raise self.CClose(1003, "this desktop's console is not VNC")
        try:
            tsock = WebSockifyServer.socket(target.host, target.port, connect=True)
        except Exception as exc:  # websockify raises bare Exception for unresolvable hosts
            log.warning("console of %s for %s: cannot reach %s:%s: %s", target.desktop,
                        target.user, target.host, target.port, exc)
            raise self.CClose(1011, "the desktop's console is not answering") from None
        try:
            tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._proxy(target, tsock, peer)
        finally:
            self.server.untrack(tsock)
            tsock.close()

    def _origin_refusal(self) -> str | None:
        """Why the page that opened this WebSocket may not have a console, or None."""
        origin = self.headers.get("Origin")
        if origin is None:
            return None
        page = urlparse(origin)
        if page.scheme not in ("http", "https") or not page.hostname:
            return f"the page's origin {origin!r} is no web site"  # e.g. "null"
        proxy_host = urlparse("//" + (self.headers.get("Host") or "")).hostname
        if page.hostname in (proxy_host, *self.server.allowed_origins):
            return None
        return f"the page's origin {origin!r} is neither {proxy_host!r} nor an allowed origin"

    def send_ping(self, data: bytes = b"") -> None:
        """websockify's heartbeat, every ``RECHECK_S`` while proxying: also end the console
        of a desktop that left its user (logged off, released, timed out, taken by an admin)."""
        super().send_ping(data)
        target = self.target
        if target is None:
            return
        try:
            held = ConsoleTickets(self.server.ctx).still_held(target)
        except Exception:  # a database hiccup does not cut consoles
            log.warning("could not check who holds %s", target.desktop, exc_info=True)
            return
        if not held:
            log.info("closing %s's console of %s: no longer theirs", target.user, target.desktop)
            raise self.CClose(1008, "the desktop is no longer yours")

    def _proxy(self, target: ConsoleTarget, tsock: socket.socket, peer: str) -> None:
        if not self.server.track(tsock, self.connection):
            raise self.CClose(1001, "the console proxy is stopping")
        self.target = target
        sessions = SessionService(self.server.ctx)
        try:
            sessions.console_connected(target.desktop_id, target.user)
        except DeskpoolError as exc:
            log.warning("console of %s for %s refused: %s", target.desktop, target.user, exc)
            raise self.CClose(1011, "the desktop's console is not available") from None
        log.info("%s opened the console of %s from %s", target.user, target.desktop, peer)
        try:
            self.do_proxy(tsock)
        except self.CClose:
            if self.server.stopping:
                raise self.CClose(1001, "the console proxy is stopping") from None
            raise
        finally:
            try:
                sessions.console_disconnected(target.desktop_id, target.user)
            except Exception:  # the close must reach the client even if the database is down
                log.exception("could not record the console of %s closing", target.desktop)
            log.info("%s closed the console of %s", target.user, target.desktop)


class ConsoleProxyServer(LibProxyServer):  # type: ignore[misc]
    """websockify's threaded server (``LibProxyServer``: ``ThreadingMixIn`` + ``HTTPServer``).

    Threads, not websockify's default fork-per-connection ``WebSocketProxy``: forking would
    copy this process's SQLAlchemy engine and driver connections into every child (each would
    need a fresh ``ServiceContext``, re-running migrations per console), and fork-per-connection
    needs ``start_server``'s main-thread signal handling. Here one ``ServiceContext`` (thread
    safe: a session per unit of work, a lock around drivers) serves every connection, and each
    connection's target lives in its own handler, never on the shared server object.
    """

    def __init__(self, ctx: ServiceContext, listen_host: str, listen_port: int, *,
                 recheck_s: float = RECHECK_S, tls: ssl.SSLContext | None = None) -> None:
        self.ctx = ctx
        self.tls = tls
        self.allowed_origins = frozenset(
            name.lower() for name in ctx.settings.console_allowed_origins)
        self.logger = log  # websockify's handlers log through the server's logger
        self.stopping = False
        self._live: dict[socket.socket, socket.socket] = {}  # target socket -> client socket
        self._changed = threading.Condition()
        if ":" in listen_host:
            self.address_family = socket.AF_INET6
        super().__init__(RequestHandlerClass=ConsoleProxyHandler, listen_host=listen_host,
                         listen_port=listen_port, heartbeat=recheck_s)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake waits for the connection's own thread (finish_request): a slow client
        # must not hold up the accept loop.
        return self.tls.wrap_socket(sock, server_side=True,
                                    do_handshake_on_connect=False), address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.info("console connection from %s: no TLS handshake: %s",
                         client_address[0], exc)
                return
        super().finish_request(request, client_address)

    def track(self, target: socket.socket, client: socket.socket) -> bool:
        with self._changed:
            if self.stopping:
                return False
            self._live[target] = client
            return True

    def untrack(self, target: socket.socket) -> None:
        with self._changed:
            self._live.pop(target, None)
            self._changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("console connection from %s ended with an error", client_address[0],
                    exc_info=log.isEnabledFor(logging.DEBUG))

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, close every open console (each records its disconnect), wait.

        Call it from another thread than the one running ``serve_forever``."""
        with self._changed:
            self.stopping = True
        self.shutdown()
        with self._changed:
            for target in self._live:
                _shut(target)  # the proxy loop sees the desktop leave and closes the client
            self._changed.wait_for(lambda: not self._live, timeout=grace_s)
            for client in self._live.values():
                _shut(client)  # a client that stopped reading: cut it
        self.server_close()  # joins the handler threads


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def run_console_proxy(listen_host: str, listen_port: int, *,
                      settings: Settings | None = None) -> None:
    """Serve consoles in the foreground (never daemonizes) until SIGTERM or SIGINT."""
    ctx = ServiceContext(settings)
    try:
        tls = tls_files(ctx.settings)
        server = ConsoleProxyServer(ctx, listen_host, listen_port,
                                    tls=tls.server_context() if tls else None)
    except BaseException:
        ctx.close()
        raise
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    serving = threading.Thread(target=server.serve_forever, name="console-proxy")
    serving.start()
    log.info("console proxy listening on %s:%d", listen_host, server.port)
    try:
        while not stop.wait(0.5) and serving.is_alive():
            pass
        log.info("console proxy stopping")
    finally:
        server.stop()
        serving.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ctx.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deskpool.api.console_proxy",
                                     description="deskpool's browser console proxy")
    parser.add_argument("--listen", default="127.0.0.1:6080", metavar="HOST:PORT",
                        help="where to listen for WebSockets (default: %(default)s)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        parser.error(f"--listen wants HOST:PORT, not {args.listen!r}")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # An empty host ('--listen :6080') is the operator asking for every interface.
    every_interface = "0.0.0.0"  # nosec B104
    run_console_proxy(host.strip("[]") or every_interface, int(port))


if __name__ == "__main__":
    main()

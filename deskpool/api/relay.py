"""What the native console proxies (SPICE, RDP) share: a TCP server that tracks its open
connections so ``stop`` can close them, and the byte pump between a client and a display
that ends once the desktop is no longer its user's."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
RECHECK_S = 10.0


def pump(a: socket.socket, b: socket.socket, held: Callable[[], bool], recheck_s: float,
         stopping: threading.Event) -> None:
    """Copy bytes both ways until one side closes, the proxy stops, or ``held`` says the
    desktop left its user (asked every ``recheck_s``; a failing check keeps the connection)."""
    peers = {a: b, b: a}
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            selector.register(sock, selectors.EVENT_READ)
        while not stopping.is_set():
            ready = selector.select(timeout=recheck_s)
            if not ready:
                try:
                    if not held():
                        return
                except Exception:
                    log.warning("could not check a console's desktop", exc_info=True)
                continue
            for key, _ in ready:
                source = key.fileobj
                assert isinstance(source, socket.socket)
                try:
                    data = source.recv(65536)
                    if not data:
                        return
                    peers[source].sendall(data)
                except OSError:
                    return


class TrackingTcpServer(socketserver.ThreadingTCPServer):
    """One thread per connection; ``stop`` closes every open one."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, listen_host: str, listen_port: int,
                 handler: type[socketserver.BaseRequestHandler], *,
                 recheck_s: float = RECHECK_S) -> None:
        self.recheck_s = recheck_s
        self.stopping = threading.Event()
        self._live: set[socket.socket] = set()
        self._lock = threading.RLock()  # subclasses count under it too
        if ":" in listen_host:
            self.address_family = socket.AF_INET6
        super().__init__((listen_host, listen_port), handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self.stopping.is_set():
                return False
            self._live.add(sock)
            return True

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.discard(sock)

    def stop(self) -> None:
        """Stop accepting and close every open connection. Call it from another thread than
        the one running ``serve_forever``."""
        self.stopping.set()
        self.shutdown()
        with self._lock:
            for sock in self._live:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.server_close()

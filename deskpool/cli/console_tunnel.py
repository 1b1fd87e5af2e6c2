"""A native VNC viewer's way to a desktop: a TCP port on the user's machine, bridged over the
broker's console proxy. Each viewer connection gets a fresh single-use ticket and a WebSocket
(``wss://`` when the broker runs TLS), so the desktop's VNC port never leaves its host and a
native client passes the same checks as the browser's console."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from urllib.parse import quote, urlparse

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from deskpool.domain.errors import DeskpoolError


def console_websocket_url(broker_url: str, websocket_port: int, token: str) -> str:
    """The proxy listens on the broker's host name, on its own port; TLS goes with the API's."""
    broker = urlparse(broker_url)
    host = broker.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "wss" if broker.scheme == "https" else "ws"
    return f"{scheme}://{host}:{websocket_port}/?token={quote(token)}"


class ConsoleTunnel:
    """Listens on ``listen_host:listen_port`` (0: any free port); ``open_console`` makes the
    WebSocket for one viewer connection (raising ``DeskpoolError`` when refused)."""

    def __init__(self, listen_host: str, listen_port: int,
                 open_console: Callable[[], ClientConnection]) -> None:
        self._open_console = open_console
        try:
            self._listener = socket.create_server((listen_host, listen_port))
        except OSError as exc:
            raise DeskpoolError(f"cannot listen on {listen_host}:{listen_port}: "
                                f"{exc.strerror or exc}") from exc

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def serve(self, *, once: bool = False,
              on_closed: Callable[[str], None] | None = None) -> None:
        """Bridge viewer connections one after another (a console is one user's); with
        ``once``, return after the first. ``on_closed`` hears why each console ended."""
        try:
            while True:
                viewer, _address = self._listener.accept()
                with viewer:
                    why = self._bridge(viewer)
                if on_closed is not None:
                    on_closed(why)
                if once:
                    return
        finally:
            self._listener.close()

    def _bridge(self, viewer: socket.socket) -> str:
        with self._open_console() as console:  # closes it whichever way the console ends
            upstream = threading.Thread(target=_viewer_to_console, args=(viewer, console),
                                        name="console-upstream", daemon=True)
            upstream.start()
            try:
                for message in console:
                    viewer.sendall(message if isinstance(message, bytes)
                                   else message.encode())
            except (ConnectionClosed, OSError):
                pass
            finally:
                with suppress(OSError):
                    viewer.shutdown(socket.SHUT_RDWR)  # ends the upstream thread's recv
                console.close()
                upstream.join(timeout=5)
        code, reason = console.close_code, console.close_reason
        return f"{reason or 'closed'} (WebSocket close {code})" if code else "closed"


def _viewer_to_console(viewer: socket.socket, console: ClientConnection) -> None:
    try:
        while data := viewer.recv(65536):
            console.send(data)
    except (ConnectionClosed, OSError):
        pass
    finally:
        console.close()

"""A native viewer's side of ``deskpool client console``, for tests: the command in a thread
on a free local port, and the viewer's TCP connection to it."""

from __future__ import annotations

import socket
import threading
import time

from deskpool.cli import client as client_module


def start_console_tunnel(desktop: str) -> tuple[threading.Thread, int]:
    """``deskpool client console DESKTOP --once`` running in a thread: (thread, its port).
    The client must be signed in already (``client_module.login``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    tunnel = threading.Thread(target=client_module.console,
                              kwargs={"desktop": desktop, "port": port, "once": True})
    tunnel.start()
    return tunnel, port


def viewer_connection(port: int, timeout_s: float = 15) -> socket.socket:
    """Connect as the viewer. No probing first: with ``--once`` the first connection that
    gets through is the one the tunnel serves."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the console tunnel never listened on {port}") from None
            time.sleep(0.05)

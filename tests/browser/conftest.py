"""Browser tests: real Chromium (Debian's, driven by Playwright's sync API) against a real
uvicorn serving the broker's app on a free port, in a thread of the test process.

The server runs in-process because the fake driver's VMs live in this process's memory. The
helpers here (``LiveServer``, ``launch_chromium``, ``FakeRfb``, ``ConsoleProxyThread``) are
also used by the real-VM browser test.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import IN_CI
from tests.loopback import LoopbackServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WAIT_MS = 15_000


def chromium_missing_reason() -> str | None:
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"Playwright is not installed: {exc}"
    return None


def skip_or_fail_without_chromium() -> None:
    reason = chromium_missing_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class ConsoleProxyThread:
    """deskpool's websockify console proxy in a thread of this process (it sees the fake
    hypervisor), on a free port of 127.0.0.1."""

    def __init__(self, ctx: Any) -> None:
        from deskpool.api.console_proxy import ConsoleProxyServer

        self.server = ConsoleProxyServer(ctx, "127.0.0.1", 0)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="console-proxy")

    def __enter__(self) -> ConsoleProxyThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace_s=2)
        self.thread.join(timeout=10)


class FakeRfb(LoopbackServer):
    """Just enough of a VNC server (RFB 3.8, no security) for noVNC to connect and draw: the
    left half of the screen in ``LEFT``, the right half in ``RIGHT``."""

    WIDTH, HEIGHT = 320, 200
    LEFT, RIGHT = (230, 60, 20), (20, 120, 230)

    def __init__(self, name: bytes = b"fake desktop",
                 colours: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
                 ) -> None:
        self.name = name
        if colours is not None:
            self.LEFT, self.RIGHT = colours
        self._open: set[socket.socket] = set()
        super().__init__()

    @property
    def sessions(self) -> int:
        return self.accepted

    def drop_connections(self) -> None:
        """Close every open console connection, as a VM's QEMU ending does (a live
        migration's source stopping): the listener stays."""
        for conn in list(self._open):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle(self, conn: socket.socket) -> None:
        self._open.add(conn)
        with conn, contextlib.suppress(OSError, ConnectionError):
            try:
                self._speak(conn)
            finally:
                self._open.discard(conn)

    def _speak(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        conn.sendall(b"RFB 003.008\n")
        _exactly(conn, 12)
        conn.sendall(bytes([1, 1]))  # one security type: None
        _exactly(conn, 1)
        conn.sendall(struct.pack(">I", 0))  # security result: OK
        _exactly(conn, 1)  # ClientInit
        fmt = (32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        conn.sendall(struct.pack(">HH", self.WIDTH, self.HEIGHT)
                     + struct.pack(">BBBBHHHBBB3x", *fmt)
                     + struct.pack(">I", len(self.name)) + self.name)
        while not self._stop.is_set():
            kind = _exactly(conn, 1)[0]
            if kind == 0:  # SetPixelFormat
                fmt = struct.unpack(">BBBBHHHBBB3x", _exactly(conn, 19)[3:])
            elif kind == 2:  # SetEncodings
                count = struct.unpack(">xH", _exactly(conn, 3))[0]
                _exactly(conn, 4 * count)
            elif kind == 3:  # FramebufferUpdateRequest
                incremental = _exactly(conn, 9)[0]
                if not incremental:
                    conn.sendall(self._frame(fmt))
            elif kind == 4:  # KeyEvent
                _exactly(conn, 7)
            elif kind == 5:  # PointerEvent
                _exactly(conn, 5)
            elif kind == 6:  # ClientCutText
                length = struct.unpack(">3xI", _exactly(conn, 7))[0]
                _exactly(conn, length)
            else:
                return  # something this stand-in does not speak

    def _frame(self, fmt: tuple[int, ...]) -> bytes:
        bpp, _depth, big_endian, _true, _rm, _gm, _bm, rs, gs, bs = fmt
        assert bpp == 32, f"the stand-in only draws 32-bit pixels, noVNC asked for {bpp}"
        order = ">I" if big_endian else "<I"
        # Padding bits all ones: noVNC 1.3's raw decoder takes the padding byte for alpha
        # beyond the first chunk of a rectangle it receives, so zeros would draw transparent.
        padding = ~((255 << rs) | (255 << gs) | (255 << bs)) & 0xFFFFFFFF

        def pixel(rgb: tuple[int, int, int]) -> bytes:
            r, g, b = rgb
            return struct.pack(order, (r << rs) | (g << gs) | (b << bs) | padding)

        half = self.WIDTH // 2
        row = pixel(self.LEFT) * half + pixel(self.RIGHT) * (self.WIDTH - half)
        header = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, self.WIDTH,
                                                         self.HEIGHT, 0)
        return header + row * self.HEIGHT


def _exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the client went away")
        data += chunk
    return data


def wait_until(done: Callable[[], bool], timeout_s: float = 10, what: str = "it") -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s} s"
        time.sleep(0.05)


def drawn_canvas(page: Page, selector: str = "#console-screen canvas") -> Locator | None:
    """The console's canvas once it has a size, else None: a reconnecting console's new
    canvas is 0 pixels wide until its first frame, and may be replaced between two calls."""
    from playwright.sync_api import Error as PlaywrightError

    canvas = page.locator(selector)
    try:
        if canvas.count() != 1 or canvas.evaluate("(c) => c.width * c.height") == 0:
            return None
    except PlaywrightError:
        return None
    return canvas


def sign_in(page: Page, base_url: str, user: str, password: str, path: str = "/") -> None:
    page.goto(base_url + path)
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#signin-button")


CANVAS_STATS = """(canvas) => {
  const ctx = canvas.getContext("2d");
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const colours = new Set();
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) {
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    if (data[i] + data[i + 1] + data[i + 2] > 96) lit += 1;
  }
  return { width: canvas.width, height: canvas.height, colours: colours.size,
           lit: lit / (data.length / 4) };
}"""
PIXEL_AT = """(canvas, [x, y]) => Array.from(
  canvas.getContext("2d").getImageData(x, y, 1, 1).data.slice(0, 3))"""


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is
# open, which would break later tests that run their own (asyncio.run, another Playwright).
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    skip_or_fail_without_chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


"""Native desktop clients (remote-viewer, xfreerdp) run as users run them: real programs on a
virtual X screen (Xvfb), looked at through screenshots of that screen."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import IN_CI

_WINDOW_LINE = re.compile(r'"(?P<title>[^"]*)":.*?\s(?P<w>\d+)x(?P<h>\d+)[+-]-?\d+[+-]-?\d+'
                          r'\s+\+(?P<x>-?\d+)\+(?P<y>-?\d+)')


def need_programs(*names: str) -> None:
    """Outside CI a developer may lack them; CI installs them (scripts/setup-host.sh)."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    reason = f"not installed: {', '.join(missing)}"
    if IN_CI:
        pytest.fail(f"native client tests cannot run in CI: {reason}")
    pytest.skip(reason)


class Screen:
    """An Xvfb screen; programs started with ``run`` show on it."""

    def __init__(self, display: str, log_dir: Path) -> None:
        self.display = display
        self.log_dir = log_dir
        self.env = {**os.environ, "DISPLAY": display}

    def run(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        return subprocess.Popen(list(argv), env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def screenshot(self, path: Path) -> bytes:
        """The whole screen as an 8-bit RGB PNG (what ``tests.realvm.screens`` decodes)."""
        subprocess.run(["import", "-silent", "-display", self.display, "-window", "root",
                        f"PNG24:{path}"], check=True, timeout=30, env=self.env)
        return path.read_bytes()

    def window_box(self, title_part: str) -> tuple[int, int, int, int] | None:
        """(x, y, width, height) on the screen of the first window whose title has
        ``title_part``; None while there is none."""
        for title, box in self._windows():
            if title_part in title:
                return box
        return None

    def _windows(self) -> list[tuple[str, tuple[int, int, int, int]]]:
        # xwininfo -tree lines: 0x400007 "title": ("class" "Class")  698x454+0+0  +0+0
        tree = subprocess.run(["xwininfo", "-display", self.display, "-root", "-tree"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        found = []
        for match in _WINDOW_LINE.finditer(tree):
            box = (int(match["x"]), int(match["y"]), int(match["w"]), int(match["h"]))
            found.append((match["title"], box))
        return found

    def window_titles(self) -> list[str]:
        return [title for title, _ in self._windows()]


@contextmanager
def virtual_screen(log_dir: Path, size: str = "1280x1024x24") -> Iterator[Screen]:
    need_programs("Xvfb", "import", "xwininfo")
    # -displayfd: Xvfb picks a free display number and says which once it is ready.
    read, write = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", size,
                             "-nolisten", "tcp"], pass_fds=(write,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read) as announced:
            number = announced.readline().strip()
        assert number, "Xvfb did not start"
        yield Screen(f":{number}", log_dir)
    finally:
        stop(xvfb)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ask it to end; kill it if it has not after ten seconds."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(done: object, timeout_s: float, what: str, poll_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s} s"
        time.sleep(poll_s)

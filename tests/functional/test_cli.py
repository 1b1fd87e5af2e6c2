"""The command line as a user runs it: bad input gives one clear line on stderr, no traceback,
and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DESKPOOL = Path(sys.executable).parent / "deskpool"


def run(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(tmp_path / "data"), **settings}
    env.pop("DESKPOOL_DEBUG", None)
    return subprocess.run([str(DESKPOOL), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@pytest.mark.parametrize(("args", "needle"), [
    (("host", "add", "far", "qemu+tcp://127.0.0.1:1/system"), "cannot reach a hypervisor"),
    (("desktop", "create", "nosuch"), "template 'nosuch' does not exist"),
    (("template", "publish", "t", "--image", "/nonexistent/disk.qcow2"),
     "/nonexistent/disk.qcow2 does not exist"),
    (("desktop", "delete", "ghost"), "desktop 'ghost' does not exist"),
    (("desktop", "create", "x", "--pattern", "nope"), "naming pattern"),
    (("pool", "create", "p", "--template", "t", "--min", "5", "--max", "2"),
     "max (2) is below min (5)"),
    (("pool", "create", "p", "--template", "t", "--spare", "4", "--max", "3"),
     "spare (4) is above max (3)"),
    (("pool", "create", "p", "--template", "nosuch"), "template 'nosuch' does not exist"),
    (("pool", "create", "p", "--template", "t", "--session-start-timeout", "0"),
     "session_start_timeout_s (0) must be whole seconds from 1"),
    (("pool", "create", "p", "--template", "t", "--spare", "-1"), "spare (-1) must be a whole"),
    (("pool", "create", "p", "--template", "t", "--max", "100001"),
     "max_size (100001) must be a whole number from 0 to 100000"),
    (("pool", "create", "P Q", "--template", "t"), "pool name 'P Q' must be 1-63 characters"),
    (("pool", "create", "p", "--template", "t", "--max-age", "999999999999"),
     "max_age_s (999999999999) must be whole seconds"),
    (("pool", "create", "p", "--template", "t", "--pattern", "a" * 60 + "{n}"),
     "names up to n=999999 must be"),
    (("pool", "rollback", "nosuch"), "pool 'nosuch' does not exist"),
    (("pool", "create", "p", "--template", "t", "--redirect-folders", "Documents,../etc"),
     "redirected folder '../etc' must be one folder in the home"),
])
def test_bad_input_is_one_line_naming_the_problem(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    result = run(tmp_path, *args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("DESKPOOL_LEASE_S", "0", "DESKPOOL_LEASE_S='0': input should be greater than 0"),
    ("DESKPOOL_READY_TIMEOUT_S", "soon", "DESKPOOL_READY_TIMEOUT_S='soon': input should be a "
     "valid number"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(
    tmp_path: Path, name: str, value: str, needle: str
) -> None:
    result = run(tmp_path, "pool", "list", **{name: value})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad setting "), result.stderr
    assert needle in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was made with the bad setting


def test_publish_then_list_shows_the_version(tmp_path: Path) -> None:
    disk = tmp_path / "g.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    published = run(tmp_path, "template", "publish", "golden", "--image", str(disk))
    assert published.returncode == 0, published.stderr
    assert "published golden version 1" in published.stdout
    listed = run(tmp_path, "template", "list")
    assert "golden" in listed.stdout and listed.returncode == 0
    again = run(tmp_path, "host", "add", "far", "qemu+tcp://127.0.0.1:1/system")
    assert again.returncode == 1
    assert "far" not in run(tmp_path, "host", "list").stdout

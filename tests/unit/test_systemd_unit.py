"""deploy/deskpool.service as scripts/install-service.sh installs it: ExecStart runs this
clone's venv's ``deskpool serve`` with the config file, systemd-analyze finds nothing wrong
(where it is installed), and the example config goes in once, never over the admin's own."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deskpool.config import Settings, read_config_file

REPO = Path(__file__).resolve().parents[2]
CONFIG = "/etc/deskpool/deskpool.toml"


def _install(root: Path) -> Path:
    subprocess.run(["bash", str(REPO / "scripts" / "install-service.sh"), "--root", str(root)],
                   check=True, capture_output=True, timeout=60)
    return root / "etc" / "systemd" / "system" / "deskpool.service"


def _parse(unit: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(unit.read_text())
    return parser


def test_the_unit_runs_the_venvs_deskpool_after_libvirt(tmp_path: Path) -> None:
    unit = _parse(_install(tmp_path))
    service = unit["Service"]
    binary, *args = service["ExecStart"].split()
    assert Path(binary) == REPO / ".venv" / "bin" / "deskpool"
    assert args == ["serve", "--config", CONFIG]
    if Path(binary).exists():  # a clone set up by setup-host.sh (CI): the venv running us
        assert Path(binary).parent.resolve() == Path(sys.executable).parent.resolve()
    assert service["Restart"] == "on-failure"
    assert "libvirtd.service" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectKernelModules",
                      "RestrictSUIDSGID", "PrivateTmp"):
        assert service[hardening] in ("yes", "full"), hardening
    # libvirt's socket is AF_UNIX: the address families must keep it.
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the unit is still parsed above)")
    unit = _install(tmp_path)
    binary = REPO / ".venv" / "bin" / "deskpool"
    if not binary.exists():
        # A work tree without its own venv: verify with the deskpool running these tests.
        unit.write_text(unit.read_text().replace(str(binary),
                                                 str(Path(sys.executable).parent / "deskpool")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    # verify exits 0 on unknown keys and bad values too, and only warns: none is accepted.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_the_example_config_is_installed_once(tmp_path: Path) -> None:
    _install(tmp_path)
    config = tmp_path / CONFIG.lstrip("/")
    assert config.stat().st_mode & 0o777 == 0o640  # may hold the LDAP password
    assert read_config_file(config, Settings.model_fields) == {}  # every line commented
    config.write_text("listen_port = 8443\n")
    _install(tmp_path)
    assert config.read_text() == "listen_port = 8443\n"

"""The TOML configuration file: read under the environment, every key and value checked, a bad
one named with its file and line; the shipped example and the README cover every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deskpool.config import ConfigFileError, Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "deskpool.toml.example"
DESKPOOL = Path(sys.executable).parent / "deskpool"


def _settings_from(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    path = tmp_path / "deskpool.toml"
    path.write_text(text)
    monkeypatch.setenv("DESKPOOL_CONFIG", str(path))
    return Settings()


def test_the_file_sets_values_the_environment_and_code_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = ('listen_port = 9000\nconsole_port = 7000\ndata_dir = "/srv/deskpool"\n'
            'console_allowed_origins = ["vdi.example.com"]\nlog_format = "json"\n')
    settings = _settings_from(tmp_path, text, monkeypatch)
    assert settings.listen_port == 9000 and settings.console_port == 7000
    assert settings.data_dir == Path("/srv/deskpool")
    assert settings.console_allowed_origins == ["vdi.example.com"]
    assert settings.log_format == "json"
    assert settings.spice_proxy_port == 6081  # not in the file: the default

    monkeypatch.setenv("DESKPOOL_LISTEN_PORT", "9100")
    settings = Settings()
    assert settings.listen_port == 9100 and settings.console_port == 7000
    assert Settings(listen_port=9200).listen_port == 9200


def test_no_file_when_the_variable_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESKPOOL_CONFIG", "")
    assert Settings().listen_port == 8000


@pytest.mark.parametrize(("text", "needle"), [
    ("listen_port = 9000\n\nlisten_prot = 1\n",
     ":3: unknown setting 'listen_prot' (did you mean 'listen_port'?)"),
    ('listen_port = 9000\nlease_s = -1\n', ":2: setting 'lease_s' = -1: input should be "
     "greater than 0"),
    ('listen_port = "eighty"\n', ":1: setting 'listen_port' = 'eighty': input should be a "
     "valid integer"),
    ('log_format = "xml"\n', ":1: setting 'log_format' = 'xml': input should be 'text' or "
     "'json'"),
    ('[ldap]\nurl = "ldap://x"\n', ":1: unknown setting 'ldap'"),
    ("listen_port = 9000\nconsole_port = \n", "not valid TOML: Invalid value (at line 2"),
])
def test_a_bad_file_is_an_error_naming_key_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, needle: str
) -> None:
    with pytest.raises(ConfigFileError) as caught:
        _settings_from(tmp_path, text, monkeypatch)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "deskpool.toml")), message
    assert needle in message, message


def test_a_missing_named_file_is_an_error(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESKPOOL_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigFileError, match=r"nope\.toml .* does not exist"):
        Settings()


def test_the_cli_prints_one_line_for_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen_port = 9000\nlisten_prot = 1\n")
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(tmp_path / "data")}
    env.pop("DESKPOOL_DEBUG", None)
    result = subprocess.run([str(DESKPOOL), "serve", "--config", str(bad)], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: unknown setting"), lines
    assert not (tmp_path / "data").exists()  # nothing started


def _example_keys() -> dict[str, str]:
    """Every ``# key = value`` line of the example, uncommented."""
    keys = {}
    for line in EXAMPLE.read_text().splitlines():
        found = re.match(r"# ([a-z_]+) = (.*?)(\s+#.*)?$", line)
        if found:
            keys[found.group(1)] = found.group(2)
    return keys


def test_the_example_shows_every_setting_with_a_valid_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _example_keys()
    assert set(keys) == set(Settings.model_fields)
    text = "".join(f"{key} = {value}\n" for key, value in keys.items())
    settings = _settings_from(tmp_path, text, monkeypatch)
    assert settings.ldap_bind_dn == "cn=deskpool,ou=services,dc=example,dc=com"


def test_the_readme_table_lists_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", readme, flags=re.MULTILINE))
    assert set(Settings.model_fields) <= listed, set(Settings.model_fields) - listed

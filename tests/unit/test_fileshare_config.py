"""deskpool's Samba configuration and the redirected-folder rules, without a server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.domain.redirection import redirect_folders
from deskpool.fileshare.samba import SambaLayout, account_for, render_config, render_dfree


def layout(tmp_path: Path, **kw: object) -> SambaLayout:
    return SambaLayout(state_dir=tmp_path / "samba", share_root=tmp_path / "shares",
                       **kw)  # type: ignore[arg-type]


def test_each_share_admits_its_own_account_only_and_nothing_anonymous(tmp_path: Path) -> None:
    conf = render_config(layout(tmp_path, port=1445))
    homes = conf.split("[homes]", 1)[1]
    for line in ("valid users = %S", "browseable = no", "hide unreadable = yes",
                 "create mask = 0600", "directory mask = 0700",
                 f"path = {tmp_path / 'shares'}/%S"):
        assert line in homes, line
    for line in ("map to guest = never", "restrict anonymous = 2", "smb ports = 1445",
                 "server min protocol = SMB3", "usershare max shares = 0",
                 f"passdb backend = tdbsam:{tmp_path / 'samba'}/private/passdb.tdb"):
        assert line in conf, line
    assert "/etc/samba" not in conf and "/var/lib/samba" not in conf  # its own state only


def test_share_accounts_are_valid_bounded_unix_names(tmp_path: Path) -> None:
    assert account_for(layout(tmp_path), 10000) == "deskpool-u10000"
    assert account_for(layout(tmp_path), 4294967294) == "deskpool-u4294967294"
    with pytest.raises(InvalidInput):
        account_for(layout(tmp_path, account_prefix="Bad Prefix"), 10000)


def test_the_dfree_script_reports_the_quota_less_what_the_share_holds(tmp_path: Path) -> None:
    script = tmp_path / "dfree"
    script.write_text(render_dfree(layout(tmp_path, quota_mib=8)))
    share = tmp_path / "share"
    share.mkdir()
    (share / "big").write_bytes(b"\1" * (3 << 20))
    total, free, block = subprocess.run(["sh", str(script), str(share)], capture_output=True,
                                        text=True, check=True).stdout.split()
    assert (int(total), block) == (8192, "1024")
    assert 8192 - 3072 - 16 <= int(free) <= 8192 - 3072  # du counts the directory's blocks
    (share / "more").write_bytes(b"\1" * (6 << 20))
    out = subprocess.run(["sh", str(script), str(share)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[1] == "0"  # over the quota: nothing free, never negative


@pytest.mark.parametrize("bad", ["../etc", ".ssh", "a/b", "Docs..old", "Docs.", "x" * 65,
                                 "tab\there"])
def test_a_redirected_folder_is_one_folder_of_the_home(bad: str) -> None:
    with pytest.raises(InvalidInput, match="redirected folder"):
        redirect_folders([bad])


def test_redirected_folders_are_trimmed_deduplicated_and_bounded() -> None:
    assert redirect_folders(" Documents,Desktop ,,Documents") == ("Documents", "Desktop")
    assert redirect_folders("") == ()
    with pytest.raises(InvalidInput, match="at most 16"):
        redirect_folders([f"F{i}" for i in range(17)])

"""The three-way rule on its own, and ``deskpool layer`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.cli import common, main
from deskpool.domain.layers import (
    Entry,
    Kind,
    Outcome,
    Ownership,
    RebaseReport,
    Side,
    decide,
    dpkg_info_package,
    owned_aliases,
)
from tests.unit.layer_trees import put

A, B, C = "a" * 64, "b" * 64, "c" * 64
PKG = Ownership("pkg")


@pytest.mark.parametrize(("user", "ancestor", "new", "owner", "area", "outcome", "take"), [
    (B, A, A, PKG, False, Outcome.KEPT, Side.USER),  # only the user changed it
    (None, A, A, PKG, False, Outcome.KEPT, Side.USER),  # only the user deleted it
    (B, None, None, None, False, Outcome.KEPT, Side.USER),  # the user created it
    (B, A, B, PKG, False, Outcome.DROPPED, Side.BASE),  # the same change on both sides
    (None, A, None, PKG, False, Outcome.DROPPED, Side.BASE),  # both deleted it
    (A, A, B, PKG, False, Outcome.DROPPED, Side.BASE),  # only the base changed it
    (B, A, C, PKG, False, Outcome.CONFLICT, Side.BASE),  # both, a package's file
    (None, A, C, PKG, False, Outcome.CONFLICT, Side.BASE),  # user deleted, base patched
    (B, None, C, PKG, False, Outcome.CONFLICT, Side.BASE),  # both created it
    (B, A, C, None, False, Outcome.USER_WON, Side.USER),  # both, nobody's package
    (B, A, C, PKG, True, Outcome.USER_WON, Side.USER),  # both, in the user's own area
    (B, A, None, None, False, Outcome.USER_WON, Side.USER),  # base deleted, user changed
])
def test_three_way_rule(user: str | None, ancestor: str | None, new: str | None,
                        owner: Ownership | None, area: bool, outcome: Outcome,
                        take: Side) -> None:
    decision = decide(user, ancestor, new, owner=owner, user_area=area)
    assert (decision.outcome, decision.take) == (outcome, take)
    assert decision.reason


def test_fingerprints_count_metadata_but_not_opaqueness() -> None:
    base = Entry(Kind.FILE, 0o644, 0, 0, A)
    assert base.fingerprint() != Entry(Kind.FILE, 0o600, 0, 0, A).fingerprint()
    assert base.fingerprint() != Entry(Kind.FILE, 0o644, 1000, 0, A).fingerprint()
    assert base.fingerprint() != Entry(Kind.FILE, 0o644, 0, 0, A,
                                       xattrs=(("security.capability", b"x"),)).fingerprint()
    assert Entry(Kind.DIR).fingerprint() == Entry(Kind.DIR, opaque=True).fingerprint()


def test_dpkg_names() -> None:
    assert dpkg_info_package("/var/lib/dpkg/info/python3.11.list") == "python3.11"
    assert dpkg_info_package("/var/lib/dpkg/info/libc6:amd64.md5sums") == "libc6"
    assert dpkg_info_package("/var/lib/dpkg/info/format") is None
    assert dpkg_info_package("/var/lib/dpkg/status") is None
    assert owned_aliases("/bin/ls") == ("/bin/ls", "/usr/bin/ls")
    assert owned_aliases("/usr/lib/x") == ("/usr/lib/x", "/lib/x")
    assert owned_aliases("/etc/x") == ("/etc/x",)


def test_report_json_round_trip() -> None:
    report = RebaseReport("v1", "v2", kept=["/a"], excluded=3, bytes=10)
    assert RebaseReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_cli_init_and_rebase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new, layer = tmp_path / "old", tmp_path / "new", tmp_path / "layer"
    put(old, "/etc/site.conf", "v1\n")
    put(new, "/etc/site.conf", "v2\n")
    put(old, "/etc/pkg.conf", "v1\n")
    put(new, "/etc/pkg.conf", "v2\n")
    for root in (old, new):
        put(root, "/var/lib/dpkg/info/pkg.list", "/.\n/etc/pkg.conf\n")
    runner = CliRunner()
    done = runner.invoke(main.app, ["layer", "init", str(layer), "--version", "v1"])
    assert done.exit_code == 0, done.output
    put(layer / "upper", "/etc/site.conf", "mine\n")
    put(layer / "upper", "/etc/pkg.conf", "mine\n")
    args = ["layer", "rebase", "--old", str(old), "--new", str(new), "--layer", str(layer),
            "--new-version", "v2"]
    done = runner.invoke(main.app, [*args, "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert "1 conflict(s), 1 note(s)" in done.output
    assert "…" not in done.output, done.output  # a long path folds, never cut off
    monkeypatch.setattr(common.out, "width", 200)  # the console is made at import
    done = runner.invoke(main.app, [*args, "--out", str(tmp_path / "out3")])
    assert "/etc/pkg.conf.deskpool-conflict" in done.output, done.output
    done = runner.invoke(main.app, [*args, "--out", str(tmp_path / "out2"), "--json"])
    report = json.loads(done.output)
    assert [c["path"] for c in report["conflicts"]] == ["/etc/pkg.conf"]
    assert [n["path"] for n in report["notes"]] == ["/etc/site.conf"]
    done = runner.invoke(main.app, ["layer", "exclusions"])
    assert "/etc/machine-id" in done.output.splitlines()

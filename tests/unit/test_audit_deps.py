"""scripts/audit-deps.py: a known vulnerability fails the check; a service that cannot be
reached, or knows none of the packages, is one clear SKIPPED line and no failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "audit-deps.py"


def _fake_pip_audit(tmp_path: Path, *, report: dict[str, object] | None, stderr: str = "",
                    status: int = 0) -> Path:
    """An executable standing in for pip-audit: writes ``report`` where -o says."""
    fake = tmp_path / "pip-audit"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"report = {json.dumps(report)!r}\n"
        "args = sys.argv[1:]\n"
        "if report != 'null':\n"
        "    open(args[args.index('-o') + 1], 'w').write(report)\n"
        f"sys.stderr.write({stderr!r})\nsys.exit({status})\n")
    fake.chmod(0o755)
    return fake


def _run(tmp_path: Path, fake: Path) -> subprocess.CompletedProcess[str]:
    lock = tmp_path / "requirements.lock"
    lock.write_text("requests==2.20.0\nrich==13.0.0\n")
    return subprocess.run([sys.executable, str(SCRIPT), "--lock", str(lock),
                           "--pip-audit", str(fake)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_known_vulnerability_fails(tmp_path: Path) -> None:
    report = {"dependencies": [
        {"name": "requests", "version": "2.20.0", "vulns": [
            {"id": "PYSEC-2023-74", "fix_versions": ["2.31.0"]}]},
        {"name": "rich", "version": "13.0.0", "vulns": []}]}
    result = _run(tmp_path, _fake_pip_audit(tmp_path, report=report, status=1))
    assert result.returncode == 1
    assert "requests 2.20.0: PYSEC-2023-74 (fixed in: 2.31.0)" in result.stdout


def test_a_clean_audit_passes(tmp_path: Path) -> None:
    report = {"dependencies": [{"name": "requests", "version": "2.32.0", "vulns": []},
                               {"name": "rich", "skip_reason": "not found"}]}
    result = _run(tmp_path, _fake_pip_audit(tmp_path, report=report))
    assert result.returncode == 0
    assert "1 locked packages audited, no known vulnerability (1 unknown to the service: " \
           "rich)" in result.stdout


@pytest.mark.parametrize(("report", "stderr"), [
    (None, "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='pypi.org'): "
           "Max retries exceeded\n"),
    ({"dependencies": [{"name": "requests", "skip_reason": "Dependency not found on PyPI"},
                       {"name": "rich", "skip_reason": "Dependency not found on PyPI"}]}, ""),
])
def test_an_unreachable_service_is_skipped_with_a_clear_line(
    tmp_path: Path, report: dict[str, object] | None, stderr: str
) -> None:
    result = _run(tmp_path, _fake_pip_audit(tmp_path, report=report, stderr=stderr,
                                            status=1 if report is None else 0))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pip-audit: SKIPPED: the vulnerability service ")


def test_another_failure_of_pip_audit_fails(tmp_path: Path) -> None:
    fake = _fake_pip_audit(tmp_path, report=None, stderr="bad requirement line\n", status=2)
    result = _run(tmp_path, fake)
    assert result.returncode == 2 and "bad requirement line" in result.stderr

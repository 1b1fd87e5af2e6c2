#!/usr/bin/env python3
"""Audit requirements.lock with pip-audit: fail on a known vulnerability, skip (one clear line,
exit 0) when the vulnerability service cannot be reached or knows none of the packages.

Usage: audit-deps.py [--lock FILE] [--pip-audit PATH]   (./dev test runs it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What requests/urllib3 print when the service is not there (no DNS, no route, a timeout).
UNREACHABLE = ("ConnectionError", "NameResolutionError", "Max retries exceeded",
               "ConnectTimeout", "ReadTimeout", "Temporary failure in name resolution")


def summarize(report: dict[str, object]) -> tuple[int, str]:
    """Exit status and the lines to print for pip-audit's JSON report."""
    deps = report.get("dependencies")
    if not isinstance(deps, list):
        return 1, "pip-audit: unexpected report (no dependency list)"
    found = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if d.get("skip_reason")]
    if found:
        lines = [f"pip-audit: {len(found)} locked package(s) with known vulnerabilities:"]
        for dep in found:
            for vuln in dep["vulns"]:
                fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
                lines.append(f"  {dep['name']} {dep.get('version', '?')}: {vuln.get('id')} "
                             f"(fixed in: {fixes})")
        return 1, "\n".join(lines)
    audited = len(deps) - len(skipped)
    if audited == 0:
        return 0, (f"pip-audit: SKIPPED: the vulnerability service answered for none of the "
                   f"{len(deps)} locked packages (e.g. {skipped[0]['skip_reason']!r}); "
                   "nothing was audited" if skipped else "pip-audit: the lock lists no package")
    note = f" ({len(skipped)} unknown to the service: " + ", ".join(
        d["name"] for d in skipped) + ")" if skipped else ""
    return 0, f"pip-audit: {audited} locked packages audited, no known vulnerability{note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    parser.add_argument("--pip-audit", default=str(Path(sys.executable).parent / "pip-audit"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        # --no-deps --disable-pip: the lock pins every package, so nothing is resolved or
        # installed; only the service is asked (within pip-audit's own 15 s timeout each).
        result = subprocess.run(
            [args.pip_audit, "-r", str(args.lock), "--no-deps", "--disable-pip",
             "--progress-spinner", "off", "-f", "json", "-o", str(out)],
            capture_output=True, text=True, timeout=300, check=False)
        report = json.loads(out.read_text()) if out.is_file() else None
    if report is None:
        if any(marker in result.stderr for marker in UNREACHABLE):
            last = result.stderr.strip().splitlines()[-1][:200]
            print(f"pip-audit: SKIPPED: the vulnerability service could not be reached ({last})")
            return 0
        print(f"pip-audit failed (exit {result.returncode}):\n{result.stderr}", file=sys.stderr)
        return result.returncode or 1
    status, message = summarize(report)
    print(message)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Audit the virtualenv's dependencies for known vulnerabilities with pip-audit.

Usage: .venv/bin/python .ci/audit.py   (from the checkout; .ci/run calls it)

Exit 0: no known vulnerability, or the advisory database could not be reached (a notice says
so: an offline build is not a failed build). Exit 1: a dependency has a known vulnerability (each
is listed with its fix versions). The audit is bounded to about 30 seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TIMEOUT = 30  # seconds for the whole audit
PIP_AUDIT = Path(sys.executable).parent / "pip-audit"


def main() -> int:
    command = [
        str(PIP_AUDIT),
        "--local",  # this virtualenv's packages, as installed from pyproject.toml
        "--skip-editable",  # drkit itself
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--timeout",
        "10",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)  # noqa: S603 - fixed argv
    except subprocess.TimeoutExpired:
        return skipped(f"no answer within {TIMEOUT} s")
    except FileNotFoundError:
        return skipped(f"'{PIP_AUDIT}' is not installed (make venv installs it)")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        reason = (done.stderr.strip().splitlines() or ["no report"])[-1]
        return skipped(reason)
    dependencies = report.get("dependencies", [])
    audited = [d for d in dependencies if "skip_reason" not in d]
    if dependencies and not audited:  # every lookup failed: the service is out of reach
        return skipped("no dependency could be looked up")
    vulnerable = [d for d in audited if d.get("vulns")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            print(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    print(
        f"pip-audit: {len(audited)} dependencies audited,"
        f" {len(dependencies) - len(audited)} skipped, {len(vulnerable)} vulnerable"
    )
    return 1 if vulnerable else 0


def skipped(reason: str) -> int:
    print(f"notice: dependency audit skipped, advisory database unreachable ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

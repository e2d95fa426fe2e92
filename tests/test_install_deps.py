"""`make demo` and `make test` set up what they need on Debian 12 (scripts/install_deps.sh, the
step .ci/run takes too): nothing again once it is there, and a clear list when not root."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_deps.sh"


def run(*command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run(
        [*prefix, *command], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_make_demo_and_make_test_install_what_they_need_first() -> None:
    for target in ("demo", "test"):
        planned = run("make", "--no-print-directory", "--dry-run", target).stdout.splitlines()
        assert planned[0] == f"scripts/install_deps.sh {target}", planned
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/install_deps.sh test" in ci and "apt-get" not in ci


def test_with_everything_installed_it_installs_and_downloads_nothing() -> None:
    # This machine ran it (or .ci/run) already: no apt-get, no npm, no output
    for target in ("demo", "test"):
        result = run(str(SCRIPT), target)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "" and result.stderr == ""


def test_without_root_it_says_what_is_missing_and_how_to_install_it() -> None:
    result = run("env", "DRKIT_PG_CACHE=/nonexistent", str(SCRIPT), "test", user="postgres")
    assert result.returncode == 2
    assert "make test needs, on Debian 12:" in result.stderr
    assert "PostgreSQL builds in /nonexistent: 12 13 14 16 17" in result.stderr
    assert "HINT: as root, run 'scripts/install_deps.sh test'" in result.stderr
    assert run(str(SCRIPT), "demo", user="postgres").returncode == 0  # nothing missing
    assert run(str(SCRIPT), "bogus").returncode == 2

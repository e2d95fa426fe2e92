"""The README's first command, `make demo`, runs end to end: it must not rot unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_backs_up_restores_and_finds_every_table_identical() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every checksum verified" in result.stdout
    assert "identical: 5 tables in 1 databases" in result.stdout

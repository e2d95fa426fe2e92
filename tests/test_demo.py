"""The README's first command, `make demo`, runs end to end: it must not rot unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_backs_up_restores_finds_every_table_identical_and_drills() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every checksum verified" in result.stdout
    assert "identical: 5 tables in 1 databases" in result.stdout

    # It ends with a drill of that backup: its phases, RTO and RPO against the demo's targets
    drill = result.stdout[result.stdout.index("$ drkit drill --backup latest") :]
    lines = drill.splitlines()
    phases = [line.split()[0] for line in lines if re.match(r"^  \S+ +\d+\.\d+s", line)]
    assert phases == ["plan", "restore", "wal-replay+start", "checks", "teardown"], drill
    assert re.search(r"^RTO \S+ \(target 5m\): met$", drill, re.M), drill
    assert re.search(r"^RPO \S+ \(target 1h\): met$", drill, re.M), drill
    assert re.search(r"^  ok   amcheck ", drill, re.M), drill
    assert "record written to: local" in drill
    assert [line for line in lines if line in ("PASS", "FAIL")] == ["PASS"]

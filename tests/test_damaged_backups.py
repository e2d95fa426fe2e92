"""One damaged backup never hides the others: info lists them and marks it, restore's default
choice skips it (and names the newest intact backup when it was asked for), verify marks the
backups that depend on it as unrestorable."""

from __future__ import annotations

import json
from pathlib import Path

from rig.drkit import Drkit, start_restored
from rig.postgres import PgCluster


def _damage_manifest(dk: Drkit, label: str) -> None:
    manifest = dk.repo_path / "backup" / label / "manifest"
    manifest.chmod(0o600)
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))


def _backup(dk: Drkit, kind: str) -> str:
    label: str = json.loads(dk.ok("backup", "--type", kind, "--json").stdout)["label"]
    return label


def test_a_damaged_manifest_hides_nothing_else(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    full = _backup(dk, "full")
    pg.psql("INSERT INTO t SELECT g FROM generate_series(1001, 2000) g")
    incr = _backup(dk, "incr")
    pg.psql("INSERT INTO t SELECT g FROM generate_series(2001, 3000) g")
    newest = _backup(dk, "full")
    _damage_manifest(dk, newest)

    result = dk.run("info", "--json")
    assert result.exit_code == 13, result.output
    info = json.loads(result.stdout)
    assert [b["label"] for b in info["backups"]] == [full, incr]
    assert [d["label"] for d in info["damaged"]] == [newest]
    assert "authentication" in info["damaged"][0]["reason"]
    text = dk.run("info")
    assert text.exit_code == 13
    assert f"backup '{newest}' is DAMAGED" in text.stderr
    assert full in text.stdout and incr in text.stdout

    # Asked for by name: refused, and the error names the newest backup that restores
    named = dk.run("restore", "--pgdata", str(workdir / "named"), "--backup", newest)
    assert named.exit_code == 13, named.output
    assert f"HINT: the newest intact backup is '{incr}'" in named.stderr

    # The default choice skips it, says so, and restores the newest intact backup
    target = workdir / "restored"
    restored = dk.run("restore", "--pgdata", str(target), "--json")
    assert restored.exit_code == 109, restored.output  # BackupSkipped: an older one restored
    assert json.loads(restored.stdout)["label"] == incr
    assert f"backup '{newest}' skipped" in restored.stderr
    copy = start_restored(target, pg.version, workdir)
    assert copy.psql("SELECT count(*) FROM t") == "2000"


def test_verify_marks_backups_on_a_damaged_parent_unrestorable(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    full = _backup(dk, "full")
    incr = _backup(dk, "incr")
    _damage_manifest(dk, full)

    result = dk.run("verify", "--json")
    assert result.exit_code == 15, result.output
    report = {b["label"]: b for b in json.loads(result.stdout)["backups"]}
    assert not report[full]["ok"] and report[full]["damaged"][0]["path"] == "manifest"
    assert not report[incr]["ok"] and report[incr]["damaged"] == []
    assert report[incr]["unrestorable"] == f"backup '{full}', which it depends on, is damaged"
    text = dk.run("verify", "--backup", incr)  # the parent's last verification counts too
    assert text.exit_code == 15
    assert f"{incr}: " in text.stdout and "UNRESTORABLE" in text.stdout
    # Nothing to base an incremental on: the next one is a full backup, and says why
    after = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert after["type"] == "full" and after["notice"], after

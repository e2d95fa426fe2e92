"""The repository knows the key it is sealed with: a wrong key file is refused before anything
is written with it (backup, wal-push, init), and a verify with it records nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.crypto.keyfile import key_id_of


def _wrong(dk: Drkit, workdir: Path) -> Drkit:
    """Same cluster and repository as ``dk``, another key file."""
    other = workdir / "other"
    other.mkdir()
    return Drkit(dk.cluster, other, repo=dk.repo_path)


def _key_id(dk: Drkit) -> str:
    assert dk.keyfile is not None
    return key_id_of(dk.keyfile.read_bytes())


def _mismatch(line_source: str) -> str:
    """The key-id mismatch sentence of an error message."""
    found = re.search(r"data key was wrapped by keyfile key \S+, but the configured keyfile"
                      r" '[^']+' is key \S+", line_source)  # fmt: skip
    assert found, line_source
    return found.group(0)


def _segment(pg: PgCluster) -> Path:
    return next(p for p in sorted((pg.pgdata / "pg_wal").iterdir()) if len(p.name) == 24)


def test_wrong_key_file_is_refused_by_backup_wal_push_and_init(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    wrong = _wrong(dk, workdir)
    before = dk.repo_listing()

    restore = wrong.run("restore", "--pgdata", str(workdir / "restored"))
    assert restore.exit_code == 12
    expected = _mismatch(restore.stderr)
    assert _key_id(dk) in expected and str(wrong.keyfile) in expected

    backup = wrong.run("backup")
    assert backup.exit_code == 12, backup.output
    assert _mismatch(backup.stderr) == expected  # the message restore gives
    assert f"HINT: configure the key file whose key id is {_key_id(dk)}" in backup.stderr
    push = wrong.spawn("wal-push", str(_segment(pg)))
    _, push_err = push.communicate(timeout=60)
    assert push.returncode == 12, push_err
    assert _mismatch(push_err) == expected
    init = wrong.run("init")
    assert init.exit_code == 12, init.output
    assert _mismatch(init.stderr) == expected

    assert dk.repo_listing() == before  # nothing was written with the wrong key
    assert [b["type"] for b in dk.info()["backups"]] == ["full"]


def test_a_repository_without_a_recorded_key_is_accepted_and_init_records_it(
    pg: PgCluster, workdir: Path
) -> None:
    """A repository initialised before the key was recorded: backups go on as before; 'init'
    records the key once it has proved the key reads the newest backup."""
    dk = Drkit(pg, workdir)
    dk.ok("init")
    identity = dk.repo_path / "drkit-keys.json"
    assert json.loads(identity.read_text()) == {"provider": "keyfile", "key_id": _key_id(dk)}
    identity.unlink()  # as an older drkit left it
    dk.ok("backup")
    wrong = _wrong(dk, workdir)
    assert wrong.run("init").exit_code == 12  # it cannot read the newest backup: not recorded
    assert not identity.exists()
    dk.ok("init")
    assert json.loads(identity.read_text())["key_id"] == _key_id(dk)
    assert wrong.run("backup").exit_code == 12


def test_verify_with_the_wrong_key_records_nothing(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    wrong = _wrong(dk, workdir)
    for repository_knows_its_key in (True, False):
        if not repository_knows_its_key:
            (dk.repo_path / "drkit-keys.json").unlink()  # an older repository: no record
        before = dk.repo_listing()
        result = wrong.run("verify")
        assert result.exit_code == 12, result.output
        assert "DAMAGED" not in result.output
        assert _mismatch(result.stderr)
        assert dk.repo_listing() == before  # no verify record
    # The next incremental backup is still an incremental: nothing marked the full as bad
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["type"] == "incr", incr

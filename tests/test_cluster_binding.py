"""A backup belongs to one cluster: a backup of another cluster put into a repository (its host
shares the key, so it can seal one) is refused by restore and reported by verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster, PgFactory, database_checksums
from rig.vault import backup_label, restore_and_compare

from drkit.crypto.keyfile import KeyfileProvider
from drkit.errors import BackupSkipped, IntegrityError, VerifyFailed
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage


def test_a_backup_of_another_cluster_is_never_restored(
    pg: PgCluster, pg_factory: PgFactory, workdir: Path
) -> None:
    # Two clusters that share one key (a fleet key), each with its own repository.
    pg.psql("CREATE TABLE victim AS SELECT g FROM generate_series(1, 1000) g")
    for name in ("victim", "attacker"):
        (workdir / name).mkdir()
    victim = Drkit(pg, workdir / "victim")
    victim.ok("init")
    own = backup_label(victim, "--type", "full")
    expected = database_checksums(pg)

    other = pg_factory(pg.version)
    other.psql("CREATE TABLE planted AS SELECT 'from the other cluster' AS t")
    attacker = Drkit(other, workdir / "attacker", keyfile=victim.keyfile)
    attacker.ok("init")
    planted = backup_label(attacker, "--type", "full")
    assert planted > own

    # The other cluster's host writes its backup into the victim's repository: its key record
    # is signed by its own repository's signing key, for its own cluster, and is refused.
    shutil.copytree(attacker.repo_path / "backup" / planted, victim.repo_path / "backup" / planted)
    target = workdir / "restored"
    result = victim.run("restore", "--pgdata", str(target), "--backup", planted)
    assert result.exit_code == IntegrityError.exit_code, result.output
    assert "not by the repository's signing key" in result.stderr
    assert not target.exists()

    # With the shared key it can unseal the victim's signing key and sign its key record for
    # the victim's repository; the system identifier in the manifest still gives it away.
    record_path = victim.repo_path / "backup" / planted / "key" / "0001.json"
    record = json.loads(record_path.read_text())
    shared = KeyfileProvider(victim.keyfile)
    victims = Repository(PosixStorage(victim.repo_path, name="local"), shared)
    resigned = victims.auth.sign_key_record(record, shared.unwrap(record), "backup", planted)
    record_path.unlink()
    record_path.write_text(json.dumps(resigned))

    # Asked for by name: refused before anything is written.
    result = victim.run("restore", "--pgdata", str(target), "--backup", planted)
    assert result.exit_code == IntegrityError.exit_code, result.output
    assert f"backup '{planted}' in repository 'local' is of database system" in result.stderr
    assert "but the repository belongs to database system" in result.stderr
    assert f"HINT: the newest intact backup is '{own}'" in result.stderr
    assert not target.exists()

    # The default (latest) skips it, says so, and restores the victim's own backup.
    result = victim.run("restore", "--pgdata", str(target))
    assert result.exit_code == BackupSkipped.exit_code, result.output
    assert f"restored backup {own} from 'local'" in result.stdout
    assert f"warning: backup '{planted}' skipped" in result.stderr
    shutil.rmtree(target)

    result = victim.run("verify")
    assert result.exit_code == VerifyFailed.exit_code, result.output
    assert f"backup '{planted}'" in result.output and "is of database system" in result.output

    # The victim's own backup still restores, with the victim's data.
    restore_and_compare(victim, own, workdir / "own", expected)

"""Break glass: Vault is lost entirely, and the recovery key alone restores and verifies.

A backup taken before escrow was configured gets its escrow part from ``keys rewrap`` while
Vault is still there; after that, Vault (server, keys and all) is wiped, and restore and verify
with ``--recovery-key`` read both backups without any attempt to reach it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rig.drkit import Drkit
from rig.postgres import PgCluster, database_checksums
from rig.servers import OpenBaoServer, VaultServer
from rig.vault import VaultSetup, away_message, backup_label, key_record, restore_and_compare
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.crypto.vault import VaultSession
from drkit.errors import VaultError, WrongKey


def test_restore_and_verify_with_vault_gone(
    pg: PgCluster, workdir: Path, vault: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault, workdir)
    monkeypatch.setenv("VAULT_TOKEN", setup.token(setup.policy()))
    pg.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g")
    dk = Drkit(pg, workdir)
    setup.configure(dk)
    dk.ok("init")
    before_escrow = backup_label(dk)
    first_source = database_checksums(pg)

    # Escrow from now on
    offline = workdir / "offline"
    offline.mkdir()
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "recovery")])
    assert made.exit_code == 0, made.output
    public, recovery = offline / "recovery.pub", offline / "recovery.key"
    setup.configure(dk, escrow=public)
    pg.psql("UPDATE t SET h = 'later' WHERE g < 100")
    escrowed = backup_label(dk)
    second_source = database_checksums(pg)
    assert "escrow" in key_record(dk, escrowed)
    assert "escrow" not in key_record(dk, before_escrow)

    # The recovery key cannot read what was never escrowed; rewrap escrows it
    result = dk.run("verify", "--backup", before_escrow, "--recovery-key", str(recovery))
    assert result.exit_code == 12  # a key that cannot read it, not a damaged backup
    assert "has no escrow part" in json.dumps(result.stdout + result.stderr)
    status = json.loads(dk.ok("keys", "status", "--json").stdout)
    assert status["without_escrow"] == 2  # the backup, and the signing key init made
    rewrap = json.loads(dk.ok("keys", "rewrap", "--json").stdout)
    assert [
        (r["kind"], r["escrow_added"], r["from_version"], r["to_version"])
        for r in rewrap["rewrapped"]
    ] == [("backup", True, 1, 1), ("signer", True, 1, 1)]
    assert rewrap["rewrapped"][0]["name"] == before_escrow
    assert "escrow" in key_record(dk, before_escrow, 2)
    assert json.loads(dk.ok("keys", "status", "--json").stdout)["without_escrow"] == 0

    # Vault is lost: its process, its keys, everything
    vault.stop(wipe=True)
    if not isinstance(vault, OpenBaoServer):
        vault.stop()  # the compose server comes back empty after a wipe: make it away, too
    restore = dk.run("restore", "--pgdata", str(workdir / "nope"))
    assert restore.exit_code == VaultError.exit_code
    assert away_message(vault) in restore.stderr and "--recovery-key" in restore.stderr

    def no_vault(*args: object, **kwargs: object) -> None:
        raise AssertionError("a recovery-key operation tried to reach Vault")

    monkeypatch.setattr(VaultSession, "__init__", no_vault)
    verify = json.loads(dk.ok("verify", "--json", "--recovery-key", str(recovery)).stdout)
    assert verify["ok"] and [b["label"] for b in verify["backups"]] == [before_escrow, escrowed]
    restore_and_compare(
        dk, before_escrow, workdir / "first", first_source, "--recovery-key", str(recovery)
    )
    restore_and_compare(
        dk, escrowed, workdir / "second", second_source, "--recovery-key", str(recovery)
    )

    # Another recovery key is told apart
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "other")])
    assert made.exit_code == 0
    wrong = dk.run(
        "restore", "--pgdata", str(workdir / "wrong"), "--recovery-key", str(offline / "other.key")
    )
    assert wrong.exit_code == WrongKey.exit_code
    assert "escrowed to recovery key" in wrong.stderr
    assert not (workdir / "wrong").exists()

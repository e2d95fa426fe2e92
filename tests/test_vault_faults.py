"""Vault (OpenBao) faults where backup tests do not reach: the archive_command and a token that
dies in the middle of a backup. Each fault is one error line with a hint and exit 11; PostgreSQL
keeps the segment and retries (wal-push never acknowledges what it did not store); nothing
partial is left; the next run after the fault succeeds. (Backup and restore against an
unreachable, sealed or denying Vault: tests/test_vault_failures.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rig.archive import switch_wal
from rig.drkit import Drkit, Result
from rig.postgres import PgCluster
from rig.servers import OpenBaoServer, VaultServer
from rig.vault import VaultSetup, away_message

from drkit.config.settings import load_settings
from drkit.crypto.transit import VaultTransitProvider
from drkit.errors import VaultError
from drkit.repo.open import open_storage


def one_error(result: Result, message: str) -> None:
    assert result.exit_code == VaultError.exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    if lines and lines[0].startswith("drkit wal-push: "):
        # PostgreSQL's log gets one line: the error, its hint in parentheses
        assert len(lines) == 1 and message in lines[0] and "(hint: " in lines[0], lines
        return
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert any(line.startswith("HINT: ") for line in lines), result.stderr


def test_wal_push_under_vault_faults_acknowledges_nothing_it_did_not_store(
    pg: PgCluster, workdir: Path, vault: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault, workdir)
    token = setup.token(setup.policy())
    monkeypatch.setenv("VAULT_TOKEN", token)
    dk = Drkit(pg, workdir)
    setup.configure(dk)
    dk.ok("init")

    storage = open_storage(load_settings(dk.config).repo[0])

    def archived() -> list[str]:  # a listing: no key needed, so it works while Vault is away
        return [o.key.rsplit("/", 1)[-1] for o in storage.list("wal/")]

    def push(name: str) -> Result:
        return dk.run("wal-push", str(pg.pgdata / "pg_wal" / name))

    first = switch_wal(pg)
    assert push(first).exit_code == 0  # the WAL key period's data key exists from here
    faults: list[tuple[str, Any, Any, str]] = [
        ("unreachable", vault.stop, vault.start, away_message(vault)),
    ]
    if isinstance(vault, OpenBaoServer):
        faults.append(("sealed", vault.seal, vault.unseal, "is sealed"))
    for what, start_fault, end_fault, message in faults:
        name = switch_wal(pg)
        start_fault()
        try:
            one_error(push(name), message)
            assert name not in archived(), what  # not acknowledged, not stored
        finally:
            end_fault()
        assert push(name).exit_code == 0, what  # PostgreSQL's retry succeeds
        assert name in archived()

    # A token without the policy (403): refused the same way
    mount, key = setup.transit_mount, setup.transit_key
    policy = f"drkit-{setup.tag}-wal-none"
    vault.api(
        "POST",
        f"sys/policies/acl/{policy}",
        {"policy": f'path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}'},
    )
    monkeypatch.setenv("VAULT_TOKEN", setup.token(policy))
    name = switch_wal(pg)
    one_error(push(name), "Vault denied permission on")
    assert name not in archived()
    monkeypatch.setenv("VAULT_TOKEN", token)
    assert push(name).exit_code == 0
    assert dk.run("verify", "--wal").exit_code == 0


def test_a_token_revoked_in_the_middle_of_a_backup_fails_it_cleanly(
    pg: PgCluster, workdir: Path, vault: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain token (no login to fall back on) that dies after the backup has started — it
    expired, or someone revoked it: one error with a hint, no partial backup, and the next
    backup with a valid token succeeds."""
    setup = VaultSetup(vault, workdir)
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
    dk = Drkit(pg, workdir)
    good = setup.token(setup.policy())
    monkeypatch.setenv("VAULT_TOKEN", good)
    setup.configure(dk)
    dk.ok("init")
    before = dk.repo_listing()

    dying = setup.token(setup.policy(), renewable=False)
    monkeypatch.setenv("VAULT_TOKEN", dying)
    real = VaultTransitProvider.new_data_key

    def revoked_first(self: VaultTransitProvider) -> Any:
        vault.api("POST", "auth/token/revoke", {"token": dying})
        return real(self)

    monkeypatch.setattr(VaultTransitProvider, "new_data_key", revoked_first)
    result = dk.run("backup")
    one_error(result, "Vault rejected the token")
    assert dying not in result.output
    assert dk.repo_listing() == before  # nothing partial

    monkeypatch.setattr(VaultTransitProvider, "new_data_key", real)
    monkeypatch.setenv("VAULT_TOKEN", good)
    assert dk.info()["incomplete"] == []
    dk.ok("backup")
    dk.ok("verify")

"""Vault failures end to end: one clear error line and a hint, the right exit code, no secret in
the output, and the repository exactly as it was (nothing stored, no partial backup visible)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rig.drkit import Drkit, Result
from rig.postgres import PgCluster
from rig.servers import OpenBaoServer, VaultServer
from rig.vault import VaultSetup, away_message, backup_label

from drkit.errors import IntegrityError, KeyMaterialError, VaultError, WrongKey


def check_failure(
    dk: Drkit, result: Result, exit_code: int, message: str, before: dict[str, int]
) -> None:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert len(lines) == 2 and lines[1].startswith("HINT: "), result.stderr
    assert "Traceback" not in result.output
    assert dk.repo_listing() == before  # nothing stored, no leftovers of a partial backup


def test_vault_failures_change_nothing(
    pg: PgCluster, workdir: Path, vault: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault, workdir)
    token = setup.token(setup.policy())
    monkeypatch.setenv("VAULT_TOKEN", token)
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
    dk = Drkit(pg, workdir)
    setup.configure(dk)
    dk.ok("init")
    label = backup_label(dk)
    before = dk.repo_listing()
    target = workdir / "restored"
    outputs: list[str] = []

    def run(*args: str) -> Result:
        result = dk.run(*args)
        outputs.append(result.output)
        return result

    def restore() -> Result:
        result = run("restore", "--pgdata", str(target))
        assert not target.exists()
        return result

    # Vault unreachable
    vault.stop()
    try:
        away = away_message(vault)
        check_failure(dk, run("backup"), VaultError.exit_code, away, before)
        result = restore()
        check_failure(dk, result, VaultError.exit_code, away, before)
        assert "--recovery-key" in result.stderr
    finally:
        vault.start()

    # Vault sealed (503)
    if isinstance(vault, OpenBaoServer):
        vault.seal()
        try:
            check_failure(dk, run("backup"), VaultError.exit_code, "is sealed", before)
            check_failure(dk, restore(), VaultError.exit_code, "is sealed", before)
        finally:
            vault.unseal()

    # Permission denied (403): a policy that can only decrypt cannot back up, and vice versa
    mount, key = setup.transit_mount, setup.transit_key

    def token_for(name: str, rule: str) -> str:
        policy = f"drkit-{setup.tag}-{name}"
        vault.api("POST", f"sys/policies/acl/{policy}", {"policy": rule})
        return setup.token(policy)

    update = '{ capabilities = ["update", "read"] }'
    monkeypatch.setenv(
        "VAULT_TOKEN", token_for("decrypt", f'path "{mount}/decrypt/{key}" {update}')
    )
    result = run("backup")
    path = f"{mount}/datakey/plaintext/{key}"
    check_failure(dk, result, VaultError.exit_code, f"Vault denied permission on '{path}'", before)
    assert "docs/vault.md" in result.stderr
    monkeypatch.setenv("VAULT_TOKEN", token_for("datakey", f'path "{mount}/datakey/*" {update}'))
    check_failure(dk, restore(), VaultError.exit_code, "Vault denied permission on", before)
    monkeypatch.setenv("VAULT_TOKEN", token)

    # Wrong transit key name: a least-privilege token is denied the other key's path; a token
    # that may use any key of the mount learns that the key does not exist
    setup.configure(dk, transit_key="no-such-key")
    # The repository knows its key: a backup with another is refused before Vault is asked
    check_failure(dk, run("backup"), WrongKey.exit_code, "sealed with another key", before)
    result = run("init")  # init proves the configured key works first
    check_failure(
        dk,
        result,
        VaultError.exit_code,
        f"Vault denied permission on '{mount}/datakey/plaintext/no-such-key'",
        before,
    )
    assert "key names in [keys.vault]" in result.stderr
    monkeypatch.setenv("VAULT_TOKEN", token_for("mount", f'path "{mount}/*" {update}'))
    result = run("init")
    check_failure(
        dk, result, VaultError.exit_code, "transit key 'no-such-key' does not exist", before
    )
    check_failure(dk, restore(), WrongKey.exit_code, "wrapped by transit key", before)
    monkeypatch.setenv("VAULT_TOKEN", token)
    setup.configure(dk)

    # Tampered wrapped key
    record_path = dk.repo_path / "backup" / label / "key" / "0001.json"
    original = record_path.read_bytes()
    record = json.loads(original)
    prefix, body = record["ciphertext"].rsplit(":", 1)
    record["ciphertext"] = f"{prefix}:{body[:10]}{'A' if body[10] != 'A' else 'B'}{body[11:]}"
    record_path.chmod(0o600)
    record_path.write_text(json.dumps(record, sort_keys=True, indent=2))
    try:
        result = restore()
        check_failure(dk, result, IntegrityError.exit_code, "failed authentication", before)
        verify = run("verify", "--json")
        assert verify.exit_code == 15
        damaged = json.loads(verify.stdout)["backups"][0]["damaged"]
        assert damaged == [{"path": "manifest", "reason": damaged[0]["reason"]}]
        assert "failed authentication" in damaged[0]["reason"]
    finally:
        record_path.write_bytes(original)

    # Everything works again, and no output ever showed the token
    dk.ok("restore", "--pgdata", str(target))
    assert all(token not in text for text in outputs)
    assert KeyMaterialError.exit_code == VaultError.exit_code == 11

"""Rotation end to end: rotate -> new backups on v2 -> old backups still restore -> rewrap ->
``keys status`` shows no v1 dependency -> raise min_decryption_version -> everything still
restores and verifies. Data objects are never touched, old key records never rewritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from rig.drkit import Drkit
from rig.postgres import PgCluster, database_checksums
from rig.servers import VaultServer
from rig.vault import VaultSetup, backup_label, key_record, restore_and_compare

from drkit.errors import VaultError

ROTATE_POLICY = 'path "{mount}/keys/{key}/rotate" {{ capabilities = ["update"] }}\n'


def digests(dk: Drkit, part: str) -> dict[str, str]:
    """sha256 of every repository object whose key contains ``part``."""
    return {
        str(p.relative_to(dk.repo_path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dk.repo_path.rglob("*"))
        if p.is_file() and part in str(p.relative_to(dk.repo_path))
    }


def status(dk: Drkit) -> dict[str, Any]:
    return dict(json.loads(dk.ok("keys", "status", "--json").stdout))


def test_rotate_rewrap_and_raise_min_decryption_version(
    pg: PgCluster, workdir: Path, vault_server: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault_server, workdir)
    backup_token = setup.token(setup.policy())
    operator_token = setup.token(
        setup.policy(
            extra=ROTATE_POLICY.format(mount=setup.transit_mount, key=setup.transit_key),
            suffix="-operator",
        )
    )
    monkeypatch.setenv("VAULT_TOKEN", backup_token)
    pg.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g")
    dk = Drkit(pg, workdir)
    setup.configure(dk)
    dk.ok("init")
    old = backup_label(dk)
    old_source = database_checksums(pg)
    assert status(dk)["versions_needed"] == {"1": 2}  # the backup and the signing key

    # The backup host may not rotate; the operator may
    refused = dk.run("keys", "rotate")
    assert refused.exit_code == VaultError.exit_code
    assert "Vault denied permission on" in refused.stderr
    monkeypatch.setenv("VAULT_TOKEN", operator_token)
    rotated = dk.ok("keys", "rotate")
    assert "is now at version 2" in rotated.stdout and "drkit keys rewrap" in rotated.stdout
    monkeypatch.setenv("VAULT_TOKEN", backup_token)

    # New backups use v2; the old one still restores with v1
    pg.psql("UPDATE t SET h = 'changed' WHERE g % 7 = 0")
    new = backup_label(dk)
    assert key_record(dk, old)["ciphertext"].startswith("vault:v1:")
    assert key_record(dk, new)["ciphertext"].startswith("vault:v2:")
    report = status(dk)
    assert report["versions_needed"] == {"1": 2, "2": 1}
    assert report["may_raise_min_decryption_version_to"] == 1
    restore_and_compare(dk, old, workdir / "old-before", old_source)
    new_source = database_checksums(pg)

    # Rewrap: a new record for the old backup and the signing key only; data and old records
    # untouched
    data_before = digests(dk, "/data/")
    records_before = digests(dk, "/key/")
    dry = json.loads(dk.ok("keys", "rewrap", "--dry-run", "--json").stdout)
    assert [(r["kind"], r["new_record"]) for r in dry["rewrapped"]] == [
        ("backup", None),
        ("signer", None),
    ]
    assert dry["rewrapped"][0]["name"] == old
    text = dk.ok("keys", "rewrap", "--dry-run").stdout
    assert f"backup {old}: would rewrap v1 -> v2" in text
    assert "2 would rewrap, 1 already up to date" in text
    assert digests(dk, "/key/") == records_before
    rewrap = json.loads(dk.ok("keys", "rewrap", "--json").stdout)
    assert rewrap["up_to_date"] == 1 and rewrap["skipped"] == []
    moved, signer = rewrap["rewrapped"]
    assert (moved["name"], moved["from_version"], moved["to_version"]) == (old, 1, 2)
    assert moved["new_record"] == f"backup/{old}/key/0002.json"
    assert signer["new_record"] == "signer/key/0002.json"
    assert digests(dk, "/data/") == data_before
    after = digests(dk, "/key/")
    assert {k: v for k, v in after.items() if k in records_before} == records_before
    assert set(after) - set(records_before) == {moved["new_record"], signer["new_record"]}
    assert key_record(dk, old, 2)["ciphertext"].startswith("vault:v2:")
    again = json.loads(dk.ok("keys", "rewrap", "--json").stdout)
    assert again["rewrapped"] == [] and again["up_to_date"] == 3

    # Status: nothing needs v1 any more
    report = status(dk)
    assert report["versions_needed"] == {"2": 3}
    assert report["oldest_needed_version"] == 2
    assert report["may_raise_min_decryption_version_to"] == 2
    text = dk.ok("keys", "status").stdout
    assert "versions needed: v2 (3)" in text
    assert "min_decryption_version may be raised to 2" in text

    # Raise min_decryption_version: v1 is gone, every backup still reads
    setup.set_min_decryption_version(2)
    assert status(dk)["min_decryption_version"] == 2
    verify = json.loads(dk.ok("verify", "--json").stdout)
    assert verify["ok"] and len(verify["backups"]) == 2
    restore_and_compare(dk, old, workdir / "old-after", old_source)
    restore_and_compare(dk, new, workdir / "new-after", new_source)

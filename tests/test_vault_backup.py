"""End to end with Vault: real PostgreSQL, real OpenBao, the real CLI, data compared row by row.

Round trips with the transit and KV providers and every auth method, a token that runs out
during a backup, and no secret anywhere in the output or the repository.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from rig.drkit import Drkit, Result
from rig.postgres import PgCluster, database_checksums
from rig.servers import OpenBaoServer, VaultServer
from rig.vault import (
    TokenReviewStub,
    VaultSetup,
    assert_secrets_absent,
    backup_label,
    key_record,
    restore_and_compare,
)

from drkit.crypto.transit import VaultTransitProvider

SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric);
INSERT INTO accounts SELECT g, 'owner ' || g, (g * 7919) % 100000 / 100.0
  FROM generate_series(1, 30000) g;
CREATE TABLE notes (id serial PRIMARY KEY, body text);
INSERT INTO notes (body) SELECT repeat(md5(g::text), 20) FROM generate_series(1, 2000) g;
"""


def populate(pg: PgCluster) -> None:
    pg.psql(SCHEMA)
    pg.psql("CREATE DATABASE shop")
    pg.psql("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 5000) g", dbname="shop")


class Outputs:
    """Every command's output, to check for secrets at the end."""

    def __init__(self, dk: Drkit) -> None:
        self.dk = dk
        self.texts: list[str] = []

    def ok(self, *args: str) -> Result:
        result = self.dk.ok(*args)
        self.texts.append(result.output)
        return result


def dek_of(setup: VaultSetup, record: dict[str, Any]) -> bytes:
    answer = setup.server.api(
        "POST",
        f"{setup.transit_mount}/decrypt/{setup.transit_key}",
        {"ciphertext": record["ciphertext"]},
    )
    return base64.b64decode(answer["data"]["plaintext"])


def test_transit_round_trip_with_every_auth_method(
    pg: PgCluster, workdir: Path, vault_server: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault_server, workdir)
    policy = setup.policy()
    populate(pg)
    dk = Drkit(pg, workdir)
    out = Outputs(dk)

    # Token from the environment
    token = setup.token(policy)
    monkeypatch.setenv("VAULT_TOKEN", token)
    setup.configure(dk)
    out.ok("init")
    by_token = backup_label(dk)
    monkeypatch.delenv("VAULT_TOKEN")

    # AppRole
    role_id, secret_id_file = setup.approle(policy, secret_id_num_uses=0)
    approle = {"auth": "approle", "role_id": role_id, "secret_id_file": secret_id_file}
    setup.configure(dk, **approle)
    by_approle = backup_label(dk)

    # Kubernetes (its TokenReview endpoint runs here, which a container cannot reach)
    kubernetes: dict[str, Any] | None = None
    stub = TokenReviewStub() if isinstance(vault_server, OpenBaoServer) else None
    labels = [by_token, by_approle]
    try:
        if stub is not None:
            jwt_file = workdir / "sa-token"
            jwt_file.write_text(stub.jwt)
            mount = setup.kubernetes(policy, stub)
            kubernetes = {
                "auth": "kubernetes",
                "role": "backup",
                "jwt_file": jwt_file,
                "auth_mount": mount,
            }
            setup.configure(dk, **kubernetes)
            labels.append(backup_label(dk))
            assert any(r["token"] == stub.jwt for r in stub.reviews)
        source = database_checksums(pg)

        # Each backup restored with another auth method: one transit key serves all of them
        token_file = workdir / "vault-token"
        token_file.write_text(setup.token(policy))
        token_file.chmod(0o600)
        readers = [{"token_file": token_file}, kubernetes or approle, approle]
        for number, (label, reader) in enumerate(zip(labels, readers, strict=False)):
            setup.configure(dk, **reader)
            restore_and_compare(dk, label, workdir / f"restored-{number}", source)
        out.texts.append(dk.ok("verify", "--json").output)
        out.texts.append(dk.run("info", "--json").output)
    finally:
        if stub is not None:
            stub.close()

    records = [key_record(dk, label) for label in labels]
    assert all(r["provider"] == "vault-transit" for r in records)
    assert all(r["ciphertext"].startswith("vault:v1:") for r in records)
    secrets = [token, secret_id_file.read_text().strip(), token_file.read_text()]
    secrets += [dek_of(setup, r) for r in records]
    if stub is not None:
        secrets.append(stub.jwt)
    assert_secrets_absent(secrets, out.texts, dk.repo_path)


def test_kv_round_trip_after_the_secret_changes(
    pg: PgCluster, workdir: Path, vault_server: VaultServer
) -> None:
    setup = VaultSetup(vault_server, workdir)
    setup.enable_kv()
    token_file = workdir / "vault-token"
    token_file.write_text(setup.token(setup.policy(kv=True)))
    token_file.chmod(0o600)
    populate(pg)
    dk = Drkit(pg, workdir)
    setup.configure(dk, "vault-kv", token_file=token_file)
    dk.ok("init")
    first = backup_label(dk)
    first_source = database_checksums(pg)

    assert setup.write_kek() == 2  # the KEK changes; the first backup must stay readable
    pg.psql("DELETE FROM accounts WHERE id % 3 = 0")
    second = backup_label(dk)
    assert (key_record(dk, first)["version"], key_record(dk, second)["version"]) == (1, 2)

    restore_and_compare(dk, first, workdir / "restored", first_source)
    assert dk.ok("verify", "--json").stdout.count('"ok": true') == 3  # the report, both backups
    status = dk.ok("keys", "status").stdout
    assert "versions needed: v1 (2), v2 (1)" in status  # the first backup and the signing key


def test_token_running_out_during_a_backup(
    pg: PgCluster, workdir: Path, vault_server: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup's token expires between its login and the data key request: a renewable token
    is renewed in the background, an AppRole token past its max TTL is replaced by a new login.
    Only the timing is faked (a pause before the real request), Vault is real."""
    setup = VaultSetup(vault_server, workdir)
    policy = setup.policy()
    populate(pg)
    dk = Drkit(pg, workdir)

    real = VaultTransitProvider.new_data_key
    seen: list[dict[str, Any]] = []

    def slow_new_data_key(self: VaultTransitProvider) -> Any:
        time.sleep(7)  # more than twice the tokens' TTLs: a long backup, compressed
        data_key = real(self)
        seen.append({"logins": self.session.logins, "renewals": self.session.renewals})
        return data_key

    token = setup.token(policy, ttl="3s", renewable=True, explicit_max_ttl="5m")
    monkeypatch.setenv("VAULT_TOKEN", token)
    setup.configure(dk)
    dk.ok("init")
    monkeypatch.setattr(VaultTransitProvider, "new_data_key", slow_new_data_key)
    renewed = backup_label(dk)
    assert seen[-1]["logins"] == 1 and seen[-1]["renewals"] >= 2  # one token, kept alive
    monkeypatch.delenv("VAULT_TOKEN")

    role_id, secret_id_file = setup.approle(
        policy, token_ttl="2s", token_max_ttl="3s", secret_id_num_uses=0
    )
    setup.configure(dk, auth="approle", role_id=role_id, secret_id_file=secret_id_file)
    relogged = backup_label(dk)
    assert seen[-1]["logins"] >= 2  # past its max TTL the token was replaced by a new login
    source = database_checksums(pg)
    monkeypatch.setattr(VaultTransitProvider, "new_data_key", real)
    restore_and_compare(dk, relogged, workdir / "restored", source)
    assert dk.ok("verify", "--backup", renewed).exit_code == 0

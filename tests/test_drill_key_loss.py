"""Key loss for real: a drill with Vault (OpenBao) stopped restores with the escrow key alone,
queues its record on the host, and the next drill with Vault back writes it; the queue's
safety (private directory, private plain files, no links followed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import chown_to_server_user
from rig.servers import VaultServer
from rig.vault import VaultSetup, insecure_http
from test_drill import run_drill
from test_drill_records import make_record
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.drill.queue import RecordQueue
from drkit.errors import UnsafePathError


def test_key_loss_with_vault_stopped_queues_the_record_until_vault_is_back(
    pg_factory: Any, workdir: Path, vault: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault, workdir)
    token = setup.token(setup.policy())
    monkeypatch.setenv("VAULT_TOKEN", token)  # archive_command inherits it at the restart
    offline = workdir / "offline"
    offline.mkdir()
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "recovery")])
    assert made.exit_code == 0, made.output
    recovery = offline / "recovery.key"
    chown_to_server_user(recovery)  # the sandbox's wal-fetch reads it as the server user
    pg = pg_factory(15)
    dk = Drkit(pg, workdir)
    sandboxes = workdir / "sandboxes"
    sections: dict[str, dict[str, Any]] = {
        "drill": {"sandbox": sandboxes},
        "keys": {"provider": "vault-transit"},
        "keys.vault": {
            "addr": vault.addr,
            "timeout": 5,
            "transit_mount": setup.transit_mount,
            "transit_key": setup.transit_key,
            **insecure_http(vault),
        },
        "keys.escrow": {"public_key_file": offline / "recovery.pub"},
    }
    dk.write_config(**sections)
    dk.ok("init")
    enable_archiving(pg, dk, sections=sections)
    pg.psql("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 1000) g")
    dk.ok("backup")
    pg.psql("INSERT INTO orders SELECT g FROM generate_series(1001, 1500) g")
    wait_archived(pg, switch_wal(pg))
    scenario = workdir / "key-loss.toml"
    scenario.write_text(
        f'name = "key-loss"\n[survivors]\nvault = false\nrecovery_key = "{recovery}"\n'
    )

    vault.stop()
    try:
        code, out, stderr = run_drill(dk, "--scenario", str(scenario))
        listed = dk.run("drill", "list", "--json", "--recovery-key", str(recovery))
        without_key = dk.run("drill", "list")
    finally:
        vault.start()

    # Restored with the escrow key alone; the record could not be sealed, so it is queued
    record = out["record"]
    assert record["outcome"] == "PASS", record["reason"]
    assert record["wal_segments"] >= 1 and code == 114
    queue = sandboxes / "queued-records"
    queued = queue / f"{record['id']}.json"
    assert out["written"] == [] and out["queued"] == str(queued)
    assert f"drill record '{record['id']}' was not written (it cannot be sealed: " in stderr
    assert token not in stderr + json.dumps(out)
    assert stat.S_IMODE(queue.stat().st_mode) == 0o700
    assert stat.S_IMODE(queued.stat().st_mode) == 0o600
    assert json.loads(queued.read_text())["outcome"] == "PASS"
    # drill list shows it, from this host's queue, while Vault is gone: with the recovery key
    # the repositories are read too; without it they are a warning
    assert listed.exit_code == 0, listed.output
    shown = json.loads(listed.stdout)
    assert shown["drills"] == [] and shown["repositories"] == ["local"]
    assert [(d["id"], d["record"]["scenario"]) for d in shown["queued"]] == [
        (record["id"], "key-loss")
    ]
    assert without_key.exit_code == 103  # the repository could not be read without Vault
    [row] = [line for line in without_key.stdout.splitlines() if line.startswith(record["id"])]
    assert row.split()[-2:] == ["PASS", "QUEUED"] and "key-loss" in row

    # Vault is back: the next drill writes its own record and the queued one, sealed by Vault
    code, out, _ = run_drill(dk)
    assert code == 0, out["record"]["reason"]
    assert out["written"] == ["local"] and out["flushed"] == [record["id"]]
    assert not queued.exists()
    listed = dk.run("drill", "list", "--json")
    assert listed.exit_code == 0, listed.output
    shown = json.loads(listed.stdout)
    assert shown["queued"] == []
    by_id = {d["id"]: d for d in shown["drills"]}
    assert set(by_id) == {record["id"], out["record"]["id"]}
    assert by_id[record["id"]]["record"] == record  # the same record, now in the repository
    assert by_id[record["id"]]["repositories"] == ["local"]


def test_the_queue_takes_only_private_plain_files(tmp_path: Path) -> None:
    queue = RecordQueue(tmp_path)
    first, second = make_record(), make_record()
    path = queue.put(first)
    assert [q.record for q in queue.records()] == [first]
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700

    # A link planted in the queue is never followed
    (tmp_path / "elsewhere.json").write_text(second.model_dump_json())
    (path.parent / f"{second.id}.json").symlink_to(tmp_path / "elsewhere.json")
    entries = {q.id: q for q in queue.records()}
    assert entries[second.id].record is None
    assert "a symbolic link" in (entries[second.id].error or "")
    (path.parent / f"{second.id}.json").unlink()

    # A file others could have written is refused, as is a queue directory others can write
    path.chmod(0o644)
    with pytest.raises(UnsafePathError, match="not a private plain file"):
        queue.records()
    path.chmod(0o600)
    path.parent.chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        queue.records()

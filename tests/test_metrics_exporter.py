"""``drkit metrics --serve``, the exporter a CronJob layout runs beside its jobs: a remote-mode
configuration (no PGDATA) against an S3 repository (moto), scraped over HTTP like Prometheus
does. It serves the scheduler's families with the jobs' runs, sees WAL archiving stall, only
ever reads the repository, needs no more than a LOGIN role and a Vault policy that only
decrypts, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rig.drkit import DRKIT, Drkit, toml_value
from rig.faultproxy import S3FaultProxy
from rig.postgres import PgCluster, PgFactory
from rig.servers import S3Server, VaultServer
from rig.vault import VaultSetup
from test_remote import BACKUP_ROLE, create_backup_role, listen_on_tcp
from test_schedule import LoggedProcess, get

from drkit.schedule.metrics import FAMILIES

METRICS_ROLE = "drkit_metrics"


class Exporter(LoggedProcess):
    """``drkit metrics --serve`` as a process."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        super().__init__(
            subprocess.Popen(
                [*DRKIT, "metrics", "--serve", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        )

    def url(self, timeout: float = 60) -> str:
        started = self.wait_for(
            "start", lambda line: line.get("message") == "metrics exporter started", timeout
        )
        return f"http://{started['listen']}"


@pytest.fixture
def exporters() -> Iterator[list[Exporter]]:
    started: list[Exporter] = []
    yield started
    for exporter in started:
        exporter.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(f"{url}/metrics")
    assert status == 200, text
    found = {f.name for f in text_string_to_metric_families(text)}
    assert set(FAMILIES) <= found, set(FAMILIES) - found
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def write_config(dk: Drkit, endpoint: str, server: S3Server, bucket: str, **sections: Any) -> Path:
    """A remote-mode configuration with one S3 repository reached at ``endpoint``."""
    path = dk.workdir / f"drkit-{len(list(dk.workdir.glob('drkit-*.toml')))}.toml"
    postgres = {"mode": "remote", "host": "127.0.0.1", "port": dk.cluster.port, "user": BACKUP_ROLE}
    repo = {
        "name": "s3-eu",
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/main",
        "region": server.region,
        "endpoint_url": endpoint,
        "max_attempts": 2,
        "offsite": True,
    }
    parts = {"postgres": postgres, "keys": {"provider": "keyfile", "keyfile": dk.keyfile}}
    lines = [f"lock_path = {toml_value(dk.workdir / 'locks')}"]
    for name, values in {**parts, **sections}.items():
        lines += [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    lines += ["[[repo]]", *(f"{k} = {toml_value(v)}" for k, v in repo.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_exporter_serves_what_cronjobs_did_reading_only(
    pg_factory: PgFactory,
    workdir: Path,
    s3: S3Server,
    new_bucket: Callable[..., str],
    exporters: list[Exporter],
) -> None:
    pg: PgCluster = pg_factory(18)
    listen_on_tcp(pg)
    create_backup_role(pg)
    pg.psql(f"CREATE ROLE {METRICS_ROLE} LOGIN")  # may log in; no replication, no grant
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
    bucket = new_bucket("drkit-exporter")

    # What the CronJobs do: their own pods, each a drkit run that exits
    dk = Drkit(pg, workdir)
    dk.config = write_config(dk, s3.direct_endpoint_url, s3, bucket)
    dk.ok("init")
    dk.ok("backup", "--type", "full")
    assert dk.run("verify").exit_code == 0
    # archive_command's part, by hand: the segment just completed
    pg.psql("INSERT INTO t SELECT generate_series(1, 1000)")
    segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    pg.psql("SELECT pg_switch_wal()")
    dk.ok("wal-push", str(pg.pgdata / "pg_wal" / segment))
    pg.psql(f"ALTER ROLE {BACKUP_ROLE} NOLOGIN")  # the exporter does without the jobs' role

    # The exporter: the same configuration but its S3 requests go through a proxy that counts
    # them, its role only logs in, and a scrape is never answered from an earlier one
    with S3FaultProxy(s3.direct_endpoint_url) as proxy:
        config = write_config(
            dk, proxy.endpoint_url, s3, bucket, metrics={"listen": "127.0.0.1:0", "cache": "0s"}
        )
        env = {**s3.env(), "PATH": "/usr/bin:/bin", "DRKIT_POSTGRES__USER": METRICS_ROLE}
        exporter = Exporter(config, env)
        exporters.append(exporter)
        url = exporter.url()
        assert get(f"{url}/health/live")[0] == 200
        status, body = get(f"{url}/health/ready")
        assert status == 200, body
        assert json.loads(body)["checks"]["repository s3-eu"] == "ok"

        # The runs the CronJobs made, from the job records they left in the repository
        first = scrape(url)
        repo = (("repo", "s3-eu"),)
        for job in ("full", "verify"):
            labels = (("job", job), ("repo", "s3-eu"))
            assert first["drkit_job_last_success_timestamp_seconds", labels] > time.time() - 600
        assert first["drkit_backup_newest_age_seconds", repo] < 600
        assert first["drkit_backup_last_size_bytes", (("repo", "s3-eu"), ("type", "full"))] > 0
        assert first["drkit_verify_last_ok", repo] == 1
        assert first["drkit_repository_size_bytes", repo] > 0
        # The server's WAL position, through the LOGIN-only role: nothing is missing
        assert first["drkit_wal_archive_lag_segments", repo] == 0
        assert first["drkit_wal_archive_lag_seconds", repo] == 0

        # WAL archiving stalls (nothing archives here): the lag grows with every WAL switch
        for _ in range(3):
            pg.psql("INSERT INTO t SELECT generate_series(1, 1000); SELECT pg_switch_wal()")
        stalled = scrape(url)
        assert stalled["drkit_wal_archive_lag_segments", repo] == 3
        assert stalled["drkit_wal_archive_lag_seconds", repo] > 0

        # Read-only: listings, reads and HEADs, never a write; read-only credentials suffice
        methods = {request.split()[0] for request in proxy.seen}
        assert "GET" in methods and methods <= {"GET", "HEAD"}, proxy.seen

        # SIGTERM: a clean stop, exit 0
        exporter.process.send_signal(signal.SIGTERM)
        assert exporter.process.wait(timeout=15) == 0, "".join(exporter.raw)
        exporter._reader.join(5)
        assert any(line.get("message") == "metrics exporter stopped" for line in exporter.lines)


def test_serve_and_textfile_together_are_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DRKIT, "metrics", "--serve", "--textfile", str(tmp_path / "drkit.prom"),
         "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "--serve and --textfile cannot be used together" in result.stderr
    assert "HINT:" in result.stderr
    assert not (tmp_path / "drkit.prom").exists()


READ_ONLY_TRANSIT = """
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
"""


def test_a_vault_policy_that_only_decrypts_is_enough_for_the_metrics(
    pg_factory: PgFactory, workdir: Path, vault: VaultServer
) -> None:
    """The exporter's Vault policy of docs/kubernetes.md (decrypt and read the key, never make a
    data key): every metric that needs a key is there; without decrypt they are not."""
    pg: PgCluster = pg_factory(18)
    setup = VaultSetup(vault, workdir)
    token_file = workdir / "vault-token"
    token_file.write_text(setup.token(setup.policy()))  # the jobs' policy
    token_file.chmod(0o600)
    dk = Drkit(pg, workdir)
    setup.configure(dk, token_file=token_file)
    dk.ok("init")
    dk.ok("backup", "--type", "full")
    assert dk.run("verify").exit_code == 0

    def metrics_with(policy: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        name = f"drkit-{setup.tag}-{policy}"
        text = policy_text[policy].format(mount=setup.transit_mount, key=setup.transit_key)
        vault.api("POST", f"sys/policies/acl/{name}", {"policy": text})
        token_file.write_text(setup.token(name))
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(dk.ok("metrics").stdout)
            for s in family.samples
        }

    policy_text = {
        "read-only": READ_ONLY_TRANSIT,
        "no-decrypt": 'path "{mount}/keys/{key}" {{ capabilities = ["read"] }}\n',
    }
    found = metrics_with("read-only")
    repo = (("repo", "local"),)
    assert found["drkit_backup_last_size_bytes", (("repo", "local"), ("type", "full"))] > 0
    assert found["drkit_verify_last_ok", repo] == 1  # its record's signature checked
    [(labels, version)] = [(k[1], v) for k, v in found.items() if k[0] == "drkit_key_version"]
    assert dict(labels)["provider"] == "vault-transit" and version == 1
    denied = metrics_with("no-decrypt")
    assert ("drkit_backup_last_size_bytes", (("repo", "local"), ("type", "full"))) not in denied

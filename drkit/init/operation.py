"""Initialize drkit for a cluster: check PostgreSQL's settings, prove the key works, create the
repositories. Safe to run again: existing repositories of the same cluster are left as they are."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from drkit.codec.frame_reader import unseal
from drkit.codec.frame_writer import seal
from drkit.config.settings import Settings, config_path
from drkit.errors import (
    ArchivingFailing,
    ConfigError,
    DataChecksumsOff,
    DrkitWarning,
    PostgresError,
)
from drkit.pg.archiver import ARCHIVING_HINT, ArchiverStats, archiving_problem
from drkit.pg.remote_access import check_remote_access
from drkit.pg.remote_files import FILE_FUNCTIONS, file_functions
from drkit.pg.session import ClusterInfo, PgSession
from drkit.repo.identity import check_identity, read_identity, record_identity
from drkit.repo.open import open_key_provider, open_repository
from drkit.repo.repository import Repository
from drkit.repo.signer import copy_signer
from drkit.result import OperationResult


@dataclass
class Check:
    level: str  # "ok" or "notice"; what needs attention is a warning on the result
    message: str


@dataclass
class InitReport(OperationResult):
    """What init checked and created. Warnings: DataChecksumsOff, ArchivingFailing.
    ``phases``: cluster (settings read and checked), keys (the provider proven), repositories."""

    system_identifier: int
    pg_version_num: int
    checks: list[Check] = field(default_factory=list)
    repositories: dict[str, str] = field(default_factory=dict)  # name -> "created" | "exists"

    def _data(self) -> dict[str, Any]:
        return {
            "system_identifier": str(self.system_identifier),
            "pg_version_num": self.pg_version_num,
            "checks": [asdict(c) for c in self.checks],
            "repositories": self.repositories,
        }


def initialize(settings: Settings, config: Path | None = None) -> InitReport:
    """Check the cluster's settings, prove the key provider works, create (or confirm) every
    repository. ``config``: the configuration file the suggested archive_command names."""
    return InitOperation(settings, config).run()


class InitOperation:
    def __init__(self, settings: Settings, config: Path | None = None) -> None:
        self.settings = settings
        self.config = config_path(config)  # the archive_command it suggests names this file

    def run(self) -> InitReport:
        # Check the cluster's settings
        with PgSession(self.settings.postgres) as session:
            remote, lacking, until = None, [], "stop with exit 41"
            if self.settings.postgres.mode == "remote":
                remote = check_remote_access(session, self.settings.postgres)
                # diff/incr before 17 read files over SQL, and from 17 on while the server keeps
                # no WAL summaries (then a full is taken instead): a full needs none of them
                needed = file_functions(session.version_num(), incremental=True)
                if not needed and not session.summarize_wal():
                    needed = FILE_FUNCTIONS
                    until = "be full backups while summarize_wal is off"
                lacking = session.missing_remote_privileges(needed)
            cluster = session.cluster_info()
            archiver = session.archiver_stats()
        report = InitReport(cluster.system_identifier, cluster.version_num)
        with report.phase("cluster"):
            report.checks = self._check_cluster(cluster, remote)
            if lacking:
                report.checks.append(
                    Check(
                        "notice",
                        f"diff and incr backups will {until} until the role is granted"
                        f" (docs/remote.md): {'; '.join(lacking)}",
                    )
                )
            if not cluster.data_checksums:
                report.warnings.append(
                    DataChecksumsOff(
                        "data checksums are off: damaged pages cannot be detected during backup",
                        hint="enable them with pg_checksums --enable on the stopped cluster",
                    )
                )

        # Prove the key provider can wrap and unwrap a data key
        with report.phase("keys"):
            self._check_keys()
        report.checks.append(Check("ok", f"key provider '{self.settings.keys.provider}' works"))

        # Create (or confirm) every repository, and record (or compare) the key it is sealed with
        repos = []
        with report.phase("repositories"):
            for repo_settings in self.settings.repo:
                repo = open_repository(self.settings, repo_settings.name)
                created = repo.initialize(cluster.system_identifier)
                self._record_key(repo)
                report.repositories[repo.name] = "created" if created else "exists"
                repos.append(repo)

            # Give every repository the cluster's signing key: the primary's, the same bytes
            signer = repos[0].auth.signer()
            for repo in repos[1:]:
                copy_signer(repos[0].storage, repo.storage)
        report.checks.append(
            Check(
                "ok",
                f"signing key {signer.verifier.fingerprint} (keep it with the escrow key:"
                " [keys.escrow] signers)",
            )
        )

        # Say whether archive_command works (it may have failed only for want of a repository)
        created = "created" in report.repositories.values()
        report.warnings += _archiving_warnings(cluster, archiver, created)
        return report

    @staticmethod
    def _record_key(repo: Repository) -> None:
        """Refuse a key other than the repository's; record it where none is recorded yet (a
        repository of an older drkit) once it has unwrapped the newest backup's key record."""
        check_identity(repo.storage, repo.keys)
        if read_identity(repo.storage) is None:
            if backups := repo.backups():
                repo.load_dek(backups[-1])  # WrongKey: this is not the key the backups need
            record_identity(repo.storage, repo.keys)

    def _check_cluster(self, cluster: ClusterInfo, remote: str | None) -> list[Check]:
        if cluster.wal_level == "minimal":
            raise PostgresError(
                "wal_level is 'minimal': online backups need 'replica' or 'logical'",
                hint="set wal_level = replica in postgresql.conf and restart PostgreSQL",
            )
        if cluster.max_replication_slots < 1:
            raise PostgresError(
                "max_replication_slots is 0: drkit keeps a backup's WAL with a temporary slot",
                hint="set max_replication_slots = 10 (the default) and restart PostgreSQL",
            )
        if self.settings.postgres.mode == "local":
            self._check_pgdata(cluster)
        checks = [
            Check(
                "ok",
                f"PostgreSQL {server_version(cluster.version_num)},"
                f" system {cluster.system_identifier}",
            ),
            *([Check("ok", remote)] if remote else []),
            Check("ok", f"wal_level = {cluster.wal_level}"),
            Check(
                "ok",
                f"max_replication_slots = {cluster.max_replication_slots}: a backup keeps its WAL"
                " with a temporary slot",
            ),
        ]
        if cluster.data_checksums:  # else a warning
            checks.append(Check("ok", "data checksums are on: pages are verified while backed up"))
        if cluster.archive_mode == "off" or not cluster.archive_command:
            checks.append(
                Check(
                    "notice",
                    "WAL archiving is off: every backup restores on its own, but point-in-time"
                    " recovery needs archive_mode = on (a restart) and archive_command ="
                    f" '{wal_push_command(self.config)}'",
                )
            )
        else:
            checks.append(Check("ok", f"archive_command = '{cluster.archive_command}'"))
        return checks

    def _check_pgdata(self, cluster: ClusterInfo) -> None:
        pgdata = self.settings.postgres.local_pgdata()
        assert cluster.data_directory is not None  # PgSession requires it in local mode
        if pgdata.resolve() != cluster.data_directory.resolve():
            raise ConfigError(
                f"postgres.pgdata is '{pgdata}' but the server's data_directory is"
                f" '{cluster.data_directory}'"
            )
        if not os.access(pgdata, os.R_OK | os.X_OK):
            raise ConfigError(f"PGDATA '{pgdata}' is not readable by this user")

    def _check_keys(self) -> None:
        provider = open_key_provider(self.settings.keys)
        data_key = provider.new_data_key()
        probe = seal(b"drkit", data_key.plaintext, b"init-probe")
        if unseal(probe, provider.unwrap(data_key.record), b"init-probe") != b"drkit":
            raise ConfigError("the key provider returned a different data key than it wrapped")


def _archiving_warnings(
    cluster: ClusterInfo, archiver: ArchiverStats, created: bool
) -> list[DrkitWarning]:
    """An archive_command that is configured but failing is worth more than an 'ok' line.
    ``created``: a repository was created just now, which may be all archiving lacked."""
    if cluster.archive_mode == "off" or not cluster.archive_command:
        return []
    problem = archiving_problem(archiver)
    if not problem:
        return []
    hint = ARCHIVING_HINT
    if created:
        hint = (
            "if it failed only because the repository did not exist yet, PostgreSQL's next"
            " attempt (within a minute) succeeds; 'drkit check' proves it"
        )
    return [ArchivingFailing(problem, hint=hint)]


def server_version(version_num: int) -> str:
    """server_version_num as PostgreSQL writes the version: 150020 -> '15.20'."""
    return f"{version_num // 10000}.{version_num % 10000}"


def wal_push_command(config: Path) -> str:
    """The archive_command for this installation: PostgreSQL runs it as its own user, with
    neither this shell's PATH nor its DRKIT_CONFIG, so both paths are absolute."""
    drkit = Path(sys.executable).parent / "drkit"
    return f"{shlex.quote(str(drkit))} wal-push --config {shlex.quote(str(config.absolute()))} %p"

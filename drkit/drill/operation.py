"""`drkit drill`: prove a backup restores, measure the RTO and RPO, record the result.

A drill runs the path a disaster restore runs, nothing shorter: the restore operation fetches,
decrypts, decompresses and checks every file from the repositories the scenario leaves, into a
sandbox; a throwaway PostgreSQL starts on it, fetches WAL with ``drkit wal-fetch`` from those
same repositories, replays to the target and is promoted; then the checks run. The clock starts
when the drill starts and stops when the checks are done: that is the achieved RTO, split into
phases. The achieved RPO is the disaster instant minus the newest commit the copy holds.

Every outcome is a record, written into every repository: PASS, or FAIL with the kind of failure
(restore failed, a check failed, a target missed) and the reason. Nothing fails with a traceback,
and the sandbox is removed whatever happens (unless ``keep``): the server is stopped and the
directory deleted in a ``finally``, and SIGTERM/SIGINT are turned into an exception so that the
``finally`` runs then too.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from drkit import __version__
from drkit.config.drill import Checks
from drkit.config.settings import Settings
from drkit.drill.checks import run_checks
from drkit.drill.judge import judge, objective, rpo_seconds
from drkit.drill.plan import (
    RestorePlan,
    choose_restore_point,
    planned_manifest,
    source_places,
    spec_from,
    surviving_settings,
)
from drkit.drill.queue import record_drill
from drkit.drill.result import DrillRequest, DrillResult
from drkit.drill.rpo import Recovered, exposure, measure_recovered
from drkit.drill.sandbox import DrillInterrupted, Sandbox, create_sandbox, reuse_sandbox
from drkit.drill.scenario import RestorePointSpec, Survivors
from drkit.errors import (
    ConfigError,
    DrillRestoreFailed,
    DrkitError,
    DrkitWarning,
)
from drkit.interrupts import interruptible
from drkit.logs import event
from drkit.pg.binaries import find_bindir
from drkit.pg.cluster import Cluster
from drkit.progress import Progress
from drkit.repo.drills import (
    CheckResult,
    DrillKind,
    DrillOutcome,
    DrillRecord,
    FailureKind,
    Phase,
    RestorePoint,
    RpoDetail,
    new_drill_id,
)
from drkit.repo.manifest import Manifest
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.restore.operation import RestoreOperation, RestoreResult
from drkit.restore.plan import predict_restore, wal_range
from drkit.restore.request import RestoreRequest

log = logging.getLogger(__name__)


class _Failed(Exception):
    """Ends the drill's steps early with a FAIL of ``kind``."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def run_drill(
    settings: Settings, request: DrillRequest, progress: Progress | None = None
) -> DrillResult:
    return DrillOperation(settings, request, progress).run()


class DrillOperation:
    def __init__(
        self, settings: Settings, request: DrillRequest, progress: Progress | None = None
    ) -> None:
        self.settings = settings
        self.request = request
        self.progress = progress
        scenario = request.scenario
        self.survivors = scenario.survivors if scenario else Survivors()
        self.checks: Checks = (scenario.checks if scenario else None) or settings.drill.checks
        targets = scenario.targets if scenario else None
        self.rto_target = request.rto or (targets.rto if targets else None) or settings.drill.rto
        self.rpo_target = request.rpo or (targets.rpo if targets else None) or settings.drill.rpo
        # filled in by the steps
        self.phases: list[Phase] = []
        self.plan: RestorePlan | None = None
        self.manifest: Manifest | None = None
        self.allowed: Settings | None = None
        self.sandbox: Sandbox | None = None
        self.cluster: Cluster | None = None
        self.restored: RestoreResult | None = None
        self.recovered: Recovered | None = None
        self.check_results: list[CheckResult] = []
        self.pg_version: str | None = None
        self.segments = 0
        self.teardown_problems: list[str] = []
        self.predicted: float | None = None
        self.planned_repo: str | None = None

    def run(self) -> DrillResult:
        started_at = datetime.now(UTC)
        drill_id = new_drill_id(started_at)
        disaster = (
            self.request.scenario.disaster_time if self.request.scenario else None
        ) or started_at
        clock = time.monotonic()
        failure: _Failed | None = None
        rto_seconds: float | None = None
        event(log, f"drill {drill_id} started", drill=drill_id)
        with interruptible(DrillInterrupted):
            try:
                try:
                    # Plan: the surviving repositories, the restore point and its backup, and
                    # the sandbox: a fresh private directory outside the source, with room
                    with self._phase("plan"):
                        self._plan()
                        self._make_sandbox(drill_id)

                    # Restore: the real restore operation, into the sandbox
                    with self._phase("restore"):
                        self._restore()

                    # Start the copy: replay WAL from the surviving repositories, promote
                    with self._phase("wal-replay+start"):
                        self._start()

                    # Checks: the recovered point, then every configured check
                    with self._phase("checks"):
                        self._measure_rpo(disaster)
                        self.check_results = run_checks(
                            self._running(),
                            self.checks,
                            heartbeat_at=self.recovered.heartbeat_at if self.recovered else None,
                            disaster_time=disaster,
                            rpo_target=self.rpo_target,
                        )
                    rto_seconds = time.monotonic() - clock
                except _Failed as exc:
                    failure = exc
                except ConfigError:
                    raise  # a bad request or scenario: nothing was drilled, no record
                except Exception as exc:  # a FAIL with its reason, never a traceback
                    log.debug("drill: unexpected error", exc_info=True)
                    came_up = self.cluster is not None and self.cluster.is_running()
                    kind = FailureKind.CHECK_FAILED if came_up else FailureKind.RESTORE_FAILED
                    failure = _Failed(kind, f"unexpected error: {exc!r}")
            finally:
                # Teardown: stop the server, remove the sandbox (not part of the RTO)
                with self._phase("teardown"):
                    self._teardown()

        # Judge against the targets, then record the drill in every repository
        record = self._record(drill_id, started_at, disaster, rto_seconds, failure)
        result = DrillResult(
            record=record,
            sandbox=self.sandbox.root
            if self.sandbox and (self.request.keep or self.sandbox.reused)
            else None,
            delta=self.restored.delta if self.restored else None,
            phases={p.name: p.seconds for p in self.phases},
        )
        # (or queue it on this host when none can take it: the next drill writes it)
        recorded = record_drill(self.settings, record)
        result.written, result.warnings = recorded.written, recorded.warnings
        result.queued, result.flushed = recorded.queued, recorded.flushed
        event(
            log,
            f"drill {drill_id} ended: {record.outcome}",
            drill=drill_id,
            outcome=str(record.outcome),
            failure=str(record.failure) if record.failure else None,
        )
        return result

    # -- steps -------------------------------------------------------------------------------

    def _plan(self) -> None:
        """The surviving repositories, then the restore point and its manifest from the first
        of them that can serve it (the restore falls back across them the same way)."""
        try:
            self.allowed = surviving_settings(self.settings, self.survivors)
        except DrillRestoreFailed as exc:
            raise _Failed(FailureKind.RESTORE_FAILED, f"plan: {exc.message}") from None
        spec, origin = self._spec()
        problems = []
        for repo_settings in self.allowed.repo:
            try:
                repo = open_repository(self.allowed, repo_settings.name)
                repo.check()
                self.plan = choose_restore_point(repo, spec, origin)
                self.manifest = planned_manifest(repo, self.plan)
            except ConfigError:
                raise  # a bad request or scenario: an error to fix, not a drill that failed
            except DrkitError as exc:
                problems.append(f"repository '{repo_settings.name}': {exc.message}")
                continue
            self.planned_repo = repo.name
            self.predicted = self._predict(repo)
            return
        raise _Failed(FailureKind.RESTORE_FAILED, "plan: " + "; ".join(problems))

    def _predict(self, repo: Repository) -> float | None:
        """`restore --plan`'s expected seconds until the copy is promoted, from the drills
        before this one, recorded to compare with what this one achieves."""
        assert self.allowed is not None and self.plan is not None and self.manifest is not None
        repos = [repo, *(open_repository(self.allowed, r.name) for r in self.allowed.repo[1:])]
        warnings: list[DrkitWarning] = []
        try:
            wal = wal_range(repo, self.manifest, self.plan.target)
            prediction, _ = predict_restore(repos, repo.name, self.manifest, wal, warnings)
        except DrkitError as exc:  # no prediction is no reason to stop the drill
            log.warning("drill: no prediction: %s", exc.message)
            return None
        for warning in warnings:
            log.warning("drill: no prediction from it: %s", warning.message)
        return prediction.seconds if prediction else None

    def _spec(self) -> tuple[RestorePointSpec, str]:
        r = self.request
        try:
            given = spec_from(
                backup=r.backup,
                time=r.target_time,
                name=r.target_name,
                lsn=r.target_lsn,
                xid=r.target_xid,
                random_point=r.random,
            )
        except ValueError as exc:
            raise ConfigError(f"invalid restore point: {_first_error(exc)}") from None
        if given is not None:
            return given, "requested"
        if r.scenario is not None:
            return r.scenario.restore, f"scenario '{r.scenario.name}'"
        return RestorePointSpec(), "default"

    def _make_sandbox(self, drill_id: str) -> None:
        assert self.manifest is not None
        manifest = self.manifest
        forbidden = source_places(self.settings)
        forbidden += [Path(ts.location) for ts in manifest.tablespaces if ts.location]
        # The restored files, and WAL: the backup's own plus room for a few segments in flight
        needed = manifest.stats.size + 8 * manifest.wal_segment_size
        try:
            if self.settings.drill.reuse_sandbox and not self.request.keep:
                self.sandbox = reuse_sandbox(
                    self.settings.drill.sandbox,
                    forbidden=forbidden,
                    needed_bytes=needed,
                    server_user=manifest.owner or None,
                    tablespaces={ts.oid for ts in manifest.tablespaces},
                )
                if self.sandbox is None:
                    log.warning("drill: another drill uses the reusable sandbox; using a new one")
            if self.sandbox is None:
                self.sandbox = create_sandbox(
                    self.settings.drill.sandbox,
                    f"drill-{drill_id}",
                    forbidden=forbidden,
                    needed_bytes=needed,
                    server_user=manifest.owner or None,
                )
        except (DrkitError, OSError) as exc:
            raise _Failed(FailureKind.RESTORE_FAILED, f"sandbox: {_message(exc)}") from None

    def _restore(self) -> None:
        assert self.plan is not None and self.sandbox is not None and self.allowed is not None
        assert self.manifest is not None
        sandbox, allowed = self.sandbox, self.allowed
        request = RestoreRequest(
            pgdata=sandbox.pgdata,
            backup=self.plan.backup,
            repo=self.planned_repo,
            tablespace_map={
                str(ts.oid): sandbox.tablespace(ts.oid) for ts in self.manifest.tablespaces
            },
            target=self.plan.target,
            config=self.request.config,
            # restore's own drkit wal-fetch: with the recovery key it hands recovery only the
            # WAL period keys it needs, never the key itself
            wal_repos=self._restricted_repos() or [],
            archive_mode="off",
            delta=sandbox.reused,  # checksums, never timestamps: the checks need an exact copy
        )
        try:
            self.restored = RestoreOperation(allowed, request, self.progress).run()
        except DrkitError as exc:
            raise _Failed(FailureKind.RESTORE_FAILED, f"restore: {exc.message}") from None

    def _start(self) -> None:
        assert self.sandbox is not None and self.manifest is not None
        sandbox = self.sandbox
        timeout = self.settings.drill.timeout.total_seconds()
        try:
            sandbox.prepare_server_files()
            self.cluster = Cluster(
                pgdata=sandbox.pgdata,
                bindir=find_bindir(self.manifest.pg_major, self.settings.postgres.bindir),
                socket_dir=sandbox.socket_dir,
                log_file=sandbox.log_file,
                settings=sandbox.server_settings(),
                listen_addresses="",
                dbuser=self.settings.postgres.user,
            )
            started = time.monotonic()
            self.cluster.start(timeout=timeout)
            self.cluster.wait_promoted(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except (DrkitError, OSError) as exc:
            reason = _first_line(_message(exc))
            said = sandbox.server_said()
            raise _Failed(
                FailureKind.RESTORE_FAILED, f"start: {reason}" + (f": {said}" if said else "")
            ) from None
        finally:
            self.segments = sandbox.segments_restored()

    def _measure_rpo(self, disaster: datetime) -> None:
        assert self.manifest is not None
        cluster = self._running()
        try:
            self.recovered = measure_recovered(
                cluster, self.settings, disaster, self.manifest.stop_time
            )
            with cluster.connect() as conn:
                row = conn.execute("SHOW server_version").fetchone()
                self.pg_version = str(row[0]) if row else None
        except psycopg.Error as exc:
            raise _Failed(
                FailureKind.CHECK_FAILED, f"the restored copy cannot be queried: {exc}"
            ) from None

    def _teardown(self) -> None:
        """Stop the server and remove the sandbox; what fails is logged and noted in the
        teardown phase (the drill's verdict stands: the copy was measured already)."""
        if self.cluster is not None:
            try:
                self.cluster.stop("fast" if self.request.keep else "immediate")
            except DrkitError as exc:
                self.teardown_problems.append(f"server not stopped: {_first_line(exc.message)}")
        if self.sandbox is not None and self.sandbox.reused:
            self.sandbox.release()
        elif self.sandbox is not None and self.request.keep:
            self.sandbox.keep()
        elif self.sandbox is not None:
            try:
                self.sandbox.remove()
            except OSError as exc:
                self.teardown_problems.append(f"sandbox '{self.sandbox.root}' not removed: {exc}")
        for problem in self.teardown_problems:
            log.error("drill teardown: %s", problem)

    # -- judging and recording ---------------------------------------------------------------

    def _record(
        self,
        drill_id: str,
        started_at: datetime,
        disaster: datetime,
        rto_seconds: float | None,
        failure: _Failed | None,
    ) -> DrillRecord:
        detail = self.recovered.detail if self.recovered else RpoDetail(disaster_time=disaster)
        verdict = judge(
            restore_failure=(failure.kind, failure.reason) if failure else None,
            checks=self.check_results,
            rto=objective(self.rto_target, rto_seconds),
            rpo=objective(self.rpo_target, rpo_seconds(disaster, detail.recovered_time)),
        )
        scenario = self.request.scenario
        plan, manifest = self.plan, self.manifest
        return DrillRecord(
            id=drill_id,
            kind=scenario.kind if scenario else DrillKind.RESTORE_TEST,
            scenario=scenario.name if scenario else None,
            scenario_digest=scenario.digest or None if scenario else None,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            started_by=self.request.started_by,
            host=socket.gethostname(),
            drkit_version=__version__,
            pg_version=self.pg_version,
            system_identifier=int(manifest.system_identifier) if manifest else None,
            repository=self.restored.repo if self.restored else None,
            repositories_allowed=[r.name for r in self.allowed.repo] if self.allowed else [],
            restore_point=RestorePoint(
                backup=self.restored.label
                if self.restored
                else (manifest.label if manifest else "-"),
                target_kind=plan.target.kind.value,
                target_value=plan.target.value,
                reason=plan.reason,
                time=plan.time,
            )
            if plan
            else None,
            phases=self.phases,
            rto=verdict.rto,
            rpo=verdict.rpo,
            rpo_detail=detail,
            exposure=exposure(self._reading_settings(), datetime.now(UTC)),
            checks=self.check_results,
            restored_bytes=self.restored.size if self.restored else 0,
            wal_segments=self.segments,
            predicted_seconds=self.predicted,
            outcome=DrillOutcome.FAIL if verdict.failure else DrillOutcome.PASS,
            failure=verdict.failure,
            reason=verdict.reason,
        )

    # -- helpers -----------------------------------------------------------------------------

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            detail = ""
            if name == "restore" and self.restored is not None:
                detail = ", ".join(f"{k} {v:.1f}s" for k, v in self.restored.phases.items())
                if (delta := self.restored.delta) is not None:
                    detail += (
                        f"; by delta into the reused sandbox: {delta.unchanged} files unchanged,"
                        f" {delta.rewritten} rewritten, {delta.patched} in part"
                    )
            elif name == "wal-replay+start":
                detail = f"{self.segments} WAL segments fetched from the archive"
            elif name == "teardown":
                detail = "; ".join(self.teardown_problems)
            self.phases.append(Phase(name=name, seconds=time.monotonic() - started, detail=detail))

    def _restricted_repos(self) -> list[str] | None:
        """The surviving repositories for ``wal-fetch --repo``, or None when every configured
        one survives: plain wal-fetch then reads them all, in the same order, and starts
        faster (without --repo it reads a simple configuration without the full loader)."""
        assert self.allowed is not None
        survivors = [r.name for r in self.allowed.repo]
        return None if survivors == [r.name for r in self.settings.repo] else survivors

    def _reading_settings(self) -> Settings:
        """Every configured repository, read with the drill's keys (the recovery key alone when
        the scenario loses the key provider, which is then never contacted)."""
        if self.allowed is None:
            return self.settings
        return self.settings.model_copy(update={"keys": self.allowed.keys})

    def _running(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster


def _message(exc: BaseException) -> str:
    if isinstance(exc, DrkitError):
        return exc.message
    return str(exc)


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", e)) for e in errors())
    return str(exc)

"""Fixtures for drkit's tests: real PostgreSQL 15/18 clusters, S3 and Vault.

Fixtures (see the docstrings below for contracts):

- ``pg`` -> started ``PgCluster``, parametrized over PostgreSQL versions (ids ``pg15``, ``pg18``)
- ``pg_factory`` -> ``make(version, conf=None, *, start=True) -> PgCluster`` for extra clusters
- ``workdir`` -> fresh directory the ``postgres`` user can traverse (repos, restore targets, config)
- ``s3_server`` / ``vault_server`` (session) -> the raw servers, shared by a worker's tests
- ``s3`` / ``vault`` -> the same servers, guaranteed up (and S3 emptied) for this test; use these
  in tests that stop, wipe or seal them
- ``new_bucket`` -> ``make(prefix, object_lock=False)``: a fresh S3 bucket, the environment set
- ``rig_root`` (session) -> this worker's scratch root under /tmp, removed at the end

Environment knobs (read once at import, before the per-test scrub):

- ``DRKIT_TEST_PG_VERSIONS``: e.g. ``15`` or ``15,18`` (default: both)
- ``DRKIT_TEST_PROVIDER``: ``local`` | ``docker`` | ``auto`` (default; docker if ``docker info``
  works)
- ``DRKIT_TEST_KEEP=1``: keep the scratch root (and print its path) for debugging
- ``DRKIT_PG_CACHE``: where ``scripts/fetch_pg_versions.sh`` put PostgreSQL 13, 14, 16 and 17
  (default ``/var/cache/drkit-pg``; tests/test_versions.py runs on them)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

# tests/ on sys.path so the rig imports as ``rig`` whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rig.postgres import (
    PgCluster,
    PgFactory,
    clone_cluster,
    make_rig_dir,
    make_template,
    stop_clusters_under,
)
from rig.servers import (
    ComposeOpenBaoServer,
    ComposeS3Server,
    MotoS3Server,
    OpenBaoServer,
    S3Server,
    VaultServer,
    free_port,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRUB_PREFIXES = ("DRKIT_", "AWS_", "VAULT_", "BAO_", "PG")


def _pg_versions() -> list[int]:
    raw = os.environ.get("DRKIT_TEST_PG_VERSIONS", "15,18")
    versions = [int(v) for v in raw.replace(" ", "").split(",") if v]
    if not versions:
        raise pytest.UsageError("DRKIT_TEST_PG_VERSIONS names no version")
    return versions


PG_VERSIONS = _pg_versions()
PROVIDER_CHOICE = os.environ.get("DRKIT_TEST_PROVIDER", "auto")
KEEP_ROOT = os.environ.get("DRKIT_TEST_KEEP", "") not in ("", "0")


# -- hooks ----------------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that needs a cluster carries the ``pg`` marker, so ``-m "not pg"`` is a quick run.
    for item in items:
        if {"pg", "pg_factory"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pg)


# -- environment ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's DRKIT_*, AWS_*, VAULT_*/BAO_* or PG* variables."""
    for name in list(os.environ):
        if name.startswith(SCRUB_PREFIXES):
            monkeypatch.delenv(name)


# -- scratch space -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rig_root() -> Iterator[Path]:
    """Per-worker scratch root ``/tmp/drkit-test-<worker>-XXXX`` (0755, traversable by postgres).

    Teardown immediate-stops every PostgreSQL still running from under it, then deletes it.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    root = Path(tempfile.mkdtemp(prefix=f"drkit-test-{worker}-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        stop_clusters_under(root)
        if KEEP_ROOT:
            print(f"\n[rig] kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(rig_root: Path) -> Iterator[Path]:
    """A fresh directory (mode 0755, owned by the server user) for repositories, restore targets
    and config files. Things root creates inside it stay root's: hand them over with
    ``rig.postgres.chown_to_server_user`` when PostgreSQL (e.g. archive_command) must write there.
    Removed after the test, after stopping any cluster left running inside it."""
    parent = rig_root / "work"
    parent.mkdir(mode=0o755, exist_ok=True)
    path = make_rig_dir(parent, "w-")
    yield path
    stop_clusters_under(path)
    if not KEEP_ROOT:
        shutil.rmtree(path, ignore_errors=True)


# -- PostgreSQL ----------------------------------------------------------------------------------


class _Templates:
    """initdb once per version per session (per xdist worker), lazily."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[int, Path] = {}

    def get(self, version: int) -> Path:
        if version not in self._made:
            self._made[version] = make_template(version, self.root)
        return self._made[version]


@pytest.fixture(scope="session")
def pg_templates(rig_root: Path) -> _Templates:
    return _Templates(rig_root)


@pytest.fixture
def pg_factory(pg_templates: _Templates, rig_root: Path) -> Iterator[PgFactory]:
    """``make(version, conf=None, *, start=True) -> PgCluster``: a fresh clone of the version's
    template with its own system identifier, ``conf`` written after the rig defaults. Every
    cluster made is stopped and deleted after the test."""
    made: list[PgCluster] = []

    def make(
        version: int, conf: Mapping[str, object] | None = None, *, start: bool = True
    ) -> PgCluster:
        cluster = clone_cluster(pg_templates.get(version), version, rig_root, conf)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in reversed(made):
        if KEEP_ROOT:
            cluster.stop("immediate")  # keep data and log for a post-mortem
        else:
            cluster.cleanup()


@pytest.fixture(params=PG_VERSIONS, ids=[f"pg{v}" for v in PG_VERSIONS])
def pg(request: pytest.FixtureRequest, pg_factory: PgFactory) -> PgCluster:
    """A started, empty cluster per version in ``DRKIT_TEST_PG_VERSIONS``; gone after the test."""
    version: int = request.param
    return pg_factory(version)


# -- S3 and Vault: one interface, two providers --------------------------------------------------


def _docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.fixture(scope="session")
def rig_provider() -> str:
    """``"docker"`` or ``"local"``: which provider serves ``s3_server`` and ``vault_server``."""
    if PROVIDER_CHOICE == "local":
        return "local"
    available = _docker_engine_available()
    if PROVIDER_CHOICE == "docker" and not available:
        pytest.fail("DRKIT_TEST_PROVIDER=docker but no Docker engine answers `docker info`")
    return "docker" if available else "local"


# pytest-docker configuration (only instantiated when the docker provider is chosen).


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(REPO_ROOT / "docker-compose.test.yml")


@pytest.fixture(scope="session")
def compose_ports() -> dict[str, int | str]:
    """Host ports (picked now, on 127.0.0.1) and the Vault token that docker-compose.test.yml
    interpolates from TESTRIG_* variables. Not DRKIT_-prefixed so the per-test scrub keeps them."""
    values: dict[str, int | str] = {
        "TESTRIG_MINIO_PORT": free_port(),
        "TESTRIG_BAO_PORT": free_port(),
        "TESTRIG_PG15_PORT": free_port(),
        "TESTRIG_PG18_PORT": free_port(),
        "TESTRIG_BAO_TOKEN": f"rig-{os.getpid()}",
    }
    os.environ.update({k: str(v) for k, v in values.items()})
    return values


@pytest.fixture(scope="session")
def docker_setup(compose_ports: dict[str, int | str]) -> list[str]:
    return ["up --wait"]  # depends on compose_ports so the variables exist before `up`


def _compose(request: pytest.FixtureRequest) -> Callable[[str], Any]:
    services = request.getfixturevalue("docker_services")
    executor: Any = services._docker_compose  # pytest-docker's DockerComposeExecutor
    return lambda subcommand: executor.execute(subcommand)


@pytest.fixture(scope="session")
def s3_server(
    request: pytest.FixtureRequest, rig_provider: str, rig_root: Path
) -> Iterator[S3Server]:
    """S3 endpoint for the whole session (moto locally, MinIO under Docker). Shared: tests that
    stop or wipe it should use ``s3`` instead."""
    if rig_provider == "docker":
        ports = request.getfixturevalue("compose_ports")
        yield ComposeS3Server(_compose(request), int(ports["TESTRIG_MINIO_PORT"]))
        return
    server = MotoS3Server(log_dir=rig_root / "moto")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def vault_server(
    request: pytest.FixtureRequest, rig_provider: str, rig_root: Path
) -> Iterator[VaultServer]:
    """Vault API (OpenBao dev server) for the whole session, root token in ``root_token``.
    Shared: tests that stop, wipe or seal it should use ``vault`` instead."""
    if rig_provider == "docker":
        ports = request.getfixturevalue("compose_ports")
        compose = _compose(request)
        token = str(ports["TESTRIG_BAO_TOKEN"])
        yield ComposeOpenBaoServer(compose, int(ports["TESTRIG_BAO_PORT"]), token)
        return
    server = OpenBaoServer(log_dir=rig_root / "bao")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """``s3_server``, up and empty at the start of the test, and up again after it."""
    s3_server.start()
    s3_server.reset()
    yield s3_server
    s3_server.start()


@pytest.fixture
def new_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``make(prefix="drkit", object_lock=False) -> name``: a fresh bucket on ``s3_server``. From
    the first call on, the test's environment holds the server's credentials and endpoint, as
    drkit run in-process, spawned drkit commands and a restored server's wal-fetch read them."""

    def make(prefix: str = "drkit", *, object_lock: bool = False) -> str:
        for name, value in s3_server.env().items():
            monkeypatch.setenv(name, value)
        bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3_server.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=object_lock)
        return bucket

    return make


@pytest.fixture
def vault(vault_server: VaultServer) -> Iterator[VaultServer]:
    """``vault_server``, up and unsealed for the test, and again after it. State is not reset
    (mounts and keys persist within the session): use unique mount paths and key names."""
    vault_server.start()
    yield vault_server
    vault_server.start()
    if vault_server.health().get("sealed"):
        vault_server.unseal()


@pytest.fixture
def pg_container(request: pytest.FixtureRequest, rig_provider: str) -> Callable[[int], str]:
    """Docker provider only: ``dsn(version)`` for the stock postgres:15 / postgres:18 containers,
    for connection-level tests (settings checks). Backups and restores use ``pg``: drkit reads
    PGDATA from the filesystem and starts restored clusters with local binaries."""
    if rig_provider != "docker":
        pytest.skip("needs the docker provider (no Docker engine here)")
    request.getfixturevalue("docker_services")
    ports = request.getfixturevalue("compose_ports")

    def dsn(version: int) -> str:
        port = ports[f"TESTRIG_PG{version}_PORT"]
        return f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    return dsn

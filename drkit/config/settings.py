"""Typed settings: one precedence order, flags > DRKIT_* environment > drkit.toml > defaults.

The sections live beside it: repositories, retention and copies in drkit/config/repos.py, the
scheduler's in schedule.py, drills' in drill.py, reports' in report.py.

Nested keys are reached from the environment with a double underscore, e.g.
``DRKIT_POSTGRES__PGDATA=/srv/pg`` or ``DRKIT_BACKUP__PROCESS_MAX=4``. The list of repositories is
configured in the file (``[[repo]]``) or as JSON in ``DRKIT_REPO``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from drkit.config.drill import DrillSettings, HeartbeatSettings
from drkit.config.lease import LeaseSettings
from drkit.config.report import ReportSettings
from drkit.config.repos import CopiesSettings, RepoSettings, RetentionSettings
from drkit.config.repos import PosixRepo as PosixRepo  # re-exported: users import them from here
from drkit.config.repos import S3ObjectLock as S3ObjectLock
from drkit.config.repos import S3Repo as S3Repo
from drkit.config.schedule import MetricsSettings, NotifySettings, ScheduleSettings
from drkit.config.sources import EnvironmentValueError, deep_merge, environment_values
from drkit.errors import ConfigError
from drkit.private_dir import default_lock_path

DEFAULT_CONFIG = Path("/etc/drkit/drkit.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PostgresSettings(_Section):
    mode: Literal["local", "remote"] = Field(
        "local",
        description="'local': drkit reads PGDATA on the database host; 'remote': it takes the"
        " data over a replication connection (docs/remote.md)",
    )
    pgdata: Path | None = Field(
        None, description="data directory of the cluster (local mode: must be readable by drkit)"
    )
    dsn: str | None = Field(None, description="libpq connection string; overrides host/port/user")
    host: str = "/var/run/postgresql"
    port: int = Field(5432, ge=1, le=65535)
    user: str = "postgres"
    dbname: str = "postgres"
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        Field(None, description="libpq sslmode; verify-full checks the CA and the host name")
    )
    sslrootcert: Path | None = Field(
        None, description="CA certificate(s) the server's must chain to"
    )
    sslcert: Path | None = Field(
        None, description="TLS client certificate, for pg_hba.conf's 'cert' method"
    )
    sslkey: Path | None = Field(
        None,
        description="its private key (libpq wants mode 0600, or 0640 or less owned by root)",
    )
    passfile: Path | None = Field(
        None,
        description="password file in libpq's .pgpass format, mode 0600 (or PGPASSFILE); a"
        " password never goes into the configuration or a command line",
    )
    bindir: Path | None = Field(
        None,
        description="directory of the PostgreSQL server binaries (pg_ctl, postgres); searched"
        " before the usual places",
    )

    @model_validator(mode="after")
    def _pgdata_when_local(self) -> PostgresSettings:
        if self.mode == "local" and self.pgdata is None:
            raise ValueError("postgres.pgdata is required in local mode (or set mode = 'remote')")
        return self

    def local_pgdata(self) -> Path:
        """PGDATA, for what only runs on the database host; ConfigError in remote mode."""
        if self.pgdata is None:
            raise ConfigError(
                "this command reads the cluster's data directory, and postgres.pgdata is not set",
                hint="run it on the database host with a configuration in local mode",
            )
        return self.pgdata

    def conninfo(self) -> str:
        """libpq's connection string; TLS and passfile settings are added to a ``dsn`` too."""
        fields: dict[str, object | None] = {
            "sslmode": self.sslmode,
            "sslrootcert": self.sslrootcert,
            "sslcert": self.sslcert,
            "sslkey": self.sslkey,
            "passfile": self.passfile,
        }
        given = {k: str(v) for k, v in fields.items() if v is not None}
        if self.dsn and "://" in self.dsn:  # a URI takes its extra settings as query parameters
            separator = "&" if "?" in self.dsn else "?"
            return self.dsn + (separator + urlencode(given, quote_via=quote) if given else "")
        if not self.dsn:
            given = {"host": self.host, "port": str(self.port), "user": self.user,
                     "dbname": self.dbname, **given}  # fmt: skip
        extra = " ".join(f"{k}={_conninfo_value(v)}" for k, v in given.items())
        return " ".join(part for part in (self.dsn, extra) if part)


def _conninfo_value(value: object) -> str:
    """A value quoted as libpq's conninfo parser reads it."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


class VaultSettings(_Section):
    """Where Vault is, how drkit logs in, and which key it uses (docs/vault.md)."""

    addr: str = Field(description="Vault address, e.g. https://vault.internal:8200")
    allow_insecure_http: bool = Field(
        False,
        description="accept an http:// address on a loopback interface (a local agent or a test"
        " server); tokens and data keys would otherwise cross the network in clear",
    )
    ca_cert: Path | None = Field(None, description="CA bundle that signed Vault's certificate")
    namespace: str | None = None
    timeout: float = Field(30, gt=0, description="seconds per Vault request")
    auth: Literal["token", "approle", "kubernetes"] = "token"
    # token auth: DRKIT_KEYS__VAULT__TOKEN, else VAULT_TOKEN, else token_file (re-read on expiry)
    token: SecretStr | None = Field(default_factory=lambda: _env_secret("VAULT_TOKEN"))
    token_file: Path | None = None
    role_id: str | None = None  # approle
    secret_id_file: Path | None = None  # approle
    role: str | None = None  # kubernetes
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")  # kubernetes
    auth_mount: str | None = Field(None, description="auth mount path (default: the method name)")
    transit_mount: str = "transit"
    transit_key: str = "drkit"
    kv_mount: str = "secret"
    kv_path: str | None = None
    kv_field: str = "key"

    @model_validator(mode="after")
    def _auth_complete(self) -> VaultSettings:
        if self.auth == "approle" and (self.role_id is None or self.secret_id_file is None):
            raise ValueError("auth 'approle' needs keys.vault.role_id and secret_id_file")
        if self.auth == "kubernetes" and self.role is None:
            raise ValueError("auth 'kubernetes' needs keys.vault.role")
        _check_vault_addr(self.addr, self.allow_insecure_http)
        return self


def _check_vault_addr(addr: str, allow_insecure_http: bool) -> None:
    """Refuses an address over which a token or a plaintext data key would travel unencrypted:
    only https, or http to a loopback address when explicitly allowed."""
    parts = urlsplit(addr)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"addr '{addr}' is not an https:// address, e.g. https://vault:8200")
    if not allow_insecure_http:
        raise ValueError(
            f"addr '{addr}' would send Vault tokens and data keys unencrypted; use https://"
            " (for a local agent or test server on a loopback address: allow_insecure_http = true)"
        )
    if not _is_loopback(parts.hostname):
        raise ValueError(
            f"addr '{addr}' is plain http to a host that is not loopback; use https://"
            " (allow_insecure_http covers only 127.0.0.0/8, ::1 and localhost)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EscrowSettings(_Section):
    public_key_file: Path | None = Field(
        None,
        description="recovery public key (drkit keys escrow-init); every DEK is also wrapped to it",
    )
    signers: list[str] = Field(
        default_factory=list,
        description="fingerprints of the repositories' signing keys (drkit keys status prints"
        " them) that a restore with the recovery key trusts; empty: each repository's own",
    )
    accept_unsigned: bool = Field(
        False,
        description="with the recovery key, also read key records written before signing keys"
        " existed (drkit keys rewrap signs them)",
    )

    @field_validator("signers")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"[0-9a-f]{32}", item):
                raise ValueError(f"{item!r} is not a signing key fingerprint (32 hex characters)")
        return value


class KeysSettings(_Section):
    provider: Literal["keyfile", "vault-transit", "vault-kv"] = "keyfile"
    keyfile: Path | None = None
    vault: VaultSettings | None = None
    escrow: EscrowSettings = EscrowSettings(public_key_file=None)
    recovery_key: Path | None = Field(
        None,
        description="read with this recovery private key instead (--recovery-key); the "
        "provider, Vault included, is then never contacted",
    )

    @model_validator(mode="after")
    def _provider_configured(self) -> KeysSettings:
        if self.provider == "keyfile" and self.keyfile is None:
            raise ValueError("provider 'keyfile' needs keys.keyfile = '/path/to/key'")
        if self.provider.startswith("vault-") and self.vault is None:
            raise ValueError(f"provider '{self.provider}' needs a [keys.vault] section")
        if self.provider == "vault-kv" and self.vault is not None and self.vault.kv_path is None:
            raise ValueError("provider 'vault-kv' needs keys.vault.kv_path")
        return self


class BackupSettings(_Section):
    compress_level: int = Field(3, ge=-7, le=22, description="zstd level")
    process_max: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64)
    start_fast: bool = Field(False, description="request an immediate checkpoint at backup start")
    bundle_limit: int = Field(
        2 * 1024 * 1024, ge=0, description="files smaller than this are bundled together"
    )
    bundle_size: int = Field(
        32 * 1024 * 1024, ge=1024 * 1024, description="target size of one bundle object"
    )
    segment_size: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    chunk_size: int = Field(
        16 * 1024 * 1024,
        ge=1024 * 1024,
        multiple_of=8192,
        description="large files are compressed in independent chunks of this size, which a"
        " restore decodes in parallel",
    )
    direct_io: bool = Field(
        True,
        description="read relation files of 1 MiB or more with O_DIRECT: no copy through the page"
        " cache (less CPU) and no eviction of the database's cached pages (also what restore"
        " --delta compares); a restore writes the chunks of large files with it",
    )
    wal_summaries: bool = Field(
        True,
        description="diff/incr on PostgreSQL 17+ with summarize_wal = on: read only the blocks"
        " the server's WAL summaries say changed, not whole changed files",
    )
    wal_scan: bool = Field(
        True,
        description="diff/incr when the server keeps no WAL summaries (PostgreSQL 15-16, or"
        " summarize_wal off): read the WAL since the parent started, from pg_wal or else the"
        " archive, and read only the blocks it names, not whole changed files",
    )
    scan_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="with WAL summaries or wal_scan, still read a relation file whole (XOR"
        " deltas, a whole-file checksum) when they say more than this fraction of the parent's"
        " blocks of it changed (0: any changed file; 1: never)",
    )
    wal_summary_wait: float = Field(
        60.0, ge=0, description="seconds to wait for the WAL summarizer to reach the backup's start"
    )
    xor_deltas: bool = Field(
        True,
        description="diff/incr that scan changed files: store each changed page XORed with the"
        " parent's version of it (rebuilt from the repository), which compresses to a fraction",
    )


class ArchiveSettings(_Section):
    """WAL archiving (drkit wal-push / wal-fetch); docs/wal-archiving.md.

    drkit/wal/config.py reads this section without pydantic on wal-push's fast path: keep its
    defaults and bounds in step (tests/test_wal_config.py compares the two loaders).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    async_: bool = Field(
        False, alias="async", description="push through a spool and a background pusher"
    )
    spool_path: Path | None = Field(
        None, description="async status files (default: <lock_path>/spool-<hash of pgdata>)"
    )
    process_max: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        le=64,
        description="parallel pushes of the async pusher, parallel fetches of the prefetcher",
    )
    # Level 1: WAL is pushed on the database's critical path and must keep up with peak write
    # rates. On pgbench WAL level 1 stores 10.6% of the input against 10.0% at level 3, for 12
    # instead of 17.5 ms of CPU per 16 MiB segment (docs/wal-archiving.md).
    compress_level: int = Field(1, ge=-7, le=22, description="zstd level for WAL")
    key_period: Literal["daily", "hourly"] = Field("daily", description="one WAL DEK per period")
    push_timeout: float = Field(
        60, gt=0, description="seconds an async archive_command waits for its segment"
    )
    fetch_ahead: int = Field(
        8,
        ge=0,
        le=64,
        description="segments 'wal-fetch --prefetch' fetches ahead of recovery (0: none)",
    )


class LogSettings(_Section):
    """An optional log file: JSON lines, appended, rotated by logrotate (docs/operations.md)."""

    path: Path | None = Field(None, description="log file (created 0600, never through a symlink)")
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseModel):
    """Every setting, validated (defaults too); ``load_settings`` gathers them from the flags,
    the environment and the file (drkit/config/sources.py)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    postgres: PostgresSettings
    keys: KeysSettings
    repo: list[RepoSettings] = Field(min_length=1)
    backup: BackupSettings = BackupSettings()
    archive: ArchiveSettings = Field(default_factory=lambda: ArchiveSettings.model_validate({}))
    lock_path: Path = Field(
        default_factory=default_lock_path,
        description="private directory for host-local lock files (default: /run/drkit for root,"
        " ~/.drkit otherwise)",
    )
    retention: RetentionSettings | None = Field(
        None, description="retention of every repository without its own (drkit prune)"
    )
    copies: CopiesSettings = CopiesSettings()
    drill: DrillSettings = DrillSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    report: ReportSettings = Field(default_factory=ReportSettings)
    log: LogSettings = LogSettings()
    lease: LeaseSettings = Field(default_factory=lambda: LeaseSettings.model_validate({}))
    schedule: ScheduleSettings = Field(default_factory=lambda: ScheduleSettings.model_validate({}))
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings.model_validate({}))
    notify: NotifySettings = Field(default_factory=lambda: NotifySettings.model_validate({}))

    @property
    def require_321(self) -> bool:
        """Whether 3-2-1 is expected: as configured, else when there is more than one
        repository (a single repository is a choice, not a permanent warning)."""
        if self.copies.require_321 is not None:
            return self.copies.require_321
        return len(self.repo) > 1

    @field_validator("repo")
    @classmethod
    def _unique_names(cls, repos: list[RepoSettings]) -> list[RepoSettings]:
        names = [r.name for r in repos]
        if len(set(names)) != len(names):
            raise ValueError(f"repository names must be unique, got {names}")
        return repos


def config_path(config: Path | None) -> Path:
    """The configuration file in effect: --config, else $DRKIT_CONFIG, else the default."""
    return (config or Path(os.environ.get("DRKIT_CONFIG", DEFAULT_CONFIG))).absolute()


def load_settings(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings from ``config`` (or $DRKIT_CONFIG, or /etc/drkit/drkit.toml), env and flags.

    ``overrides`` holds values given as command-line flags, nested like the file
    (``{"postgres": {"pgdata": ...}}``); ``None`` values are ignored. Raises ConfigError with one
    line per invalid field.
    """
    path = config_path(config)
    if not path.is_file():
        raise ConfigError(
            f"configuration file '{path}' does not exist",
            hint="pass --config PATH or set DRKIT_CONFIG; docs/configuration.md has an example",
        )
    flags = _drop_none(overrides or {})
    try:
        with path.open("rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            data = tomllib.load(file)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot read configuration file '{path}': {exc}") from None
    _refuse_shared_inline_token(path, data, mode)
    try:
        environment = environment_values(Settings, os.environ)
    except EnvironmentValueError as exc:
        raise ConfigError(str(exc), hint="docs/configuration.md lists every key") from None
    try:
        return Settings.model_validate(deep_merge(deep_merge(data, environment), flags))
    except ValidationError as exc:
        raise ConfigError(
            _describe(exc, path), hint="docs/configuration.md lists every key"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read configuration file '{path}': {exc}") from None


def _refuse_shared_inline_token(path: Path, data: dict[str, Any], mode: int) -> None:
    """A configuration file that holds a Vault token must be private to its owner, as the key
    file and token_file are: any local user who reads it could act as drkit."""
    keys = data.get("keys")
    vault = keys.get("vault") if isinstance(keys, dict) else None
    if isinstance(vault, dict) and vault.get("token") and mode & 0o077:
        raise ConfigError(
            f"configuration file '{path}' holds a Vault token and can be accessed by group or"
            f" others (mode {mode:04o})",
            hint=f"chmod 600 {path}, or move the token to keys.vault.token_file (mode 0600)"
            " or the VAULT_TOKEN environment variable",
        )


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def _describe(exc: ValidationError, path: Path) -> str:
    lines = [f"invalid configuration in '{path}':"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)

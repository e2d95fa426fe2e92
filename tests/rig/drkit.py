"""Drive drkit the way a user does: a drkit.toml for a test cluster, the real CLI, its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.crypto.keyfile import create_keyfile
from rig.postgres import PgCluster, attach_cluster

DRKIT = [sys.executable, "-m", "drkit"]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Drkit:
    """A drkit configuration (key file, local repository) for one test cluster."""

    cluster: PgCluster
    workdir: Path
    backup: dict[str, Any] = field(default_factory=dict)
    keyfile: Path | None = None
    extra_repos: list[dict[str, Any]] = field(default_factory=list)  # after "local", in order
    repo: Path | None = None  # the local repository (default: <workdir>/repo)

    def __post_init__(self) -> None:
        if self.keyfile is None:
            self.keyfile = self.workdir / "backup.key"
            create_keyfile(self.keyfile)
        self.repo_path = self.repo or self.workdir / "repo"
        self.config = self.workdir / "drkit.toml"
        self.write_config()

    def write_config(self, **extra_sections: dict[str, Any]) -> None:
        # Small chunks: every test's larger files take the parallel chunked-restore path.
        backup = {
            "start_fast": True,
            "process_max": 2,
            "chunk_size": 4 * 1024 * 1024,
            **self.backup,
        }
        sections: dict[str, dict[str, Any]] = {
            "postgres": {
                "pgdata": self.cluster.pgdata,
                "host": self.cluster.socket_dir,
                "port": self.cluster.port,
                "user": "postgres",
            },
            "keys": {"provider": "keyfile", "keyfile": self.keyfile},
            "backup": backup,
            **extra_sections,
        }
        lines = [f"lock_path = {toml_value(self.workdir / 'locks')}"]
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines += ["[[repo]]", 'name = "local"', f"path = {toml_value(self.repo_path)}"]
        for repo in self.extra_repos:
            lines += ["[[repo]]", *(f"{k} = {toml_value(v)}" for k, v in repo.items())]
        self.config.write_text("\n".join(lines) + "\n")

    def run(self, *args: str) -> Result:
        """Run a drkit command in-process (fast) with this configuration."""
        result = CliRunner().invoke(app, [*args, "--config", str(self.config)])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Result(result.exit_code, result.stdout, result.stderr)

    def ok(self, *args: str) -> Result:
        result = self.run(*args)
        assert result.exit_code == 0, f"drkit {' '.join(args)} failed:\n{result.output}"
        return result

    def info(self) -> dict[str, Any]:
        """``drkit info --json``, parsed. Its exit code is the code of the one kind of warning it
        found, 1 for several kinds, 0 for none; a failing 3-2-1 rule is one of them where 3-2-1 is
        required (more than one repository, or [copies] require_321)."""
        result = self.run("info", "--json")
        data: dict[str, Any] = json.loads(result.stdout)
        codes = {w["code"] for w in data["warnings"]}
        expected = 0 if not codes else codes.pop() if len(codes) == 1 else 1
        assert result.exit_code == expected == data["exit_code"], result.output
        failing = bool(data["backups"]) and data["rule_3_2_1"] == "FAIL" and data["require_321"]
        assert failing == any(w["warning"] == "Rule321Failed" for w in data["warnings"])
        return data

    def spawn(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Run drkit as a separate process (for kill -9 and concurrency tests)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            [*DRKIT, *args, "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            **kwargs,
        )

    def repo_listing(self) -> dict[str, int]:
        """Every file in the repository with its size (to prove an operation changed nothing).

        Job records (``events/``) are left out: a failed run is meant to leave exactly that,
        the record of its failure, and nothing else. So is the lease bookkeeping (``leases/``):
        every run that writes takes and releases the repository's lease."""
        if not self.repo_path.exists():
            return {}
        return {
            key: p.stat().st_size
            for p in sorted(self.repo_path.rglob("*"))
            if p.is_file()
            and not (key := str(p.relative_to(self.repo_path))).startswith(("events/", "leases/"))
        }


def start_restored(pgdata: Path, version: int, workdir: Path) -> PgCluster:
    """Start a cluster drkit restored (it is stopped and removed with ``workdir``)."""
    restored = attach_cluster(pgdata, version, workdir)
    restored.start()
    return restored


def check_indexes(cluster: PgCluster) -> None:
    """amcheck every b-tree index of the postgres database, heap included; raises if broken."""
    cluster.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
    cluster.psql(
        "SELECT bt_index_check(c.oid, true) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam"
        " WHERE a.amname = 'btree' AND c.relpersistence = 'p'"
    )

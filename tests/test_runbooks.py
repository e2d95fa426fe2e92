"""The runbooks cannot rot: every scenario validates, and every command of every runbook runs.

Each ```sh command of runbooks/*.md runs against one rig (PostgreSQL 15 archiving into a local
repository, two S3 buckets: ``s3-eu`` offsite under Object Lock and ``s3-us`` offsite, a key file
with an escrow recovery key), after replacing only the placeholders runbooks/README.md documents.
Each ```sql block runs on the source. Before a runbook's "Recover" section its disaster is
staged (the local repository or the key file gone, the migration applied) and undone after it.
Every command must exit 0 and have the effect a reader expects (a PASS drill record from the
surviving repositories, a restored data directory, a plan of the backup).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, Result
from rig.postgres import (
    PgCluster,
    attach_cluster,
    chown_to_server_user,
    clone_cluster,
    make_rig_dir,
)
from rig.servers import S3Server
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.config.settings import load_settings
from drkit.crypto.keyfile import create_keyfile
from drkit.drill.scenario import load_scenario
from drkit.errors import ConfigError
from drkit.repo.drills import DrillRecord
from drkit.repo.open import open_repository

RUNBOOKS = Path(__file__).resolve().parent.parent / "runbooks"
NAMES = sorted(p.stem for p in RUNBOOKS.glob("*.toml"))
SEGMENT = re.compile(r"^[0-9A-F]{24}$")
FENCE = re.compile(r"^```(\w*)\s*$")

# What each scenario leaves to restore from, in the rig's configuration (local, s3-eu, s3-us)
ALLOWED = {
    "restore-test": ["local", "s3-eu", "s3-us"],
    "site-loss": ["s3-eu", "s3-us"],
    "ransomware": ["s3-eu"],
    "key-loss": ["local", "s3-eu", "s3-us"],
    "bad-migration": ["local", "s3-eu", "s3-us"],
    "region-outage": ["s3-us"],
}


# -- reading runbooks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    section: str  # the "## ..." heading it is under
    lang: str  # sh | sql
    text: str  # one shell command, or one SQL block


def runbook_steps(path: Path) -> list[Step]:
    """The ```sh commands (one per line, ``\\`` continues one) and ```sql blocks, in order."""
    steps: list[Step] = []
    section, lang, block = "", None, []
    for line in path.read_text().splitlines():
        if lang is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif fence := FENCE.match(line):
                lang, block = fence.group(1), []
            continue
        if line.strip() != "```":
            block.append(line)
            continue
        if lang == "sql":
            steps.append(Step(section, "sql", "\n".join(block)))
        elif lang == "sh":
            joined = "\n".join(block).replace("\\\n", " ")
            for command in joined.splitlines():
                if command.strip() and not command.strip().startswith("#"):
                    steps.append(Step(section, "sh", command.strip()))
        lang = None
    assert lang is None, f"{path.name}: a fenced block is not closed"
    return steps


def test_every_scenario_validates_and_has_its_runbook() -> None:
    assert NAMES == [
        "bad-migration",
        "key-loss",
        "ransomware",
        "region-outage",
        "restore-test",
        "site-loss",
    ]
    assert sorted(p.stem for p in RUNBOOKS.glob("*.md")) == sorted([*NAMES, "README"])
    for name in NAMES:
        scenario = load_scenario(RUNBOOKS / f"{name}.toml")
        assert scenario.name == name and scenario.runbook == f"{name}.md"
        assert scenario.description
        steps = runbook_steps(RUNBOOKS / f"{name}.md")
        commands = [s.text for s in steps if s.lang == "sh"]
        assert commands, f"{name}.md shows no command"
        assert all(c.startswith("drkit ") for c in commands), commands
        assert f"drkit drill --scenario runbooks/{name}.toml" in commands
        sections = {s.section for s in steps}
        assert {"Rehearse it", "Record what happened"} <= sections, (name, sections)
        text = (RUNBOOKS / f"{name}.md").read_text()
        for heading in ("## When to use it", "## Recover", "## Switch the application over"):
            assert heading in text, (name, heading)
    assert runbook_steps(RUNBOOKS / "README.md") == []


# Broken copies: (where, value) -> the field the error must name
BREAKAGES: list[tuple[tuple[str, ...], Any, str]] = [
    (("survivors", "offsite_only"), "maybe", "survivors.offsite_only"),
    (("survivors", "vault"), "perhaps", "survivors.vault"),
    (("targets", "rto"), "soon", "targets.rto"),
    (("restore", "name"), 42, "restore.name"),
    (("restore",), {"name": "x", "latest": True}, "restore: Value error, give at most one"),
    (("restore",), {"time": "2026-12-01T10:00:00"}, "restore: Value error, time needs a time zone"),
    (("kind",), "drill", "kind:"),
    (("name",), "has spaces", "name:"),
    (("colour",), "red", "colour: Extra inputs are not permitted"),
    (("checks", "amcheck"), "yes please", "checks.amcheck"),
]


def to_toml(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in data.items():
        if isinstance(values, dict):
            lines += [f"[{table}]", *(f"{k} = {value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", NAMES)
def test_a_broken_scenario_names_the_field(name: str, tmp_path: Path) -> None:
    original = tomllib.loads((RUNBOOKS / f"{name}.toml").read_text())
    for where, wrong, named in BREAKAGES:
        data = json.loads(json.dumps(original, default=str))
        parent = data
        for key in where[:-1]:
            parent = parent.setdefault(key, {})
        parent[where[-1]] = wrong
        broken = tmp_path / f"{name}.toml"
        broken.write_text(to_toml(data))
        with pytest.raises(ConfigError) as caught:
            load_scenario(broken)
        message = caught.value.message
        assert message.startswith(f"invalid scenario '{broken}':"), message
        assert f"\n  {named}" in message, (where, message)
        assert caught.value.exit_code == 3


# -- the rig -------------------------------------------------------------------------------------


@dataclass
class Rig:
    cluster: PgCluster
    dk: Drkit
    workdir: Path
    s3_env: dict[str, str]
    recovery_key: Path
    label: str
    time: str  # a moment after the backup, before the later rows: the runbooks' TIME
    restored: list[Path] = field(default_factory=list)

    @property
    def scenarios(self) -> Path:
        return self.workdir / "runbooks"

    def placeholders(self, command: str) -> list[str]:
        """``command`` split like a shell does, with runbooks/README.md's placeholders
        replaced by the rig's values."""
        args = []
        for arg in shlex.split(re.sub(r"\bTIME\b", shlex.quote(self.time), command)):
            if arg == "/var/lib/postgresql/restored":
                target = self.workdir / f"restored-{len(self.restored)}"
                self.restored.append(target)
                arg = str(target)
            if arg == "DRILL_ID":  # the drill the runbook ran last
                arg = self.drill_records()[-1].id
            arg = {"LABEL": self.label, "/etc/drkit/recovery.key": str(self.recovery_key)}.get(
                arg, arg
            )
            if arg.startswith("runbooks/"):
                arg = str(self.scenarios / arg.removeprefix("runbooks/"))
            args.append(arg)
        return args

    def drkit(self, args: list[str]) -> Result:
        result = CliRunner().invoke(app, args)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Result(result.exit_code, result.stdout, result.stderr)

    def drill_records(self, repo: str = "s3-eu") -> list[DrillRecord]:
        # With the recovery key: the key file is gone while key-loss.md recovers
        settings = load_settings(self.dk.config, {"keys": {"recovery_key": self.recovery_key}})
        entries = open_repository(settings, repo).drill_records()
        return [e.record for e in entries if e.record is not None]


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def rig(rig_root: Path, pg_templates: Any, s3_server: S3Server) -> Iterator[Rig]:
    (rig_root / "work").mkdir(mode=0o755, exist_ok=True)
    workdir = make_rig_dir(rig_root / "work", "runbooks-")
    cluster = clone_cluster(pg_templates.get(15), 15, rig_root)
    # Short: the sandbox's socket path must fit in a sockaddr_un (107 bytes)
    sandboxes = make_rig_dir(rig_root, "sb-")
    s3_env = s3_server.env()
    client = s3_server.client()
    repos = []
    for name, lock in (("s3-eu", True), ("s3-us", False)):
        bucket = f"drkit-{name}-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=lock)
        repo = {
            "name": name,
            "type": "s3",
            "bucket": bucket,
            "prefix": "prod/main",
            "endpoint_url": s3_server.endpoint_url,
            "region": "us-east-1",
            "offsite": True,
            "max_attempts": 2,
        }
        if lock:
            repo["object_lock"] = {"mode": "GOVERNANCE", "days": 1}
        repos.append(repo)
    try:
        # The source's archive_command and every drkit command see the S3 credentials
        with environ(s3_env):
            cluster.start()
            dk = Drkit(cluster, workdir, extra_repos=repos)
            escrow = CliRunner().invoke(
                app, ["keys", "escrow-init", "--out", str(workdir / "recovery")]
            )
            assert escrow.exit_code == 0, escrow.output
            recovery_key = workdir / "recovery.key"
            chown_to_server_user(recovery_key)  # wal-fetch --recovery-key runs as postgres
            keys = {
                "provider": "keyfile",
                "keyfile": dk.keyfile,
                "escrow": {"public_key_file": workdir / "recovery.pub"},
            }
            dk.write_config(keys=keys)
            dk.ok("init")
            sections = {"keys": keys, "drill": {"sandbox": sandboxes}, "retention": {"full": 2}}
            enable_archiving(cluster, dk, sections=sections)
            cluster.psql(
                "CREATE TABLE orders (id int PRIMARY KEY, note text);"
                " INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 2000) g;"
                " CREATE TABLE audit AS SELECT g AS id FROM generate_series(1, 100) g"
            )
            label = json.loads(dk.ok("backup", "--json").stdout)["label"]
            cluster.psql("INSERT INTO orders SELECT g, 'after' FROM generate_series(2001, 2100) g")
            # TIME is whole seconds: the next whole second after the 'after' rows (never before
            # the backup's end, as rounding could make it), and the 'later' rows come after it
            time = cluster.psql(
                "SELECT (date_trunc('second', clock_timestamp()) + interval '1 second')::text"
            )
            cluster.psql(
                f"SELECT pg_sleep_until('{time}');"
                " INSERT INTO orders SELECT g, 'later' FROM generate_series(2101, 2200) g"
            )
            wait_archived(cluster, switch_wal(cluster))
            dk.ok("replicate")
        scenarios = workdir / "runbooks"
        scenarios.mkdir()
        for source in RUNBOOKS.glob("*.toml"):
            text = source.read_text().replace("/etc/drkit/recovery.key", str(recovery_key))
            (scenarios / source.name).write_text(text)
        yield Rig(cluster, dk, workdir, s3_env, recovery_key, label, time)
    finally:
        cluster.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sandboxes, ignore_errors=True)


# -- staging the disasters -----------------------------------------------------------------------


# The repositories each disaster takes, which its runbook removes from the recovery host's
# drkit.toml: the local disk with the site (and, in a ransomware attack, what the attacker could
# write to; in a region outage, the region's bucket)
LOST = {
    "site-loss": ["local"],
    "ransomware": ["local", "s3-us"],
    "region-outage": ["local", "s3-eu"],
}


def recovery_config(rig: Rig, lost: list[str]) -> Path:
    """The rig's drkit.toml without the ``[[repo]]`` tables of the ``lost`` repositories."""
    head, *repos = rig.dk.config.read_text().split("[[repo]]\n")
    kept = [r for r in repos if not any(f'name = "{n}"\n' in r for n in lost)]
    path = rig.workdir / "recovery.toml"
    path.write_text(head + "".join("[[repo]]\n" + r for r in kept))
    return path


@contextmanager
def disaster(rig: Rig, name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What the runbook's "Recover" section finds (and what its prose has the operator do
    first), undone afterwards."""
    gone: list[tuple[Path, Path]] = []
    if name in LOST:
        gone.append((rig.dk.repo_path, rig.workdir / "local-repo-lost"))  # the site's disk
        monkeypatch.setenv("DRKIT_CONFIG", str(recovery_config(rig, LOST[name])))
    if name == "key-loss":
        assert rig.dk.keyfile is not None
        gone.append((rig.dk.keyfile, rig.workdir / "keyfile-lost"))
    if name == "bad-migration":
        rig.cluster.psql("DROP TABLE audit; DELETE FROM orders WHERE id > 1000")
        wait_archived(rig.cluster, switch_wal(rig.cluster))
    for path, away in gone:
        path.rename(away)
    try:
        yield
    finally:
        for path, away in gone:
            away.rename(path)
        monkeypatch.setenv("DRKIT_CONFIG", str(rig.dk.config))


# -- what each command must have done ------------------------------------------------------------


def check_effect(rig: Rig, name: str, args: list[str], result: Result, drills_before: int) -> None:
    out = result.stdout
    command = args[0] if args else ""
    if command == "drill" and args[1] not in ("list", "note"):
        records = rig.drill_records()
        assert len(records) == drills_before + 1, "the drill wrote no record to s3-eu"
        record = records[-1]
        assert record.outcome == "PASS", record.reason
        assert out.rstrip().endswith("PASS"), out
        if "--scenario" in args:
            assert record.scenario == name
            assert record.repositories_allowed == ALLOWED[name]
            assert record.repository in ALLOWED[name]
        if name == "bad-migration":
            assert record.restore_point is not None
            assert (record.restore_point.target_kind, record.restore_point.target_value) == (
                "name",
                "before-migration",
            )
        if "--backup" in args:
            assert record.restore_point is not None and record.restore_point.backup == rig.label
    elif args[:2] == ["drill", "note"]:
        assert f" on {args[2]} written to: " in out, out
    elif command == "drill":
        assert "RESULT" in out and "PASS" in out, out
    elif command == "restore" and "--plan" in args:
        assert out.startswith(f"restore plan: backup {rig.label} from '"), out
        if "--repo" in args:
            assert f"from '{args[args.index('--repo') + 1]}'" in out.splitlines()[0]
    elif command == "restore":
        pgdata = Path(args[args.index("--pgdata") + 1])
        assert (pgdata / "PG_VERSION").read_text().strip() == "15"
        assert f"restored backup {rig.label} from '" in out
        if "--repo" in args:
            assert f"from '{args[args.index('--repo') + 1]}'" in out
        settings = (pgdata / "postgresql.auto.conf").read_text()
        if "--recovery-key" in args:  # recovery gets the WAL keys it needs, not the key
            assert "--wal-keys drkit-wal-keys.json" in settings
            assert str(rig.recovery_key) not in settings
        if "--archive-mode" in args:
            assert "archive_mode = 'off'" not in settings
        if name == "bad-migration" and "--target-name" in args:
            assert_went_back(rig, pgdata)
        if name == "site-loss":
            assert_recovers_from_offsite(rig, pgdata)
        if "--target-time" in args:
            assert f"recovery_target_time = '{rig.time}'" in settings
    elif command in ("info", "verify"):
        assert rig.label in out, out


def assert_went_back(rig: Rig, pgdata: Path) -> None:
    """The restored copy starts, and holds what the migration destroyed."""
    copy = attach_cluster(pgdata, 15, rig.workdir)
    copy.start()
    try:
        copy.wait_promoted()
        assert copy.psql("SELECT count(*) FROM audit") == "100"
        assert int(copy.psql("SELECT count(*) FROM orders")) >= 2000
    finally:
        copy.cleanup()


def assert_recovers_from_offsite(rig: Rig, pgdata: Path) -> None:
    """The copy replays the offsite archive to its end and is promoted, with every row the
    archive holds (its own archiving off: it must not push into the rig's repositories)."""
    copy = attach_cluster(pgdata, 15, rig.workdir)
    copy.settings = {"archive_mode": "off"}
    copy.start()
    try:
        copy.wait_promoted()
        assert copy.psql("SELECT count(*) FROM orders") == "2200"
    finally:
        copy.cleanup()


# -- running them --------------------------------------------------------------------------------


def run_runbook(rig: Rig, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = None
    try:
        for step in runbook_steps(RUNBOOKS / f"{name}.md"):
            if step.section == "Recover" and staged is None:
                staged = disaster(rig, name, monkeypatch)
                staged.__enter__()
            where = f"{name}.md, {step.section!r}: {step.text}"
            if step.lang == "sql":
                last = rig.cluster.psql(step.text).splitlines()[-1]
                if SEGMENT.match(last):
                    wait_archived(rig.cluster, last)  # the runbook waits for it too
                continue
            args = rig.placeholders(step.text)[1:]
            before = len(rig.drill_records())
            result = rig.drkit(args)
            assert result.exit_code == 0, f"{where}\nexit {result.exit_code}\n{result.output}"
            try:
                check_effect(rig, name, args, result, before)
            except AssertionError as exc:
                raise AssertionError(f"{where}\n{exc}\n{result.output}") from None
    finally:
        if staged is not None:
            staged.__exit__(None, None, None)
        for target in rig.restored:
            shutil.rmtree(target, ignore_errors=True)
        rig.restored.clear()


def test_every_runbook_command_runs(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """One test for all runbooks: they share the rig (one PostgreSQL, one set of repositories),
    which a parametrized test split over xdist workers would build once per worker. The order
    matters: bad-migration runs first and its migration (a DROP) is never undone."""
    for key, value in {**rig.s3_env, "DRKIT_CONFIG": str(rig.dk.config)}.items():
        monkeypatch.setenv(key, value)
    for name in NAMES:
        started = time.monotonic()
        run_runbook(rig, name, monkeypatch)
        print(f"{name}.md: {time.monotonic() - started:.1f}s")


def test_drill_refuses_a_broken_scenario_naming_the_field(tmp_path: Path) -> None:
    """Through the CLI: exit 3 before anything runs, every invalid field named."""
    create_keyfile(tmp_path / "key")
    config = tmp_path / "drkit.toml"
    config.write_text(
        f'[postgres]\npgdata = "{tmp_path / "pgdata"}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{tmp_path / "key"}"\n'
        f'[[repo]]\nname = "local"\npath = "{tmp_path / "repo"}"\n'
    )
    broken = tmp_path / "site-loss.toml"
    text = (RUNBOOKS / "site-loss.toml").read_text()
    broken.write_text(text.replace("offsite_only = true", 'offsite_only = "maybe"'))
    result = CliRunner().invoke(app, ["drill", "--scenario", str(broken), "--config", str(config)])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith(f"error: invalid scenario '{broken}':\n"), result.stderr
    assert "  survivors.offsite_only: Input should be a valid boolean" in result.stderr
    assert not (tmp_path / "repo").exists()

"""WAL archiving without a server: wal-push / wal-fetch through the real command line on WAL files
built here (a valid first page header, so drkit's checks pass), the object format, key periods,
the archive's listing and gaps, kill -9 in mid-push, and the async spool and pusher.

tests/test_wal_pg.py does the same against real PostgreSQL archive_command / restore_command.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.errors import IntegrityError
from drkit.repo.repository import FORMAT_KEY, FORMAT_VERSION, Repository
from drkit.repo.wal_archive import WalArchive
from drkit.repo.wal_names import parse_wal_name
from drkit.repo.wal_objects import MAGIC, RepoLike, WalKeyring, period_of, read_header
from drkit.storage.posix import PosixStorage
from drkit.wal import push as push_module
from drkit.wal.config import load_wal_config
from drkit.wal.push import Pusher, PushOptions
from drkit.wal.spool import Spool

SYSID = 7300000000000000001
MiB = 1024 * 1024
SEGSIZE = MiB  # small segments keep these tests fast (PostgreSQL allows 1 MiB .. 1 GiB)
DRKIT = [sys.executable, "-m", "drkit"]
_LONG_HEADER = struct.Struct("<HHIQIxxxxQII")


def wal_bytes(
    timeline: int,
    segno: int,
    *,
    size: int = SEGSIZE,
    seed: int = 0,
    sysid: int = SYSID,
    random_fill: bool = False,
) -> bytes:
    """A WAL segment as far as drkit looks: a long page header, then some (compressible) data."""
    rng = random.Random(f"{timeline}-{segno}-{seed}")
    if random_fill:
        body = bytearray(os.urandom(size))
    else:
        block = rng.randbytes(4096)
        body = bytearray((block + bytes(4096)) * (size // 8192))
    body[: _LONG_HEADER.size] = _LONG_HEADER.pack(
        0xD110, 2, timeline, segno * size, 0, sysid, size, 8192
    )
    return bytes(body)


def seg_name(timeline: int, segno: int, size: int = SEGSIZE) -> str:
    per = 0x100000000 // size
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


@dataclass
class WalRig:
    root: Path
    pgdata: Path
    repo_path: Path
    keyfile: Path
    config: Path

    @property
    def wal_dir(self) -> Path:
        return self.pgdata / "pg_wal"

    def write_config(self, **archive: Any) -> None:
        lines = [
            f'lock_path = "{self.root / "locks"}"',
            "[postgres]",
            f'pgdata = "{self.pgdata}"',
            "[keys]",
            'provider = "keyfile"',
            f'keyfile = "{self.keyfile}"',
            "[[repo]]",
            'name = "local"',
            f'path = "{self.repo_path}"',
        ]
        if archive:
            lines.append("[archive]")
            for key, value in archive.items():
                rendered = json.dumps(str(value) if isinstance(value, Path) else value)
                lines.append(f"{key} = {rendered}")
        self.config.write_text("\n".join(lines) + "\n")

    def segment(self, timeline: int, segno: int, **kwargs: Any) -> Path:
        path = self.wal_dir / seg_name(timeline, segno, kwargs.get("size", SEGSIZE))
        path.write_bytes(wal_bytes(timeline, segno, **kwargs))
        return path

    def file(self, name: str, content: bytes) -> Path:
        path = self.wal_dir / name
        path.write_bytes(content)
        return path

    def ready(self, name: str) -> None:
        (self.wal_dir / "archive_status" / f"{name}.ready").touch()

    def done(self, name: str) -> None:
        status = self.wal_dir / "archive_status"
        (status / f"{name}.ready").rename(status / f"{name}.done")

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """The real command line, as PostgreSQL runs it (cwd = PGDATA)."""
        return subprocess.run(
            [*DRKIT, *args, "--config", str(self.config)],
            cwd=cwd or self.pgdata,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def push(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.run("wal-push", f"pg_wal/{name}")

    def fetch(self, name: str, dest: Path) -> subprocess.CompletedProcess[str]:
        return self.run("wal-fetch", name, str(dest))

    def repo(self) -> RepoLike:
        return load_wal_config(self.config).open_repository()

    def object_path(self, name: str) -> Path:
        return self.repo_path / parse_wal_name(name).key


@pytest.fixture
def wal(tmp_path: Path) -> WalRig:
    keyfile = tmp_path / "backup.key"
    create_keyfile(keyfile)
    repo_path = tmp_path / "repo"
    Repository(PosixStorage(repo_path), KeyfileProvider(keyfile)).initialize(SYSID)
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    rig = WalRig(tmp_path, pgdata, repo_path, keyfile, tmp_path / "drkit.toml")
    rig.write_config()
    return rig


def tamper(path: Path, offset: int, edit: Callable[[int], int] = lambda b: b ^ 0x01) -> None:
    path.chmod(0o640)
    data = bytearray(path.read_bytes())
    data[offset] = edit(data[offset])
    path.write_bytes(bytes(data))


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "timeline", "key"),
    [
        ("000000010000000000000003", "segment", 1, "wal/00000001/000000010000000000000003"),
        ("0000000A00000001000000FF", "segment", 10, "wal/0000000A/0000000A00000001000000FF"),
        (
            "000000010000000000000005.partial",
            "partial",
            1,
            "wal/00000001/000000010000000000000005.partial",
        ),
        (
            "000000010000000000000002.00000028.backup",
            "backup",
            1,
            "wal/00000001/000000010000000000000002.00000028.backup",
        ),
        ("00000002.history", "history", 2, "wal/00000002/00000002.history"),
    ],
)
def test_names_map_to_keys_under_their_timeline(
    name: str, kind: str, timeline: int, key: str
) -> None:
    wal = parse_wal_name(name)
    assert (wal.kind, wal.timeline, wal.key) == (kind, timeline, key)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "RECOVERYXLOG",
        "00000001000000000000003",
        "000000010000000000000003.done",
        "00000000000000000000000A",
        "00000000.history",
        "0000000100000000000000ab",
        "../00000002.history",
    ],
)
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a WAL file name"):
        parse_wal_name(name)


def test_constants_shared_with_the_repository_module() -> None:
    assert (push_module.FORMAT_KEY, push_module.FORMAT_VERSION) == (FORMAT_KEY, FORMAT_VERSION)


# -- push and fetch ------------------------------------------------------------------------------


def test_every_kind_of_file_round_trips(wal: WalRig, tmp_path: Path) -> None:
    files = {
        seg_name(1, 3): wal_bytes(1, 3),
        seg_name(1, 5) + ".partial": wal_bytes(1, 5),
        seg_name(1, 2) + ".00000028.backup": b"START WAL LOCATION: 0/2000028\nLABEL: x\n",
        "00000002.history": b"1\t0/5000A0\tno recovery target specified\n",
        seg_name(2, 5): wal_bytes(2, 5),
    }
    for name, content in files.items():
        wal.file(name, content)
        result = wal.push(name)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        stored = wal.object_path(name).read_bytes()
        assert stored[:4] == MAGIC and content[:64] not in stored  # compressed and encrypted
    for name, content in files.items():
        dest = tmp_path / "restored" / "RECOVERYXLOG"
        dest.parent.mkdir(exist_ok=True)
        result = wal.fetch(name, dest)
        assert result.returncode == 0, result.stderr
        assert dest.read_bytes() == content
        assert sorted(p.name for p in dest.parent.iterdir()) == ["RECOVERYXLOG"]
    archive = WalArchive(wal.repo())
    assert archive.timelines() == [1, 2]
    assert archive.segments(1) == [seg_name(1, 3)]
    assert archive.files(1) == sorted(n for n in files if n.startswith("00000001"))
    assert archive.segment_size == SEGSIZE  # from the first page of an archived segment
    # A path PostgreSQL did not give relative to PGDATA works too.
    absolute = wal.file(seg_name(1, 4), wal_bytes(1, 4))
    assert wal.run("wal-push", str(absolute), cwd=tmp_path).returncode == 0


def test_push_is_idempotent_and_never_overwrites(wal: WalRig) -> None:
    name = seg_name(1, 7)
    wal.segment(1, 7)
    assert wal.push(name).returncode == 0
    stored = wal.object_path(name).read_bytes()

    again = wal.push(name)  # PostgreSQL retries after a crash or a lost answer
    assert again.returncode == 0
    assert "already archived with identical content" in again.stderr
    assert len(again.stderr.splitlines()) == 1

    wal.segment(1, 7, seed=1)  # same name, same header, different WAL
    conflict = wal.push(name)
    assert conflict.returncode == 10
    assert f"WAL file {name} already archived with different content" in conflict.stderr
    assert len(conflict.stderr.splitlines()) == 1
    assert wal.object_path(name).read_bytes() == stored
    assert sorted(p.name for p in wal.object_path(name).parent.iterdir()) == [name]


def test_fetch_of_a_missing_file_returns_1(wal: WalRig, tmp_path: Path) -> None:
    dest = tmp_path / "RECOVERYXLOG"
    for name in (seg_name(1, 9), "00000005.history"):
        result = wal.fetch(name, dest)
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1 and "is not in repository" in result.stderr
    assert not dest.exists()


@pytest.mark.parametrize(
    "where",
    [
        "magic",
        "version",
        "period",
        "pushed_at",
        "frame header",
        "first segment",
        "last byte",
        "truncated",
        "extended",
    ],
)
def test_a_damaged_object_is_never_handed_to_postgresql(
    wal: WalRig, tmp_path: Path, where: str
) -> None:
    name = seg_name(1, 3)
    wal.segment(1, 3, random_fill=True)  # several frame segments
    assert wal.push(name).returncode == 0
    path = wal.object_path(name)
    size = path.stat().st_size
    offsets = {
        "magic": 0,
        "version": 4,
        "period": 7,
        "pushed_at": 20,
        "frame header": 40,
        "first segment": 100,
        "last byte": size - 1,
    }
    if where in offsets:
        tamper(path, offsets[where])
    else:
        path.chmod(0o640)
        data = path.read_bytes()
        path.write_bytes(data[:-1000] if where == "truncated" else data + b"\0" * 10)
    dest = tmp_path / "RECOVERYXLOG"
    result = wal.fetch(name, dest)
    assert result.returncode > 125, result.stderr  # PostgreSQL aborts recovery
    assert result.returncode == 200 + IntegrityError.exit_code
    assert "error:" in result.stderr and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.glob("*RECOVERYXLOG*")) == []  # nothing written, no temporary left
    with pytest.raises(IntegrityError):
        WalArchive(wal.repo()).check(name)


def test_a_changed_push_time_fails_authentication(wal: WalRig, tmp_path: Path) -> None:
    name = seg_name(1, 3)
    wal.segment(1, 3)
    assert wal.push(name).returncode == 0
    archive = WalArchive(wal.repo())
    pushed = archive.pushed_at(name)
    assert abs(datetime.now(UTC) - pushed) < timedelta(minutes=1)
    path = wal.object_path(name)
    header = read_header(wal.repo(), parse_wal_name(name))
    offset = header.size - 8  # u64 pushed_at, big-endian: move it by 256 ms
    tamper(path, offset + 6, lambda b: (b + 1) % 256)
    assert archive.pushed_at(name) != pushed  # the clear header reads as it now is...
    result = wal.fetch(name, tmp_path / "RECOVERYXLOG")
    assert result.returncode == 213
    assert "failed authentication" in result.stderr  # ...but the frame no longer authenticates
    assert not (tmp_path / "RECOVERYXLOG").exists()


def test_history_files_round_trip_and_parse(wal: WalRig, tmp_path: Path) -> None:
    text = (
        "1\t0/3000000\tno recovery target specified\n\n"
        "2\t1/A0000D8\tbefore 2026-11-27 10:15:00+00\n"
    )
    wal.file("00000003.history", text.encode())
    assert wal.push("00000003.history").returncode == 0
    archive = WalArchive(wal.repo())
    assert archive.history(3) == [(1, 0x3000000), (2, 0x1_0A0000D8)]
    assert archive.history(1) == []
    assert archive.timelines() == [3]
    assert wal.fetch("00000003.history", tmp_path / "h").returncode == 0
    assert (tmp_path / "h").read_text() == text


def test_verify_wal_reports_timelines_no_backup_leads_to(wal: WalRig) -> None:
    """WAL pushed on a timeline without its history, or whose history leads from no timeline of
    the repository (another cluster's copy promoted there), is reported, not counted as ok."""
    for timeline, segno in ((1, 3), (1, 4), (2, 5), (3, 6), (4, 7)):
        wal.segment(timeline, segno)
        assert wal.push(seg_name(timeline, segno)).returncode == 0
    histories = {
        "00000002.history": "1\t0/500000\tno recovery target specified\n",
        "00000003.history": "7\t0/600000\tno recovery target specified\n",
    }
    for name, text in histories.items():
        wal.file(name, text.encode())
        assert wal.push(name).returncode == 0

    result = wal.run("verify", "--wal")
    assert result.returncode == 15, result.stderr
    assert "archived WAL: 7 files: DAMAGED" in result.stdout
    assert "foreign WAL timeline 2" not in result.stderr  # descends from timeline 1
    assert (
        "foreign WAL timeline 3: its history (7 -> 3) leads from no timeline of this repository"
    ) in result.stderr
    assert "foreign WAL timeline 4: its history file 00000004.history is missing" in result.stderr


def test_wal_push_refuses_what_it_must_not_archive(wal: WalRig) -> None:
    wal.file(seg_name(1, 3), wal_bytes(1, 3, sysid=SYSID + 1))
    other = wal.push(seg_name(1, 3))
    assert other.returncode == 6 and "belongs to database system" in other.stderr
    wal.file(seg_name(1, 4), wal_bytes(1, 3))  # the header of another position: recycled
    assert "recycled" in wal.push(seg_name(1, 4)).stderr
    wal.file(seg_name(1, 5), b"x" * 1000)
    assert "not a WAL segment" in wal.push(seg_name(1, 5)).stderr
    missing = wal.push(seg_name(1, 6))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    wal.file("notes.txt", b"hello")
    assert "not a WAL file name" in wal.push("notes.txt").stderr
    assert not (wal.repo_path / "wal").exists()
    (wal.repo_path / FORMAT_KEY).unlink()
    wal.segment(1, 3)
    uninitialized = wal.push(seg_name(1, 3))
    assert uninitialized.returncode == 22 and "not initialized" in uninitialized.stderr


def test_errors_are_one_line_and_fetch_errors_abort_recovery(wal: WalRig, tmp_path: Path) -> None:
    wal.config.write_text("[postgres]\npgdata = 1\n")  # invalid: the full loader explains
    pushed = wal.push(seg_name(1, 3))
    assert pushed.returncode == 3 and len(pushed.stderr.splitlines()) == 1
    fetched = wal.fetch(seg_name(1, 3), tmp_path / "x")
    assert fetched.returncode == 203 and "invalid configuration" in fetched.stderr


def test_wal_push_and_fetch_import_only_what_they_need(wal: WalRig, tmp_path: Path) -> None:
    wal.segment(1, 3)
    commands = [
        ["wal-push", f"pg_wal/{seg_name(1, 3)}"],
        ["wal-fetch", seg_name(1, 3), str(tmp_path / "x")],
    ]
    for args in commands:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "drkit", *args, "-c", str(wal.config)],
            cwd=wal.pgdata,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        modules = {
            line.split("|")[-1].strip().split(".")[0]
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert modules, proc.stderr
        heavy = modules & {
            "typer",
            "click",
            "rich",
            "pydantic",
            "pydantic_settings",
            "psycopg",
            "numpy",
            "boto3",
            "hvac",
        }
        assert not heavy, f"drkit {args[0]} imports {sorted(heavy)}"


# -- key periods ---------------------------------------------------------------------------------


def test_hourly_key_period_and_one_record_per_period(wal: WalRig) -> None:
    wal.write_config(key_period="hourly")
    for segno in (3, 4):
        wal.segment(1, segno)
        assert wal.push(seg_name(1, segno)).returncode == 0
    records = sorted(
        p.relative_to(wal.repo_path).as_posix()
        for p in (wal.repo_path / "wal-keys").rglob("*.json")
    )
    now_ms = int(time.time() * 1000)
    assert len(records) in (1, 2)  # two if the hour turned between the pushes
    assert records[-1] == f"wal-keys/{period_of(now_ms, 'hourly')}/0001.json"
    header = read_header(wal.repo(), parse_wal_name(seg_name(1, 4)))
    assert len(header.period) == 10
    record = json.loads((wal.repo_path / records[-1]).read_text())
    assert record["provider"] == "keyfile" and "wrapped" in record  # a backup key record


def test_racing_first_pushers_of_a_period_share_one_key(
    wal: WalRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushers = 6
    barrier = threading.Barrier(pushers)
    original = WalKeyring._load
    first_calls: set[int] = set()

    def load_after_everyone_looked(self: WalKeyring, period: str) -> bytes | None:
        result = original(self, period)
        if id(self) not in first_calls:  # every pusher finds no record, then all create one
            first_calls.add(id(self))
            barrier.wait(timeout=30)
        return result

    monkeypatch.setattr(WalKeyring, "_load", load_after_everyone_looked)
    repo = wal.repo()
    paths = [wal.segment(1, segno) for segno in range(10, 10 + pushers)]
    errors: list[BaseException] = []

    def push(path: Path) -> None:
        try:
            Pusher(repo, PushOptions(), WalKeyring(repo, cache=False)).push(path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert errors == []
    assert [p.name for p in (wal.repo_path / "wal-keys").rglob("*.json")] == ["0001.json"]
    archive = WalArchive(wal.repo())
    for path in paths:
        archive.check(path.name)


def test_a_period_whose_record_does_not_unwrap_is_not_given_a_second_key(
    wal: WalRig, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    create_keyfile(other)
    period = period_of(int(time.time() * 1000), "daily")
    record = KeyfileProvider(other).new_data_key().record
    PosixStorage(wal.repo_path).write_bytes(
        f"wal-keys/{period}/0001.json", json.dumps(record).encode()
    )
    wal.segment(1, 3)
    result = wal.push(seg_name(1, 3))
    assert result.returncode == 12, result.stderr  # WrongKey
    assert [p.name for p in (wal.repo_path / "wal-keys").rglob("*.json")] == ["0001.json"]
    assert not wal.object_path(seg_name(1, 3)).exists()


# -- the archive: listing and gaps ---------------------------------------------------------------


def test_listing_ranges_and_gaps(wal: WalRig) -> None:
    per_log = 0x100000000 // SEGSIZE  # segments per log file number: the names wrap there
    segnos = [*range(per_log - 3, per_log + 4), per_log + 6]
    for segno in segnos:
        wal.segment(1, segno)
        assert wal.push(seg_name(1, segno)).returncode == 0
    (wal.repo_path / "wal" / "00000001" / "notes.txt").write_text("not drkit's")
    wal.object_path(seg_name(1, per_log)).unlink()
    wal.object_path(seg_name(1, per_log + 1)).unlink()
    archive = WalArchive(wal.repo())
    assert archive.segment_size == SEGSIZE
    assert archive.last_segment(1) == seg_name(1, per_log + 6)
    assert archive.last_segment(2) is None
    assert archive.find_gaps(1, seg_name(1, per_log - 3), seg_name(1, per_log + 6)) == [
        seg_name(1, n) for n in (per_log, per_log + 1, per_log + 4, per_log + 5)
    ]
    assert archive.find_gaps(1, seg_name(1, per_log + 2), seg_name(1, per_log + 3)) == []
    assert archive.ranges(1) == [
        (seg_name(1, per_log - 3), seg_name(1, per_log - 1)),
        (seg_name(1, per_log + 2), seg_name(1, per_log + 3)),
        (seg_name(1, per_log + 6), seg_name(1, per_log + 6)),
    ]
    [summary] = archive.summarize()
    assert summary.first == seg_name(1, per_log - 3) and summary.segments == len(segnos) - 2
    assert summary.missing == [
        (seg_name(1, per_log), seg_name(1, per_log + 1)),
        (seg_name(1, per_log + 4), seg_name(1, per_log + 5)),
    ]
    assert summary.missing_count == 4


# -- kill -9 -------------------------------------------------------------------------------------


def test_kill_9_in_mid_push_leaves_nothing_partial(wal: WalRig) -> None:
    size = 256 * MiB  # incompressible: a push takes long enough to be killed at random points
    name = seg_name(1, 5, size)
    content = wal_bytes(1, 5, size=size, random_fill=True)
    wal.file(name, content)
    rng = random.Random(7)
    outcomes = []
    for _attempt in range(6):
        proc = subprocess.Popen(
            [*DRKIT, "wal-push", f"pg_wal/{name}", "--config", str(wal.config)],
            cwd=wal.pgdata,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.05, 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        archive = WalArchive(wal.repo())
        listed = archive.files(1)
        outcomes.append(bool(listed))
        if listed:  # killed after the commit: the object is complete
            assert listed == [name]
            archive.check(name)
            break
        assert not wal.object_path(name).exists()
    result = wal.push(name)
    assert result.returncode == 0, result.stderr
    assert WalArchive(wal.repo()).files(1) == [name]
    dest = wal.root / "fetched"
    assert wal.fetch(name, dest).returncode == 0
    assert dest.read_bytes() == content
    assert False in outcomes  # at least one kill landed before the object was published


# -- async mode ----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_async_mode_pushes_ahead_and_answers_from_the_spool(wal: WalRig) -> None:
    spool = wal.root / "spool"
    wal.write_config(**{"async": True, "spool_path": spool, "process_max": 2})
    names = [seg_name(1, segno) for segno in range(3, 11)]
    for segno, name in zip(range(3, 11), names, strict=True):
        wal.segment(1, segno)
        wal.ready(name)
    for name in names:  # as PostgreSQL's archiver: one file at a time, in order
        result = wal.push(name)
        assert result.returncode == 0, result.stderr
        assert wal.object_path(name).is_file()  # durable before the answer
        assert not (spool / f"{name}.ok").exists()  # the answer was taken
        wal.done(name)
    archive = WalArchive(wal.repo())
    assert archive.segments(1) == names
    for name in names:
        archive.check(name)
    status = Spool(spool)
    wait_for(lambda: not status.pusher_running(), 30, "the idle pusher to exit")
    assert sorted(p.name for p in spool.iterdir()) == ["pusher.lock", "pusher.log"]


def test_async_mode_reports_failures_and_pushes_unmarked_files_itself(wal: WalRig) -> None:
    spool = wal.root / "spool"
    name = seg_name(1, 3)
    wal.segment(1, 3, seed=1)
    assert wal.push(name).returncode == 0  # archived earlier with other content
    wal.write_config(**{"async": True, "spool_path": spool})
    wal.segment(1, 3)
    wal.ready(name)
    failed = wal.push(name)
    assert failed.returncode == 10, failed.stderr
    assert "already archived with different content" in failed.stderr
    # PostgreSQL retries later; the pusher has tried again meanwhile, and fails the same way:
    # an archived file is never overwritten.
    again = wal.push(name)
    assert again.returncode == 10
    # A file PostgreSQL did not mark ready (run by hand) is pushed synchronously.
    wal.segment(1, 4)
    assert wal.push(seg_name(1, 4)).returncode == 0
    assert wal.object_path(seg_name(1, 4)).is_file()


def test_async_mode_with_a_full_spool_never_acknowledges_and_recovers(wal: WalRig) -> None:
    """The spool on a real file system that is full: the archive_command fails with a clear
    error (PostgreSQL keeps the file and retries), and once there is space again the retry
    succeeds and the segment is in the archive, intact."""
    spool = wal.root / "spool"
    spool.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(spool)], check=True
    )
    try:
        filler = spool / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:  # every block of the file system, until ENOSPC
                f.write(b"\0" * 65536)
                f.flush()
        wal.write_config(**{"async": True, "spool_path": spool, "push_timeout": 10})
        name = seg_name(1, 3)
        wal.segment(1, 3)
        wal.ready(name)
        started = time.monotonic()
        failed = wal.push(name)
        assert failed.returncode != 0, failed.stderr  # never acknowledged
        assert time.monotonic() - started < 60
        assert "Traceback" not in failed.stderr
        assert failed.stderr.startswith("drkit wal-push: error: "), failed.stderr
        assert "no space left on device" in failed.stderr, failed.stderr
        assert "hint: free space in" in failed.stderr, failed.stderr

        filler.unlink()  # space again: PostgreSQL's next try succeeds
        retried = wal.push(name)
        assert retried.returncode == 0, retried.stderr
        WalArchive(wal.repo()).check(name)
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)

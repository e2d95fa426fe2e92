"""Prune on synthetic repositories (real format, real encryption, no PostgreSQL): deletion order,
a prune killed at every possible point, Object Lock refusals, dry run, the CLI and its config."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rig.faulty import FaultyStorage
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.errors import BackupDeletionRefused, ObjectLocked
from drkit.prune.one_backup import delete_one_backup
from drkit.prune.operation import RepoPrune, prune_repository
from drkit.repo.label import BackupLabel
from drkit.repo.lock import operation_lock
from drkit.repo.manifest import BackupStats, FileEntry, Manifest, ObjectEntry
from drkit.repo.repository import Repository
from drkit.repo.retention import RetentionPolicy, WalCut
from drkit.storage.base import Storage
from drkit.storage.posix import PosixStorage

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=30)
SYSTEM_ID = 7000000000000000001


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


class RecordingStorage(FaultyStorage):
    """Remembers the order of deletes."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        super().delete(key)
        self.deleted.append(key)


def wal_name(timeline: int, segno: int) -> str:
    return f"{timeline:08X}00000000{segno:08X}"


class SyntheticRepo:
    """Backups with real manifests, key records and data objects, and WAL objects (dummy bytes:
    prune only lists them). Incrs reference their parent's frames, as real ones do."""

    def __init__(self, root: Path, keyfile: Path) -> None:
        self.root = root
        self.keyfile = keyfile
        self.repo = Repository(PosixStorage(root, name="local"), KeyfileProvider(keyfile))
        self.repo.initialize(SYSTEM_ID)
        self.chains: dict[str, list[str]] = {}
        self.last: str | None = None
        self.last_full: str | None = None

    def backup(self, kind: str, day: float, *, timeline: int = 1, segno: int = 0) -> str:
        when = T0 + timedelta(days=day)
        stamp = when.strftime("%Y%m%d-%H%M%S")
        if kind == "F":
            label, parent, chain = f"{stamp}F", None, []
        else:
            assert self.last_full is not None and self.last is not None
            parent = self.last_full if kind == "D" else self.last
            label = f"{self.last_full}_{stamp}{kind}"
            chain = [*self.chains[parent], parent]
        self.chains[label] = chain
        repo, backup = self.repo, BackupLabel(label)
        dek = repo.keys.new_data_key()
        objects, files = [], []
        for index in range(2):
            key = repo.data_key(backup, index)
            data = os.urandom(100)
            repo.storage.write_bytes(key, data)
            objects.append(ObjectEntry(key=key, size=100, sha256=hashlib.sha256(data).hexdigest()))
            files.append(self._file(f"base/{index}", key))
        if parent is not None:  # an unchanged file: a reference to the parent's frame
            files.append(self._file("global/old", f"backup/{parent}/data/000000", backup=parent))
        key_record = repo.write_key_record(backup, dek.record, dek.plaintext)
        repo.write_manifest(
            Manifest(
                label=label,
                type={"F": "full", "D": "diff", "I": "incr"}[kind],
                parent=parent,
                drkit_version="test",
                start_time=when,
                stop_time=when + timedelta(minutes=5),
                start_lsn="0/0",
                stop_lsn="0/0",
                timeline=timeline,
                start_wal=wal_name(timeline, segno),
                stop_wal=wal_name(timeline, segno),
                pg_version_num=150000,
                system_identifier=str(SYSTEM_ID),
                wal_segment_size=16 * 1024 * 1024,
                data_checksums=True,
                chain=chain,
                key_record=key_record,
                owner="postgres",
                group="postgres",
                tablespaces=[],
                directories=[],
                links=[],
                files=files,
                objects=objects,
                stats=BackupStats(files=len(files), size=0, stored=200, duration_s=1),
            ),
            dek.plaintext,
        )
        repo.write_verify_record(backup, ok=True, damaged=0)
        repo.storage.write_bytes(f"copies/{label}/s3.json", b"{}")
        self.last = label
        if kind == "F":
            self.last_full = label
        return label

    @staticmethod
    def _file(path: str, obj: str, backup: str | None = None) -> FileEntry:
        return FileEntry(
            path=path, size=1, mode=0o600, mtime=0, sha256="0" * 64, object=obj, offset=0,
            length=1, backup=backup,
        )  # fmt: skip

    def wal(self, timeline: int, segnos: range, *extra: str) -> None:
        for name in [wal_name(timeline, s) for s in segnos] + list(extra):
            self.repo.storage.write_bytes(f"wal/{name[:8]}/{name}", b"wal")

    def incomplete(self, kind: str, day: float) -> str:
        """Leftovers of a backup killed before its manifest: data and key record only."""
        stamp = (T0 + timedelta(days=day)).strftime("%Y%m%d-%H%M%S")
        label = f"{stamp}F" if kind == "F" else f"{self.last_full}_{stamp}{kind}"
        self.repo.storage.write_bytes(f"backup/{label}/data/000000", b"partial")
        self.repo.storage.write_bytes(f"backup/{label}/key/0001.json", b"{}")
        return label

    def objects(self) -> set[str]:
        return {o.key for o in self.repo.storage.list()}


def failed_runs_only(keys: set[str]) -> bool:
    """Whether ``keys`` are exactly one record of a failed prune run (drkit/repo/events.py)."""
    return len(keys) == 1 and all(
        k.startswith("events/prune/") and k.endswith("-fail.json") for k in keys
    )


def stable(keys: set[str]) -> set[str]:
    """Keys without the time stamps of verification records (which differ between runs)."""
    return {k.rsplit("/", 1)[0] + "/*" if "/verify/" in k else k for k in keys}


def assert_consistent(repo: Repository) -> None:
    """Every listed backup is whole: manifest and key record readable, every object it lists
    present, every backup it needs listed (and so whole too), every referenced frame present."""
    listed = {str(label) for label in repo.backups()}
    present = {o.key for o in repo.storage.list()}
    for label in listed:
        manifest, _ = repo.load_manifest(BackupLabel(label))
        assert {o.key for o in manifest.objects} <= present, label
        assert {f.object for f in manifest.files} <= present, label
        assert set(manifest.chain) <= listed, label


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    create_keyfile(path)
    return path


def two_families(root: Path, keyfile: Path) -> tuple[SyntheticRepo, list[str]]:
    """F1 I I D I | F2 I, WAL on timeline 1 from segment 1 to 0x30, plus a history file."""
    s = SyntheticRepo(root, keyfile)
    labels = [
        s.backup("F", 0, segno=0x02),
        s.backup("I", 1, segno=0x05),
        s.backup("I", 2, segno=0x08),
        s.backup("D", 3, segno=0x0B),
        s.backup("I", 4, segno=0x0E),
        s.backup("F", 5, segno=0x12),
        s.backup("I", 6, segno=0x15),
    ]
    s.wal(1, range(0x01, 0x31), "000000010000000000000003.partial")
    s.wal(1, range(0), "000000010000000000000011.00000028.backup")
    s.wal(2, range(0x20, 0x22), "00000002.history")
    return s, labels


def test_prune_deletes_newest_first_and_each_backup_manifest_first(
    tmp_path: Path, keyfile: Path
) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    old_leftover = s.incomplete("F", 0.5)
    new_leftover = s.incomplete("I", 9)  # newer than the newest backup: maybe still running
    recorder = RecordingStorage(s.repo.storage)
    repo = Repository(recorder, s.repo.keys)

    result = prune_repository(repo, RetentionPolicy(full=1), NOW)

    assert result.deleted == labels[4::-1]
    assert list(result.kept) == labels[5:]
    assert result.kept[labels[5]] == ["full 1 of 1"]
    assert result.leftovers == [old_leftover]
    assert result.wal_cuts == [WalCut(1, wal_name(1, 0x12)), WalCut(2, wal_name(2, 0x12))]
    assert result.wal_deleted == [
        *(wal_name(1, n) for n in range(1, 4)),
        "000000010000000000000003.partial",
        *(wal_name(1, n) for n in range(4, 0x12)),
        "000000010000000000000011.00000028.backup",
    ]
    assert not result.skipped and not result.held and not result.warning

    # Order: per backup (newest first) manifest, then records, then key records, then data
    per_backup = [[k for k in recorder.deleted if f"/{label}/" in k] for label in labels[:5]]
    for label, keys in zip(labels[:5], per_backup, strict=True):
        assert keys[:2] == [f"backup/{label}/manifest", f"copies/{label}/s3.json"]
        assert [k.split("/")[2] for k in keys[2:]] == ["verify", "key", "data", "data"]
    positions = [recorder.deleted.index(f"backup/{label}/manifest") for label in labels[:5]]
    assert positions == sorted(positions, reverse=True)  # newest backup first
    first_wal = recorder.deleted.index(f"wal/00000001/{wal_name(1, 1)}")
    assert all(not k.startswith("wal/") for k in recorder.deleted[:first_wal])

    assert [str(b) for b in s.repo.backups()] == labels[5:]
    assert s.repo.incomplete() == [BackupLabel(new_leftover)]
    assert {k for k in s.objects() if k.startswith("wal/")} == {
        *(f"wal/00000001/{wal_name(1, n)}" for n in range(0x12, 0x31)),
        "wal/00000002/00000002.history",
        *(f"wal/00000002/{wal_name(2, n)}" for n in range(0x20, 0x22)),
    }
    assert_consistent(s.repo)
    # A second run finds nothing to do
    again = prune_repository(s.repo, RetentionPolicy(full=1), NOW)
    assert again.deleted == [] and again.wal_deleted == [] and again.leftovers == []


def test_dry_run_lists_exactly_what_the_run_deletes(tmp_path: Path, keyfile: Path) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    leftover = s.incomplete("F", 0.5)
    before = s.objects()
    policy = RetentionPolicy(window=timedelta(days=26, hours=12))  # anchor: the day-3 diff
    dry = prune_repository(s.repo, policy, NOW, dry_run=True)
    assert s.objects() == before
    real = prune_repository(s.repo, policy, NOW)
    assert dry.as_dict() | {"dry_run": False} == real.as_dict()
    # the anchor is the day-3 diff, which needs only the full: the incrs before it go
    assert dry.deleted == [labels[2], labels[1]]
    assert dry.leftovers == [leftover] and dry.wal_deleted == [wal_name(1, 1)]
    gone = before - s.objects()
    expected = {k for k in before if any(f"/{label}/" in k for label in dry.deleted)}
    expected |= {k for k in before if any(k.endswith(f"/{n}") for n in dry.wal_deleted)}
    expected |= {k for k in before if any(f"/{label}/" in k for label in dry.leftovers)}
    assert gone == expected


def test_killed_at_every_delete_leaves_a_consistent_repository(
    tmp_path: Path, keyfile: Path
) -> None:
    policy = RetentionPolicy(full=1)
    reference, _ = two_families(tmp_path / "reference", keyfile)
    recorder = RecordingStorage(reference.repo.storage)
    prune_repository(Repository(recorder, reference.repo.keys), policy, NOW)
    final = reference.objects()
    deletes = len(recorder.deleted)
    assert deletes > 40

    for crash_at in range(1, deletes + 1):
        s, _ = two_families(tmp_path / f"repo-{crash_at}", keyfile)
        faulty = FaultyStorage(s.repo.storage)
        for _ in range(crash_at - 1):
            faulty.add_fault("delete", hook=lambda: None)
        faulty.add_fault("delete", Crash(f"killed at delete {crash_at}"))
        with pytest.raises(Crash):
            prune_repository(Repository(faulty, s.repo.keys), policy, NOW)
        assert_consistent(s.repo)
        # The next prune finishes the job: the same repository as an uninterrupted prune
        prune_repository(s.repo, policy, NOW)
        assert stable(s.objects()) == stable(final), crash_at


def locked(storage: Storage, *keys: str) -> FaultyStorage:
    """``storage`` where deleting any of ``keys`` is refused as S3 Object Lock refuses it."""
    faulty = FaultyStorage(storage)
    until = datetime(2030, 1, 1, tzinfo=UTC)
    for key in keys:
        error = ObjectLocked(f"object '{key}' is protected by Object Lock", until=until)
        faulty.add_fault("delete", error, key=key, times=None)
    return faulty


def test_a_locked_manifest_keeps_its_backup_and_everything_it_needs(
    tmp_path: Path, keyfile: Path
) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    f1, i1, i2, d1, i3 = labels[:5]
    manifest = f"backup/{i2}/manifest"
    before = s.objects()
    repo = Repository(locked(s.repo.storage, manifest), s.repo.keys)

    result = prune_repository(repo, RetentionPolicy(full=1), NOW)

    assert result.deleted == [i3, d1]
    assert result.held == {
        i2: "its manifest is under a retention lock",
        i1: f"needed by {i2}, which stays",
        f1: f"needed by {i2}, which stays",
    }
    assert list(result.kept) == [f1, i1, i2, *labels[5:]]
    assert [(x.key, x.until) for x in result.skipped] == [
        (manifest, datetime(2030, 1, 1, tzinfo=UTC))
    ]
    assert result.warning
    # nothing of the locked backup or its chain was touched; their WAL stays too
    for label in (f1, i1, i2):
        assert {k for k in before if f"/{label}/" in k} <= s.objects()
    assert result.wal_cuts == [WalCut(1, wal_name(1, 0x02)), WalCut(2, wal_name(2, 0x02))]
    assert result.wal_deleted == [wal_name(1, 0x01)]
    assert_consistent(s.repo)
    assert [str(b) for b in s.repo.backups()] == [f1, i1, i2, *labels[5:]]


def test_a_locked_data_object_is_left_behind_and_removed_once_unlocked(
    tmp_path: Path, keyfile: Path
) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    data = f"backup/{labels[0]}/data/000001"
    repo = Repository(locked(s.repo.storage, data, f"wal/00000001/{wal_name(1, 3)}"), s.repo.keys)

    result = prune_repository(repo, RetentionPolicy(full=1), NOW)

    assert result.deleted == labels[4::-1]  # its manifest went: the backup is no longer listed
    assert [x.key for x in result.skipped] == [data, f"wal/00000001/{wal_name(1, 3)}"]
    assert result.held == {} and result.warning
    assert wal_name(1, 3) not in result.wal_deleted and wal_name(1, 4) in result.wal_deleted
    assert data in s.objects()
    assert s.repo.incomplete() == [BackupLabel(labels[0])]
    assert_consistent(s.repo)

    # Retention expired: the next prune removes the leftover (and the WAL segment)
    later = prune_repository(s.repo, RetentionPolicy(full=1), NOW)
    assert later.leftovers == [labels[0]] and later.wal_deleted == [wal_name(1, 3)]
    assert s.repo.incomplete() == []


def test_an_unauthentic_manifest_is_left_out_kept_and_reported(
    tmp_path: Path, keyfile: Path
) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    path = tmp_path / "repo" / "backup" / labels[3] / "manifest"
    path.chmod(0o600)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    result = prune_repository(s.repo, RetentionPolicy(full=1), NOW)
    assert list(result.unreadable) == [labels[3]]
    assert f"manifest of backup '{labels[3]}' is damaged" in result.unreadable[labels[3]]
    assert result.warning
    # the policy's decision over the authentic backups; the unauthentic one stays whole
    assert sorted(result.deleted) == sorted([labels[0], labels[1], labels[2], labels[4]])
    assert list(result.kept) == [labels[5], labels[6]]
    assert [k for k in s.objects() if f"/{labels[3]}/" in k] != []
    assert path.exists()


def test_no_backups_prunes_nothing(tmp_path: Path, keyfile: Path) -> None:
    s = SyntheticRepo(tmp_path / "repo", keyfile)
    s.wal(1, range(1, 5))
    before = s.objects()
    result = prune_repository(s.repo, RetentionPolicy(full=1), NOW)
    kept_since = NOW - timedelta(days=400)  # drill records: 400 days, whatever the policy
    assert result == RepoPrune("local", False, policy="full = 1", drills_kept_since=kept_since)
    assert s.objects() == before


# -- the command line ----------------------------------------------------------------------------


def write_config(tmp_path: Path, keyfile: Path, body: str) -> Path:
    config = tmp_path / "drkit.toml"
    config.write_text(
        f'lock_path = "{tmp_path / "locks"}"\n'
        f'[postgres]\npgdata = "{tmp_path / "pgdata"}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{keyfile}"\n' + body
    )
    return config


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["prune", *args, "--config", str(config)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_applies_each_repository_its_own_policy(tmp_path: Path, keyfile: Path) -> None:
    one, labels = two_families(tmp_path / "one", keyfile)
    two, _ = two_families(tmp_path / "two", keyfile)
    three, _ = two_families(tmp_path / "three", keyfile)
    config = write_config(
        tmp_path,
        keyfile,
        "[retention]\nfull = 1\n"
        f'[[repo]]\nname = "one"\npath = "{one.root}"\n'
        f'[[repo]]\nname = "two"\npath = "{two.root}"\nretention = {{ full = 2 }}\n'
        f'[[repo]]\nname = "three"\npath = "{three.root}"\n'
        '[repo.retention]\nwindow = "3650d"\n',
    )
    before = {s.root: s.objects() for s in (one, two, three)}

    code, out, err = cli(config, "--dry-run")
    assert code == 0, err
    assert {s.root: s.objects() for s in (one, two, three)} == before
    assert "repository 'one' (retention: full = 1)" in out
    assert f"  would delete {labels[4]}\n" in out
    assert "repository 'two' (retention: full = 2)" in out
    assert "repository 'three' (retention: window = 3650d)" in out
    assert "would delete 5 backup(s), 0 leftover(s), 19 WAL file(s); kept 2 backup(s)" in out
    assert "would delete 0 backup(s), 0 leftover(s), 1 WAL file(s); kept 7 backup(s)" in out
    assert "(dry run: nothing was deleted)" in out

    code, out, err = cli(config, "--repo", "one", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["dry_run"] is False and [r["repo"] for r in data["repos"]] == ["one"]
    assert data["repos"][0]["deleted"] == labels[4::-1]
    assert [k["label"] for k in data["repos"][0]["kept"]] == labels[5:]
    assert [str(b) for b in one.repo.backups()] == labels[5:]
    assert two.objects() == before[two.root]

    code, out, err = cli(config, "--repo", "nope")
    assert code == 3 and "no repository named 'nope'" in err


def test_cli_without_any_policy_is_a_configuration_error(tmp_path: Path, keyfile: Path) -> None:
    s, _ = two_families(tmp_path / "repo", keyfile)
    config = write_config(tmp_path, keyfile, f'[[repo]]\nname = "local"\npath = "{s.root}"\n')
    before = s.objects()
    code, _, err = cli(config)
    assert code == 3
    assert "error: no retention policy is configured" in err and "HINT:" in err
    assert failed_runs_only(s.objects() - before) and before <= s.objects()  # nothing deleted
    bad = write_config(
        tmp_path,
        keyfile,
        f'[retention]\nwindow = "a month"\n[[repo]]\nname = "x"\npath = "{s.root}"\n',
    )
    code, _, err = cli(bad)
    assert code == 3 and "retention.window" in err and "'30d'" in err


def test_cli_refuses_to_run_beside_a_backup(tmp_path: Path, keyfile: Path) -> None:
    s, _ = two_families(tmp_path / "repo", keyfile)
    config = write_config(
        tmp_path, keyfile, f'[retention]\nfull = 1\n[[repo]]\nname = "local"\npath = "{s.root}"\n'
    )
    before = s.objects()
    with operation_lock(tmp_path / "locks", f"posix:{s.root}", "backup"):
        code, _, err = cli(config)
        assert code == 5 and "another backup is already running" in err
        assert failed_runs_only(s.objects() - before) and before <= s.objects()
        code, out, _ = cli(config, "--dry-run")  # a dry run deletes nothing and needs no lock
        assert code == 0 and "would delete 5 backup(s)" in out
    code, out, _ = cli(config)
    assert code == 0 and "deleted 5 backup(s)" in out


def backup_objects(s: SyntheticRepo) -> set[str]:
    """The repository's objects without the lease records a prune leaves (released)."""
    return {k for k in s.objects() if not k.startswith("leases/")}


def test_prune_backup_deletes_one_backup_and_its_dependents_only_when_asked(
    tmp_path: Path, keyfile: Path
) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    f1, i1, i2, d1, i3, f2, i4 = labels
    config = write_config(tmp_path, keyfile, f'[[repo]]\nname = "local"\npath = "{s.root}"\n')
    before = backup_objects(s)
    wal_before = {k for k in before if k.startswith("wal/")}

    # A backup others need is refused, naming them; nothing is touched
    code, _, err = cli(config, "--backup", f1)
    assert code == BackupDeletionRefused.exit_code == 28, err
    assert (
        f"backup '{f1}' cannot be deleted alone: 4 backup(s) depend on it: {i1}, {i2}, {d1}, {i3}"
        in err
    )
    assert "HINT: add --with-dependents" in err
    assert backup_objects(s) == before

    # The dry run lists, newest first, what --with-dependents deletes
    code, out, err = cli(config, "--backup", f1, "--with-dependents", "--dry-run")
    assert code == 0, err
    assert f"  would delete {i3} (depends on {f1})\n" in out
    assert (
        out.index(i3) < out.index(d1) < out.index(i2) < out.index(i1) < out.index(f"delete {f1}\n")
    )
    assert "would delete 5 backup(s) (dry run: nothing was deleted)" in out
    assert backup_objects(s) == before

    # A backup nothing depends on goes alone; the WAL stays for the policy prune
    code, out, err = cli(config, "--backup", i2, "--json")
    assert code == 0, err
    assert json.loads(out)["repos"][0]["deleted"] == [i2]
    assert [str(b) for b in s.repo.backups()] == [f1, i1, d1, i3, f2, i4]
    assert_consistent(s.repo)

    code, out, err = cli(config, "--backup", f1, "--with-dependents")
    assert code == 0, err
    assert "deleted 4 backup(s)" in out
    assert [str(b) for b in s.repo.backups()] == [f2, i4]
    assert not any(f"/{f1}" in k for k in backup_objects(s))  # no leftover of the chain
    assert {k for k in backup_objects(s) if k.startswith("wal/")} == wal_before
    assert_consistent(s.repo)

    # The newest backup always stays, and one no repository has is an error
    code, _, err = cli(config, "--backup", f2, "--with-dependents")
    assert code == 28 and f"backup '{i4}' is the newest backup" in err
    code, _, err = cli(config, "--backup", f1)
    assert code == 7 and f"backup '{f1}' is in no repository" in err
    code, _, err = cli(config, "--with-dependents")
    assert code == 2 and "--with-dependents goes with --backup LABEL" in err


def test_prune_backup_never_forces_a_retention_lock(tmp_path: Path, keyfile: Path) -> None:
    s, labels = two_families(tmp_path / "repo", keyfile)
    f1, i1, i2, d1, i3 = labels[:5]
    repo = Repository(locked(s.repo.storage, f"backup/{d1}/manifest"), s.repo.keys)
    result = RepoPrune("local", dry_run=False)

    delete_one_backup(repo, f1, True, False, result)

    # D1 stays listed under its lock, and so does F1, which it needs; the rest goes
    assert result.deleted == [i3, i2, i1]
    assert result.held == {
        d1: "its manifest is under a retention lock",
        f1: f"needed by {d1}, which stays",
    }
    assert [str(b) for b in s.repo.backups()] == [f1, d1, *labels[5:]]
    assert_consistent(s.repo)

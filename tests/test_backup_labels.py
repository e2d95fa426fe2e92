"""The newest backup is the last label: a new backup's label sorts after every backup in the
repository, so the parent of an incr, `--backup latest` and retention see backups in the order
they were taken, even two taken within one second."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.repo.label import BackupLabel, BackupType, label_after


def test_a_label_is_given_only_once_it_sorts_after_the_newest() -> None:
    now = datetime(2026, 12, 8, 2, 48, 1, tzinfo=UTC)
    full = BackupLabel("20261208-024800F")
    incr = BackupLabel("20261208-024800F_20261208-024801I")
    # a diff in the incr's second would sort before it: wait for the next second
    assert label_after(BackupType.DIFF, now, full, incr) is None
    later = label_after(BackupType.DIFF, now + timedelta(seconds=1), full, incr)
    assert later == BackupLabel("20261208-024800F_20261208-024802D") and later > incr
    assert label_after(BackupType.INCR, now, full, BackupLabel(f"{full}_20261208-024801D"))
    assert label_after(BackupType.FULL, now, None, incr) == BackupLabel("20261208-024801F") > incr
    assert label_after(BackupType.FULL, now, None, None) == BackupLabel("20261208-024801F")
    # a newest label that waiting cannot pass is not waited for: an earlier second that sorts
    # after this lineage (a forged full), or one far in the future (a forged one, a clock ahead)
    forged = BackupLabel("20261208-024700F")
    old_full = BackupLabel("20261208-024600F")
    assert label_after(BackupType.INCR, now, old_full, forged) == BackupLabel(
        "20261208-024600F_20261208-024801I"
    )
    assert label_after(BackupType.INCR, now, full, BackupLabel("20991231-000000F"))


def test_backups_in_one_second_chain_in_the_order_taken(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    taken = []
    for kind in ("full", "incr", "diff", "incr"):  # back to back: often within one second
        taken.append(json.loads(dk.ok("backup", "--type", kind, "--json").stdout))
    labels = [b["label"] for b in taken]
    assert labels == sorted(labels) and len(set(labels)) == 4
    assert [b["parent"] for b in taken[1:]] == [labels[0], labels[0], labels[2]]
    assert [b["label"] for b in dk.info()["backups"]] == labels

    # A label far in this host's future (here an unauthentic copy, which every reader skips)
    # holds no backup up: it is not waited for
    future = f"{datetime.now(UTC) + timedelta(hours=1):%Y%m%d-%H%M%S}F"
    shutil.copytree(dk.repo_path / "backup" / labels[0], dk.repo_path / "backup" / future)
    result = dk.run("backup", "--type", "incr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parent"] == labels[3]

"""`[drill] reuse_sandbox`: drills share one kept sandbox, each restoring into it by delta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rig.archive import switch_wal, wait_archived
from rig.postgres import PgCluster, attach_cluster, database_checksums
from test_drill import drill_setup, postgres_under, run_drill

from drkit.drill.sandbox import Sandbox, reuse_sandbox


def test_a_second_drill_restores_the_reused_sandbox_by_delta_and_checks_an_exact_copy(
    pg_factory: Any, workdir: Path
) -> None:
    pg: PgCluster = pg_factory(15)
    dk = drill_setup(pg, workdir, reuse_sandbox=True)
    code, first, _ = run_drill(dk)
    assert code == 0, first["record"]
    sandbox = Path(first["sandbox"])
    assert sandbox == workdir / "sandboxes" / "reusable"
    assert sandbox.stat().st_mode & 0o777 == 0o700
    assert postgres_under(sandbox) == []

    # The source moves on; the next drill writes only what differs from the last drill's copy
    pg.psql("UPDATE orders SET note = 'changed' WHERE id <= 10")
    dk.ok("backup", "--type", "incr")
    pg.psql("INSERT INTO orders SELECT g, 'later' FROM generate_series(2501, 2600) g")
    wait_archived(pg, switch_wal(pg))
    source = database_checksums(pg)

    code, second, _ = run_drill(dk)
    record = second["record"]
    assert code == 0 and record["outcome"] == "PASS", record
    assert {c["name"]: c["ok"] for c in record["checks"]} == {"amcheck": True}
    delta = second["delta"]
    assert delta["unchanged"] > 2 * (delta["rewritten"] + delta["patched"]) > 0
    (restore,) = [p for p in record["phases"] if p["name"] == "restore"]
    assert "by delta into the reused sandbox" in restore["detail"]
    assert Path(second["sandbox"]) == sandbox
    assert sorted(p.name for p in sandbox.parent.iterdir()) == ["reusable"]
    assert sorted(p.name for p in sandbox.iterdir() if p.name != "run") == [
        ".drill.lock",
        "pg_hba.conf",
        "pgdata",
        "server.log",
    ]
    assert postgres_under(sandbox) == []

    # What the checks ran on holds exactly the source's rows, table by table
    copy = attach_cluster(sandbox / "pgdata", pg.version, workdir)
    copy.start()
    assert database_checksums(copy) == source
    copy.stop()


def test_the_reused_sandbox_is_never_shared_and_keeps_only_the_copy(workdir: Path) -> None:
    """Two drills at once never share it (the second gets None and takes a fresh sandbox); the
    leftovers of the last drill are removed, links too, never what they point to."""
    parent = workdir / "sandboxes"

    def take() -> Sandbox | None:
        return reuse_sandbox(
            parent, forbidden=[], needed_bytes=0, server_user=None, tablespaces={16384}
        )

    first = take()
    assert first is not None and first.reused and first.root == parent / "reusable"
    assert take() is None
    first.release()

    outside = workdir / "outside"
    outside.mkdir()
    (outside / "precious").write_text("not drkit's\n")
    (first.root / "pgdata").mkdir()
    (first.root / "pgdata" / "PG_VERSION").write_text("15\n")
    (first.root / "server.log").write_text("the last drill's log\n")
    (first.root / "pg_hba.conf").symlink_to(outside / "precious")
    for name in ("16384", "16385"):
        (first.root / "tablespaces" / name).mkdir(parents=True)
    (first.root / "tablespaces" / "16386").symlink_to(outside)
    second = take()
    assert second is not None
    assert sorted(p.name for p in second.root.iterdir()) == [".drill.lock", "pgdata", "tablespaces"]
    assert [p.name for p in (second.root / "tablespaces").iterdir()] == ["16384"]
    assert (second.root / "pgdata" / "PG_VERSION").read_text() == "15\n"
    assert (outside / "precious").read_text() == "not drkit's\n"
    second.release()

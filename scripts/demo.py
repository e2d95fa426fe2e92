"""`make demo`: drkit end to end on a throwaway PostgreSQL, then clean up.

Starts a PostgreSQL 15 cluster in a temporary directory, fills it with pgbench data, takes a full
backup with drkit into a local encrypted repository, restores it into a new directory, starts the
restored copy beside the original and compares every table row by row.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rig.postgres import (  # noqa: E402
    attach_cluster,
    chown_to_server_user,
    clone_cluster,
    database_checksums,
    make_template,
)

DRKIT = str(Path(sys.executable).parent / "drkit")


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def drkit(*args: str, config: Path, ok: tuple[int, ...] = (0,)) -> None:
    command = [DRKIT, *args, "--config", str(config)]
    print("$ drkit " + " ".join(args), flush=True)
    code = subprocess.run(command).returncode
    if code not in ok:
        raise SystemExit(f"drkit {args[0]} failed (exit status {code})")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="drkit-demo-", dir="/tmp"))
    root.chmod(0o755)
    chown_to_server_user(root)
    clusters = []
    try:
        step("a throwaway PostgreSQL 15 with pgbench data")
        source = clone_cluster(make_template(15, root), 15, root)
        clusters.append(source)
        source.start()
        source.run_bin("pgbench", "-i", "-s", "10", "-q")
        source.psql(
            "CREATE TABLE notes AS SELECT g AS id, md5(g::text) AS body"
            " FROM generate_series(1, 50000) g"
        )

        step("configure drkit: a key file and a local repository")
        config = root / "drkit.toml"
        subprocess.run([DRKIT, "keys", "create-keyfile", str(root / "backup.key")], check=True)
        config.write_text(
            f'lock_path = "{root / "locks"}"\n'
            f'[postgres]\npgdata = "{source.pgdata}"\nhost = "{source.socket_dir}"\n'
            f"port = {source.port}\n"
            f'[keys]\nprovider = "keyfile"\nkeyfile = "{root / "backup.key"}"\n'
            f'[[repo]]\nname = "local"\npath = "{root / "repo"}"\n'
            "[backup]\nstart_fast = true\n"
        )
        print(config.read_text())

        step("init, backup, info, verify")
        drkit("init", config=config)
        drkit("backup", "--type", "full", config=config)
        # one local repository does not meet 3-2-1: info warns, with exit status 1
        drkit("info", config=config, ok=(0, 1))
        drkit("verify", config=config)

        step("restore into a new directory and start it beside the original")
        target = root / "restored"
        drkit("restore", "--pgdata", str(target), config=config)
        restored = attach_cluster(target, 15, root)
        clusters.append(restored)
        restored.start()

        step("compare every table, row by row")
        before, after = database_checksums(source), database_checksums(restored)
        tables = sum(len(t) for t in before.values())
        if before != after:
            raise SystemExit("demo FAILED: the restored data differs from the source")
        print(f"identical: {tables} tables in {len(before)} databases")
    finally:
        step("clean up")
        for cluster in reversed(clusters):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")


if __name__ == "__main__":
    main()

"""`make demo`: drkit end to end on a throwaway PostgreSQL, then clean up.

Starts a PostgreSQL 15 cluster in a temporary directory with drkit's own server control
(drkit.pg.cluster), fills it with pgbench data, takes a full backup with drkit into a local
encrypted repository, restores it into a new directory, starts the restored copy beside the
original and compares every table row by row. It ends with the proof drkit exists for: a drill
of the backup (restored into a sandbox, started, checked with amcheck), its phases and the
achieved RTO and RPO against the demo's targets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from drkit.pg.binaries import find_bindir
from drkit.pg.cluster import Cluster, database_checksums

PG_MAJOR = 15
RTO, RPO = "5m", "1h"  # the demo's targets: a drill missing one exits 32 and ends the demo
DRKIT = str(Path(sys.executable).parent / "drkit")


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def drkit(*args: str, config: Path, ok: tuple[int, ...] = (0,)) -> None:
    command = [DRKIT, *args, "--config", str(config)]
    print("$ drkit " + " ".join(args), flush=True)
    code = subprocess.run(command).returncode
    if code not in ok:
        raise SystemExit(f"drkit {args[0]} failed (exit status {code})")


def as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses root: run its tools as the postgres user when the demo runs as root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="drkit-demo-", dir="/tmp"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    bindir = find_bindir(PG_MAJOR)
    try:
        with contextlib.ExitStack() as servers:
            step(f"a throwaway PostgreSQL {PG_MAJOR} with pgbench data")
            pgdata = root / "source"
            initdb = [str(bindir / "initdb"), "-D", str(pgdata), "--data-checksums"]
            initdb += ["-A", "trust", "-U", "postgres", "--no-sync"]
            subprocess.run(as_server_user(initdb), check=True, cwd="/", stdout=subprocess.DEVNULL)
            source = Cluster(
                pgdata=pgdata, bindir=bindir, socket_dir=root / "sock", log_file=root / "source.log"
            )
            servers.enter_context(source.running())
            pgbench = [str(bindir / "pgbench"), "-i", "-s", "10", "-q", source.conninfo()]
            subprocess.run(pgbench, check=True)
            with source.connect() as conn:
                conn.execute(
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
                "[retention]\nfull = 2\n"
                f'[drill]\nrto = "{RTO}"\nrpo = "{RPO}"\nsandbox = "{root / "drills"}"\n'
            )
            print(config.read_text())

            step("init, backup, info, verify")
            drkit("init", config=config)
            if os.geteuid() == 0:
                # The drill's throwaway server runs as postgres, and so does the drkit wal-fetch
                # it calls: like a real installation, that user reads the key and the repository
                for path in (root / "backup.key", root / "repo"):
                    subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)
            drkit("backup", "--type", "full", config=config)
            # one repository and a retention: nothing to warn about (3-2-1 is not required
            # of a single repository unless [copies] require_321 = true)
            drkit("info", config=config)
            drkit("verify", config=config)

            step("restore into a new directory and start it beside the original")
            target = root / "restored"
            drkit("restore", "--pgdata", str(target), config=config)
            restored = Cluster(
                pgdata=target,
                bindir=bindir,
                socket_dir=root / "sock",
                log_file=root / "restored.log",
            )
            servers.enter_context(restored.running())
            restored.wait_promoted()

            step("compare every table, row by row")
            before, after = database_checksums(source), database_checksums(restored)
            tables = sum(len(t) for t in before.values())
            if before != after:
                raise SystemExit("demo FAILED: the restored data differs from the source")
            print(f"identical: {tables} tables in {len(before)} databases")

            step(f"the proof: a drill of the backup, against the targets RTO {RTO}, RPO {RPO}")
            drkit("drill", "--backup", "latest", config=config)
            step("clean up")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")


if __name__ == "__main__":
    main()

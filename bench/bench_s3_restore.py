"""Restore from S3 (moto on loopback) against restore from disk, and against pgBackRest from S3.

Run as root on a machine with PostgreSQL 15 (Debian packages), pgbackrest, openssl and stunnel4:

    .venv/bin/python bench/bench_s3_restore.py --scale 10 [--runs 2]

It builds a pgbench database (the random profile of bench_full.py) and starts one moto S3
server on loopback, behind stunnel for HTTPS with a self-signed certificate (pgBackRest speaks
only HTTPS to S3). drkit takes one full backup into a local repository with an S3 copy (the
backup fans out); pgBackRest takes one full backup into its own bucket of the same server. Each
run restores three times, timing the restore command and the start until promoted, page cache
dropped before each: drkit from the local repository, drkit from S3 alone (the local repository
moved away, so the restore falls back to the S3 copy), and pgBackRest from S3. Every restored
cluster's data is compared with the source's. moto copies a whole object for every ranged GET
and runs on the same two cores, so these are moto's numbers, not a real store's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from bench_full import (
    DRKIT,
    PROCESS_MAX,
    ZSTD_LEVEL,
    Bench,
    PgBackRest,
    build_source,
    empty_target,
    measure_restore,
    print_step,
    summary,
)
from common import Measurement, drop_page_cache, run_measured
from rig.drkit import Drkit
from rig.postgres import chown_to_server_user, make_rig_dir, stop_clusters_under
from rig.servers import LOOPBACK, _Process, _wait_until, free_port

KEY_ID, SECRET = "benchkey", "benchsecret"
REGION = "us-east-1"


class Moto:
    """``python -m moto.server`` on loopback, over HTTPS with a self-signed certificate for
    127.0.0.1 if ``tls``, else over plain HTTP."""

    def __init__(self, root: Path, tls: bool) -> None:
        self.dir = root
        self.tls = tls
        self.cert, key = root / "moto.crt", root / "moto.key"
        if tls:
            self._certificate(key)
        self.port = free_port()
        moto_port = free_port() if tls else self.port
        cmd = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(moto_port)]
        self._proc = _Process(cmd, root / "moto.log", dict(os.environ))
        self._tls: _Process | None = None
        if tls:  # stunnel in front: moto's own HTTPS closes connections pgBackRest rejects
            conf = root / "stunnel.conf"
            conf.write_text(
                f"foreground = yes\n[s3]\naccept = {LOOPBACK}:{self.port}\n"
                f"connect = {LOOPBACK}:{moto_port}\ncert = {self.cert}\nkey = {key}\n"
            )
            self._tls = _Process(["stunnel", str(conf)], root / "stunnel.log", dict(os.environ))
        _wait_until(self._answers, "moto server", 60, self._proc)

    def _certificate(self, key: Path) -> None:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
                *("-keyout", str(key), "-out", str(self.cert)),
            ],
            check=True,
            capture_output=True,
        )
        self.cert.chmod(0o644)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        env = {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        if self.tls:
            env["AWS_CA_BUNDLE"] = str(self.cert)
        return env

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            verify=str(self.cert) if self.tls else None,
        )
        client.create_bucket(Bucket=name)

    def _answers(self) -> bool:
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.cert)) if self.tls else None
        try:
            url = f"{self.endpoint_url}/moto-api/"
            urllib.request.urlopen(url, timeout=2, context=context)  # noqa: S310 (https, ours)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self._tls is not None:
            self._tls.terminate()
        self._proc.terminate()


def drkit_setup(bench: Bench, source: object, moto: Moto) -> Drkit:
    bucket = f"drkit-{uuid.uuid4().hex[:8]}"
    moto.create_bucket(bucket)
    s3_repo = {
        "name": "s3",
        "type": "s3",
        "bucket": bucket,
        "prefix": "bench",
        "endpoint_url": moto.endpoint_url,
        "region": REGION,
    }
    dk = Drkit(
        source,  # type: ignore[arg-type]
        make_rig_dir(bench.root, "drkit-"),
        backup={"process_max": PROCESS_MAX, "compress_level": ZSTD_LEVEL, "start_fast": True},
        extra_repos=[s3_repo],
    )
    dk.ok("init")
    backup = [str(DRKIT), "backup", "--type", "full", "--config", str(dk.config)]
    run_measured(backup, log=bench.log)
    return dk


def pgbackrest_setup(bench: Bench, source: object, moto: Moto) -> PgBackRest:
    bucket = f"pgbr-{uuid.uuid4().hex[:8]}"
    moto.create_bucket(bucket)
    pgbr = PgBackRest(bench, source)  # type: ignore[arg-type]
    text = pgbr.config.read_text().replace(
        f"repo1-path={pgbr.repo}\n",
        "repo1-type=s3\nrepo1-path=/bench\n"
        f"repo1-s3-bucket={bucket}\nrepo1-s3-endpoint={LOOPBACK}\n"
        f"repo1-storage-port={moto.port}\nrepo1-s3-region={REGION}\n"
        "repo1-s3-uri-style=path\n"
        "repo1-storage-verify-tls=n\n"  # it matches no IP address in a certificate
        f"repo1-s3-key={KEY_ID}\nrepo1-s3-key-secret={SECRET}\n",
    )
    pgbr.config.write_text(text)
    chown_to_server_user(pgbr.config)
    pgbr.setup(source)  # type: ignore[arg-type]
    run_measured(pgbr.command("backup", "--type=full"), log=bench.log, cwd=pgbr.dir)
    return pgbr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--busy-ok",
        action="store_true",
        help="measure at once, without waiting for an idle machine (a shared, loaded machine)",
    )
    parser.add_argument(
        "--no-pgbackrest", action="store_true", help="drkit alone, over plain HTTP (no TLS)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="drkit-bench-s3-"))
    root.chmod(0o755)
    bench = Bench(root, args.scale)
    if args.busy_ok:
        bench.prepare_step = lambda: bench.cache_drop_works and drop_page_cache()  # type: ignore[method-assign]
    moto = Moto(make_rig_dir(root, "moto-"), tls=not args.no_pgbackrest)
    os.environ.update(moto.env())
    results: dict[str, list[Measurement]] = {}
    try:
        source = build_source(bench, "random")
        expected = summary(source)
        print(f"source: {expected}", flush=True)
        dk = drkit_setup(bench, source, moto)
        config = ["--config", str(dk.config)]
        pgbr = None if args.no_pgbackrest else pgbackrest_setup(bench, source, moto)
        moved = dk.repo_path.with_name("repo-away")
        for run in range(args.runs):
            print(f"run {run + 1}:", flush=True)
            steps: list[tuple[str, list[str], bool]] = [("drkit posix", ["restore"], False)]
            steps.append(("drkit s3", ["restore"], True))
            if pgbr is not None:
                steps.append(("pgBackRest s3", [], False))
            for name, _, from_s3 in steps:
                target = empty_target(bench, f"restored-{run}-{name.replace(' ', '-')}")
                if name.startswith("drkit"):
                    cmd = [str(DRKIT), "restore", "--pgdata", str(target.pgdata), *config]
                else:
                    assert pgbr is not None
                    cmd = pgbr.command(
                        f"--pg1-path={target.pgdata}",
                        "--type=immediate",
                        "--target-action=promote",
                        "restore",
                    )
                if from_s3:  # the local repository is gone: drkit exits 103, restored from s3
                    script = 'rc=0; "$@" || rc=$?; exit $((rc == 103 ? 0 : rc))'
                    cmd = ["bash", "-c", script, "-", *cmd]
                    dk.repo_path.rename(moved)
                try:
                    measured = measure_restore(bench, name, cmd, target, expected)
                finally:
                    if from_s3:
                        moved.rename(dk.repo_path)
                print(f"  {name}:", flush=True)
                print_step(measured)
                results.setdefault(name, []).append(measured)
    finally:
        stop_clusters_under(root)
        moto.stop()
    for name, measured in results.items():
        walls = ", ".join(f"{m.detail['restore_s']:.2f}" for m in measured)
        cpus = ", ".join(f"{m.cpu_s:.2f}" for m in measured)
        print(f"{name}: restore command {walls} s wall, {cpus} s CPU")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

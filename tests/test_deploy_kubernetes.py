"""deploy/kubernetes/ and the Dockerfile: every manifest is valid Kubernetes (offline schemas of
the oldest and newest supported release), the kustomization renders, the pieces agree with each
other and with drkit's configuration, and the image's build steps pass hadolint."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from drkit.config.settings import load_settings
from drkit.errors import UnsafePathError
from drkit.pg.basebackup import check_passfile
from drkit.private_dir import open_private_dir
from drkit.schedule.emit import CRONJOBS, emit

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBE = REPO_ROOT / "deploy" / "kubernetes"
POSTGRES = KUBE / "postgres" / "statefulset.yaml"
HEARTBEAT = "deployment-heartbeat.yaml"  # listed commented out: it needs a role of its own
DOCKERFILE = REPO_ROOT / "Dockerfile"
# The oldest and the newest Kubernetes release the project supports.
KUBERNETES_VERSIONS = ["1.35.0", "1.37.0"]
BIN = Path(sys.executable).parent


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render_kustomization(
    directory: Path = KUBE, also: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """What `kubectl kustomize <directory>` prints, for the features the kustomization uses
    (resources, labels, images); anything else in it is refused, so this stays exact. ``also``:
    resources it lists commented out, rendered as if the line were uncommented."""
    text = (directory / "kustomization.yaml").read_text()
    for name in also:
        assert f"  # - {name}\n" in text, name
    spec = yaml.safe_load(text)
    assert set(spec) <= {"apiVersion", "kind", "labels", "resources", "images"}, set(spec)
    labels: dict[str, str] = {}
    for entry in spec.get("labels", []):
        assert set(entry) == {"pairs"}, entry  # no selectors or templates touched
        labels.update(entry["pairs"])
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in spec.get("images", [])}
    rendered = []
    for name in [*spec["resources"], *also]:
        for doc in load_all(directory / name):
            doc = copy.deepcopy(doc)
            doc["metadata"].setdefault("labels", {}).update(labels)
            for container in [*containers(doc), *init_containers(doc)]:
                container["image"] = images.get(container["image"], container["image"])
            rendered.append(doc)
    return rendered


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "CronJob":
        spec: dict[str, Any] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    if doc["kind"] in ("StatefulSet", "Deployment", "Job"):
        spec = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [] if spec is None else spec["containers"]


def init_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [] if spec is None else spec.get("initContainers", [])


def volumes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod_spec(doc)
    return {} if spec is None else {v["name"]: v for v in spec["volumes"]}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def every_manifest() -> list[dict[str, Any]]:
    return [*render_kustomization(also=(HEARTBEAT,)), *load_all(POSTGRES)]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    docs = every_manifest()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the field's path
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        *["CronJob"] * len(CRONJOBS),
        "Deployment",
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceAccount",
        "StatefulSet",
    ]


def test_the_validation_rejects_what_kubernetes_would() -> None:
    """Not vacuous: a misspelt field and a wrong type are both refused."""
    cronjob = copy.deepcopy(by_kind(render_kustomization(), "CronJob")[0])
    cronjob["spec"]["concurrencyPolicyy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, KUBERNETES_VERSIONS[0], strict=True)
    cronjob = copy.deepcopy(by_kind(render_kustomization(), "CronJob")[0])
    cronjob["spec"]["startingDeadlineSeconds"] = "an hour"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, KUBERNETES_VERSIONS[0], strict=True)


def test_cronjobs_never_overlap_and_have_bounds() -> None:
    cronjobs = by_kind(render_kustomization(), "CronJob")
    names = sorted(c["metadata"]["name"] for c in cronjobs)
    assert names == sorted(f"drkit-{job}" for job in CRONJOBS)
    for cronjob in cronjobs:
        spec = cronjob["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["startingDeadlineSeconds"] > 0
        assert spec["successfulJobsHistoryLimit"] > 0 and spec["failedJobsHistoryLimit"] > 0
        assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
        [container] = containers(cronjob)
        for image in [container["image"], *(c["image"] for c in init_containers(cronjob))]:
            assert image == "registry.example.com/drkit:0.1.0"
        assert container["resources"]["requests"].keys() == {"cpu", "memory"}
        assert "memory" in container["resources"]["limits"]


def test_reports_are_kept_on_their_claim() -> None:
    docs = render_kustomization()
    [claim] = by_kind(docs, "PersistentVolumeClaim")
    [report] = [c for c in by_kind(docs, "CronJob") if c["metadata"]["name"] == "drkit-report"]
    [container] = containers(report)
    out = container["args"][container["args"].index("--out") + 1]
    volumes = {
        v["name"]: v for v in report["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    }
    volume = volumes[mounts(container)[out]["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_no_secret_is_shipped_and_secrets_are_referenced_by_name() -> None:
    """S3 credentials: the jobs' and archive_command's, read-only ones for the metrics
    exporter, none for the heartbeat (it reads no repository)."""
    docs = every_manifest()
    assert not by_kind(docs, "Secret")
    s3_secret = {"drkit-metrics": ["drkit-metrics-s3"], "drkit-heartbeat": []}
    for doc in docs:
        for container in containers(doc):
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            expected = s3_secret.get(doc["metadata"]["name"], ["drkit-s3"])
            assert refs == expected, (doc["metadata"]["name"], container["name"])
            literal = [e["name"] for e in container.get("env", []) if "value" in e]
            assert not [n for n in literal if re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN", n)]


def test_pods_run_as_postgres_without_privileges() -> None:
    for doc in every_manifest():
        spec = pod_spec(doc)
        if spec is None:
            continue
        # The exporter has an identity of its own, for read-only Vault and IAM roles
        expected = "drkit-metrics" if doc["metadata"]["name"] == "drkit-metrics" else "drkit"
        assert spec["serviceAccountName"] == expected
        context = spec["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 999
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def config_in_the_configmap(tmp_path: Path) -> Path:
    [configmap] = by_kind(render_kustomization(), "ConfigMap")
    path = tmp_path / "drkit.toml"
    path.write_text(configmap["data"]["drkit.toml"])
    return path


def test_the_configmap_holds_a_valid_drkit_configuration(tmp_path: Path) -> None:
    settings = load_settings(config_in_the_configmap(tmp_path))
    assert settings.keys.provider == "vault-transit"
    assert settings.keys.vault is not None and settings.keys.vault.auth == "kubernetes"
    assert [r.type for r in settings.repo] == ["s3", "s3"]
    postgres = settings.postgres
    assert (postgres.mode, postgres.pgdata, postgres.sslmode) == ("remote", None, "verify-full")
    # Its schedule is the CronJobs': one each, none left out, none extra
    assert set(settings.schedule.jobs()) == set(CRONJOBS)
    cronjobs = {c["metadata"]["name"] for c in by_kind(render_kustomization(), "CronJob")}
    assert cronjobs == {f"drkit-{job}" for job in settings.schedule.jobs()}


def test_the_shipped_cronjobs_are_what_the_configmaps_schedule_emits(tmp_path: Path) -> None:
    """One source of truth: `drkit schedule --emit kubernetes` on the ConfigMap's configuration
    writes the shipped CronJobs, times and all."""
    config = config_in_the_configmap(tmp_path)
    emitted = emit(load_settings(config), "kubernetes", tmp_path / "out", config, "main")
    assert sorted(p.name for p in emitted.written) == sorted(
        p.name for p in KUBE.glob("cronjob-*.yaml")
    )
    for path in emitted.written:
        assert yaml.safe_load(path.read_text()) == yaml.safe_load((KUBE / path.name).read_text())


def test_schedule_list_reads_the_configmaps_schedule(tmp_path: Path) -> None:
    """`drkit schedule --list` with the ConfigMap's configuration: every job has a next run."""
    result = subprocess.run(
        [str(BIN / "drkit"), "schedule", "--list", "--json", "--config",
         str(config_in_the_configmap(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = {job["job"]: job["next_run"] for job in json.loads(result.stdout)}
    assert set(jobs) == set(CRONJOBS)
    assert all(jobs.values())


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_the_cronjobs_see_the_paths_the_configuration_names(tmp_path: Path) -> None:
    """Every pod: the configuration, its lock directory, Vault's token, a lease host of its
    own. The pods that connect to PostgreSQL (backups, drills), and only they: the CA and the
    password file where the configuration names them, from the Secret drkit-postgres."""
    text = config_in_the_configmap(tmp_path).read_text()
    config = tomllib.loads(text)
    postgres = config["postgres"]
    token_dir = str(Path(config["keys"]["vault"]["jwt_file"]).parent)
    secret_dir = str(Path(postgres["sslrootcert"]).parent)
    passfile_dir = str(Path(postgres["passfile"]).parent)
    # The client certificate, the documented alternative to the password, is in the Secret too
    certificate = re.findall(r'^# (sslcert|sslkey) = "(.+)"$', text, re.MULTILINE)
    assert [name for name, _ in certificate] == ["sslcert", "sslkey"]
    assert all(str(Path(path).parent) == secret_dir for _, path in certificate)
    # An emptyDir is root's and world-writable, which drkit refuses for its locks: they go in a
    # directory drkit makes inside one
    lock_volume = str(Path(config["lock_path"]).parent)
    for cronjob in by_kind(render_kustomization(), "CronJob"):
        [container] = containers(cronjob)
        assert container["args"][-2:] == ["--config", "/etc/drkit/drkit.toml"]
        for path in ("/etc/drkit/drkit.toml", lock_volume, token_dir):
            assert path in mounts(container), (cronjob["metadata"]["name"], path)
        assert "emptyDir" in volumes(cronjob)[mounts(container)[lock_volume]["name"]]
        [env] = container["env"]
        assert env["name"] == "DRKIT_LEASE__HOST"
        assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        pod_volumes = volumes(cronjob)
        if container["args"][0] not in ("backup", "drill"):
            assert "postgres" not in pod_volumes and not init_containers(cronjob)
            continue
        assert pod_volumes["postgres"]["secret"]["secretName"] == "drkit-postgres"
        assert mounts(container)[secret_dir]["name"] == "postgres"
        assert mounts(container)[passfile_dir]["name"] == "passfile"
        assert pod_volumes["passfile"]["emptyDir"]["medium"] == "Memory"
        [init] = init_containers(cronjob)
        assert mounts(init)[secret_dir]["name"] == "postgres"
        assert mounts(init)[passfile_dir]["name"] == "passfile"
        assert postgres["passfile"] in init["command"][-1]


def test_locks_go_in_a_directory_drkit_makes_inside_the_emptydir(tmp_path: Path) -> None:
    """An emptyDir as the kubelet makes it (mode 0777) is refused for locks; lock_path, a
    directory drkit makes inside it, is accepted."""
    lock_path = Path(tomllib.loads(config_in_the_configmap(tmp_path).read_text())["lock_path"])
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable"):
        os.close(open_private_dir(volume))
    os.close(open_private_dir(volume / lock_path.name))


def test_the_init_container_makes_a_password_file_libpq_and_drkit_accept(tmp_path: Path) -> None:
    """Its command, run here on stand-ins for the two volumes: the Secret's group-readable
    pgpass becomes a private copy (drkit refuses, and libpq ignores, any other); a Secret
    without one (client certificates) copies nothing and succeeds."""
    cronjobs = by_kind(render_kustomization(), "CronJob")
    [incr] = [c for c in cronjobs if c["metadata"]["name"] == "drkit-incr"]
    [init] = init_containers(incr)
    script = init["command"][-1]
    secret, run = tmp_path / "secret", tmp_path / "run"
    secret.mkdir()
    run.mkdir()
    script = script.replace("/etc/drkit/postgres", str(secret))
    script = script.replace("/run/drkit-postgres", str(run))
    (secret / "pgpass").write_text("postgres.databases.svc:5432:*:drkit_backup:pw\n")
    (secret / "pgpass").chmod(0o440)
    subprocess.run([*init["command"][:-1], script], check=True)
    assert (run / "pgpass").read_text() == (secret / "pgpass").read_text()
    check_passfile(run / "pgpass")  # mode 0600: no error
    (secret / "pgpass").unlink()
    (run / "pgpass").unlink()
    subprocess.run([*init["command"][:-1], script], check=True)
    assert not (run / "pgpass").exists()


def test_postgresql_archives_wal_with_the_same_configuration(tmp_path: Path) -> None:
    """The example PostgreSQL pod: archive_command is drkit wal-push with the CronJobs'
    configuration, its lock directory and Vault's token; the Service is the host drkit
    connects to, over TLS."""
    config = tomllib.loads(config_in_the_configmap(tmp_path).read_text())
    docs = load_all(POSTGRES)
    [statefulset] = by_kind(docs, "StatefulSet")
    [postgres] = containers(statefulset)
    assert "archive_command=drkit wal-push %p --config /etc/drkit/drkit.toml" in postgres["args"]
    assert "ssl=on" in postgres["args"]
    token_dir = str(Path(config["keys"]["vault"]["jwt_file"]).parent)
    for path in ("/etc/drkit/drkit.toml", str(Path(config["lock_path"]).parent), token_dir):
        assert path in mounts(postgres), path
    [service] = by_kind(docs, "Service")
    assert config["postgres"]["host"].split(".")[0] == service["metadata"]["name"]
    assert [p["port"] for p in service["spec"]["ports"]] == [config["postgres"]["port"]]
    [hba] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "postgres-hba"]
    user = config["postgres"]["user"]
    assert f"hostssl  replication  {user}" in hba["data"]["pg_hba.conf"]


# -- the image -------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "")


def test_image_runs_as_a_numeric_non_root_user_and_holds_no_secret() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    assert [line for line in lines if line.startswith("USER ")] == ["USER 999:999"]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases == ["python:3.11-slim-bookworm", "python:3.11-slim-bookworm"]
    for word in ("SECRET", "PASSWORD", "TOKEN", "AWS_", "VAULT_"):
        assert not any(word in line.upper() for line in lines if line.startswith(("ENV", "ARG")))


def test_the_build_context_holds_everything_the_build_needs(tmp_path: Path) -> None:
    """The Dockerfile's build step (`pip wheel .`) run on exactly what .dockerignore lets into
    the context: the wheel builds, with both C extensions."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, context / name)
    shutil.copytree(
        REPO_ROOT / "drkit",
        context / "drkit",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    ignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :] == [
        "*",
        "!pyproject.toml",
        "!setup.py",
        "!README.md",
        "!drkit/",
        "drkit/**/*.so",
        "drkit/**/__pycache__",
    ]
    result = subprocess.run(
        [str(BIN / "python"), "-m", "pip", "wheel", "--no-deps",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "wheels").glob("drkit-*.whl")
    listing = subprocess.run(
        [str(BIN / "python"), "-m", "zipfile", "-l", str(wheel)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "drkit/codec/_sparse" in listing and "drkit/pg/_walblocks" in listing
    assert "drkit/cli/main.py" in listing
    assert "drkit/report/templates/" in listing  # package data: the report's templates

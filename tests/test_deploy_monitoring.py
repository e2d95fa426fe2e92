"""What watches the CronJobs in deploy/kubernetes/: the metrics exporter's Deployment and Service,
the optional heartbeat Deployment, and prometheus-operator/ (PodMonitor, PrometheusRule). Each
pod gets the configuration it needs and no more (its own PostgreSQL role and password file),
the PodMonitor finds the exporter's port, and the PrometheusRule is the rules file promtool
checks, alert for alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_alert_rules import RULES
from test_deploy_kubernetes import (
    HEARTBEAT,
    KUBE,
    KUBERNETES_VERSIONS,
    by_kind,
    config_in_the_configmap,
    containers,
    init_containers,
    mounts,
    render_kustomization,
    volumes,
)

from drkit.config.settings import load_settings

OPERATOR = KUBE / "prometheus-operator"

# The fields of the Prometheus Operator's monitoring.coreos.com/v1 CRDs these manifests use,
# with the CRDs' types (no offline validator knows CRDs): a misspelt or misplaced field fails.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "labels": _STRINGS, "annotations": _STRINGS},
    "additionalProperties": False,
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "properties": {"matchLabels": _STRINGS},
                        "additionalProperties": False,
                    },
                    "podMetricsEndpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_the_heartbeat_is_listed_for_those_who_want_it() -> None:
    """Commented out in the kustomization, valid when it is uncommented."""
    docs = render_kustomization(also=(HEARTBEAT,))
    heartbeat = named(docs, "Deployment", "drkit-heartbeat")
    assert [d["metadata"]["name"] for d in render_kustomization()] == [
        d["metadata"]["name"] for d in docs if d is not heartbeat
    ]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(heartbeat, version, strict=True)


@pytest.mark.parametrize(
    ("name", "args", "user", "reads_repositories"),
    [
        ("drkit-metrics", ["metrics", "--serve"], "drkit_metrics", True),
        ("drkit-heartbeat", ["heartbeat"], "drkit_heartbeat", False),
    ],
)
def test_long_running_pods_use_a_role_of_their_own(
    name: str,
    args: list[str],
    user: str,
    reads_repositories: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ConfigMap's configuration with the pod's environment, as drkit loads it there: the
    pod's own role, whose password file (and only that one) it gets from a Secret of its own,
    at the path the configuration names; the paths it needs are mounted."""
    docs = render_kustomization(also=(HEARTBEAT,))
    deployment = named(docs, "Deployment", name)
    [container] = containers(deployment)
    assert container["args"] == [*args, "--config", "/etc/drkit/drkit.toml"]
    for variable, value in env_of(container).items():
        monkeypatch.setenv(variable, value)
    settings = load_settings(config_in_the_configmap(tmp_path))
    postgres = settings.postgres
    assert (postgres.mode, postgres.user, postgres.sslmode) == ("remote", user, "verify-full")

    assert postgres.sslrootcert is not None and postgres.passfile is not None
    secret_dir, passfile_dir = str(postgres.sslrootcert.parent), str(postgres.passfile.parent)
    assert mounts(container)[secret_dir]["name"] == "postgres"
    assert mounts(container)[passfile_dir]["name"] == "passfile"
    [init] = init_containers(deployment)
    assert str(postgres.passfile) in init["command"][-1]
    sources = {
        s["secret"]["name"]: [i["key"] for i in s["secret"]["items"]]
        for s in volumes(deployment)["postgres"]["projected"]["sources"]
    }
    # Never the jobs' password file: its role takes backups
    assert sources == {"drkit-postgres": ["ca.crt"], f"{name}-postgres": ["pgpass"]}

    # Only the exporter reads repositories and keys: Vault's token, its own Vault role
    assert settings.keys.vault is not None
    token_dir = str(Path(settings.keys.vault.jwt_file or "/").parent)
    assert (token_dir in mounts(container)) is reads_repositories
    if reads_repositories:
        assert settings.keys.vault.role == "drkit-metrics"
        assert str(settings.lock_path.parent) in mounts(container)


def test_prometheus_finds_the_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter listens on the port its container declares, the liveness probe asks its
    /health/live, nothing takes it out of rotation while a backup is late (no readiness
    probe), and the Service, the annotations and the PodMonitor all point at that port."""
    docs = render_kustomization()
    deployment = named(docs, "Deployment", "drkit-metrics")
    [container] = containers(deployment)
    for variable, value in env_of(container).items():
        monkeypatch.setenv(variable, value)
    host, port = load_settings(config_in_the_configmap(tmp_path)).metrics.address
    assert host == "0.0.0.0"  # noqa: S104 - the pod's interfaces, for Prometheus
    [declared] = container["ports"]
    assert (declared["name"], declared["containerPort"]) == ("metrics", port)
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health/live", "metrics")
    assert "readinessProbe" not in container
    pod = deployment["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/port"] == str(port)
    assert deployment["spec"]["selector"]["matchLabels"] == pod["labels"]
    service = named(docs, "Service", "drkit-metrics")
    assert service["spec"]["selector"] == pod["labels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    named(docs, "ServiceAccount", "drkit-metrics")

    monitor = named(render_kustomization(OPERATOR), "PodMonitor", "drkit-metrics")
    assert monitor["spec"]["selector"]["matchLabels"] == pod["labels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert endpoint["honorLabels"] is True  # drkit's `job` label, which the alerts read


def test_the_prometheus_operator_manifests_are_well_formed(tmp_path: Path) -> None:
    """Against the CRDs' fields and types; not vacuous: a misspelt field is refused."""
    docs = render_kustomization(OPERATOR)
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule"]
    for doc in docs:
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    monitor = by_kind(docs, "PodMonitor")[0]
    monitor["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS["PodMonitor"])


def test_the_prometheusrule_holds_the_checked_rules(tmp_path: Path) -> None:
    """The same groups as deploy/prometheus/drkit-rules.yml (which promtool unit-tests), and
    promtool accepts them as they are in the PrometheusRule."""
    [rule] = by_kind(render_kustomization(OPERATOR), "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert groups == yaml.safe_load(RULES.read_text())["groups"]
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run installs it)"
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in groups)
    assert f"SUCCESS: {count} rules found" in result.stdout

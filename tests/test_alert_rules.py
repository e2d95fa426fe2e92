"""deploy/prometheus/drkit-rules.yml: Prometheus accepts the rules, each alert fires on the
series its unit tests give and stays quiet otherwise (promtool), and the rules use only the
metric families drkit exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from drkit.schedule.metrics import FAMILIES

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "drkit-rules.yml"
RULE_TESTS = RULES_DIR / "drkit-rules.test.yml"

# The metric families drkit exports (docs/monitoring.md); the rules may use no other.
DRKIT_METRICS = set(FAMILIES)
PROMQL_OPERATORS = {"and", "or", "unless", "bool"}
# What an operator must be told about, by the alert that tells them.
REQUIRED_ALERTS = {
    "DrkitBackupTooOld": "drkit_backup_newest_age_seconds",
    "DrkitWalArchiveLagOverRpo": "drkit_wal_archive_lag_seconds",
    "DrkitWalArchiveLagUnknown": "drkit_wal_archive_lag_seconds",
    "DrkitReplicateOverdue": "drkit_job_last_success_timestamp_seconds",
    "Drkit321NotMet": "drkit_copies_321_compliant",
    "DrkitVerifyFailed": "drkit_verify_last_ok",
    "DrkitDrillFailed": "drkit_drill_last_ok",
    "DrkitDrillOverdue": "drkit_drill_last_timestamp_seconds",
}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not a function call, an
    operator, a label list (by/on/ignoring/group_left), a label matcher or a string."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {n for n in names if n not in PROMQL_OPERATORS}


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run installs it)"
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_fires_when_it_should_and_not_before() -> None:
    """promtool's unit tests: for each alert, series that must fire it and an earlier time at
    which it must not (deploy/prometheus/drkit-rules.test.yml)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run installs it)"
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        cwd=RULES_DIR,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in alerts()}


def test_rules_use_only_the_metrics_drkit_exports() -> None:
    used: set[str] = set()
    for rule in alerts():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in {rule['expr']!r}"
        assert names <= DRKIT_METRICS, f"{rule['alert']}: unknown {names - DRKIT_METRICS}"
        used |= names
    assert metric_names("max by (instance) (a{job='x'} or b) > ignoring(repo) group_left() c") == {
        "a",
        "b",
        "c",
    }
    assert used >= set(REQUIRED_ALERTS.values())


def test_every_alert_says_how_bad_and_what_happened() -> None:
    rules = {rule["alert"]: rule for rule in alerts()}
    for name, metric in REQUIRED_ALERTS.items():
        assert metric in metric_names(rules[name]["expr"]), name
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert name.startswith("Drkit"), name

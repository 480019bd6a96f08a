"""deploy/prometheus's recording and alert rules (issue 19): promtool checks them and runs their unit
tests (deploy/prometheus/tests/: every alert fires when it should and stays silent when it should not);
every metric they read is one the daemon exports; k8s/monitoring/prometheusrule.yaml is generated from
them; docs/operating.md has a runbook for every alert.

promtool comes with Debian's `prometheus` package (.ci/run installs it). Without it the promtool tests
skip and say so, except under CI (the CI env var set), where they fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flexcache.daemon.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
RULE_FILES = [RULES / "recording.rules.yml", RULES / "alerts.rules.yml"]
UNIT_TESTS = sorted((RULES / "tests").glob("*.test.yml"))
PROMETHEUSRULE = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
RUNBOOKS = ROOT / "docs" / "operating.md"
# Series Prometheus makes itself, not the daemon.
PROMETHEUS_OWN = {"up"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the rule tests")
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return path


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def all_rules() -> list[dict]:
    return [rule for path in RULE_FILES for rule in rules(path)]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in all_rules() if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS
    result = subprocess.run([promtool(), "test", "rules", *[p.name for p in UNIT_TESTS]], cwd=RULES / "tests",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_and_one_that_stays_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == ["../recording.rules.yml", "../alerts.rules.yml"], path.name
        for test in spec["tests"]:
            for case in test.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = set(alert_names())
    assert names - fires == set(), "alerts no unit test sees firing"
    assert names - silent == set(), "alerts no unit test sees silent (exp_alerts: [])"
    assert (fires | silent) <= names, "unit tests of alerts that do not exist"


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads (not functions, keywords, labels or durations)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", expr)  # function calls
    names = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    keywords = {"and", "or", "unless", "offset", "bool", "group_left", "group_right"}
    return names - keywords


def test_rules_read_only_metrics_the_daemon_exports() -> None:
    """A metric renamed in daemon/metrics.py fails here instead of silently muting an alert."""
    described = {name for name, *_ in Metrics().described}
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    for rule in all_rules():
        for name in metric_names(rule["expr"]):
            if ":" in name:
                assert name in recorded, f"{rule.get('alert') or rule.get('record')}: no rule records {name}"
                continue
            base = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in described:
                    base = name.removesuffix(suffix)
            assert base in described or base in PROMETHEUS_OWN, \
                f"{rule.get('alert') or rule.get('record')}: {name} is not a metric of daemon/metrics.py"


def test_metric_names_parser() -> None:
    expr = ('sum by (job, le) (rate(flexcache_request_duration_seconds_bucket{method="Lookup", le="0.25"}[5m]))'
            ' / on (job) flexcache:x:rate5m > 0.5 and up{job="flexcache"} == 0')
    assert metric_names(expr) == {"flexcache_request_duration_seconds_bucket", "flexcache:x:rate5m", "up"}


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    result = subprocess.run([sys.executable, str(RULES / "prometheusrule.py"), "--check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (rule,) = [d for d in yaml.safe_load_all(PROMETHEUSRULE.read_text()) if d]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups


def test_every_alert_has_a_runbook() -> None:
    text = RUNBOOKS.read_text()
    headings = {m.lower() for m in re.findall(r"^### (\w+)$", text, re.MULTILINE)}
    for rule in all_rules():
        if "alert" in rule:
            name = rule["alert"]
            anchor = rule["annotations"]["runbook"].removeprefix("docs/operating.md#")
            assert anchor in headings, f"{name}: docs/operating.md has no '### ' runbook heading for #{anchor}"
            assert name.lower().startswith(anchor) and name in text, f"{name}: its runbook does not name it"
            assert rule["labels"]["severity"] in ("critical", "warning")

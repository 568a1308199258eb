"""manifests/monitoring and the CronJob against a live daemon: every metric the alerts and the
dashboard name is in its /metrics, promtool accepts the rules and they fire when they should,
and the CronJob's command drives the daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.daemon import ROOT, Daemon
from tests.test_auth import store_config

MONITORING = ROOT / "manifests" / "monitoring"
PROMTOOL = "/usr/bin/promtool"
METRIC = re.compile(r"\bregistry_pruned_[a-z0-9_]+")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", re.M)


def rule_spec() -> dict[str, Any]:
    (doc,) = yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return doc["spec"]


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_spec()["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs and all(
        panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"]
    )
    return exprs


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """A daemon that ran one check, and its /metrics after it."""
    tmp = tmp_path_factory.mktemp("monitoring")
    daemon = Daemon(store_config(tmp), tmp / "state").start()
    try:
        status, run = daemon.json("POST", "/prune?mode=check&wait=true")
        assert status == 200 and run["state"] == "succeeded"
        yield daemon, daemon.get("/metrics")[2].decode()
    finally:
        daemon.stop()


def test_every_metric_named_is_exported(scraped: tuple[Daemon, str]) -> None:
    _daemon, text = scraped
    samples = {m.group(1) for m in SAMPLE.finditer(text)}
    declared = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    named = {m for expr in exprs for m in METRIC.findall(expr)}
    assert len(named) >= 10
    # the active run's gauges have samples only while a run goes (test_progress_client)
    while_running = {
        "registry_pruned_run_fraction",
        "registry_pruned_run_eta_seconds",
        "registry_pruned_run_progress",
    }
    missing = {m for m in named - while_running if m not in samples}
    assert not missing, f"named but not in /metrics: {sorted(missing)}"
    assert while_running <= declared


def annotations(alert: str) -> dict[str, str]:
    """The alert's annotations as they read when it fires in the test below."""
    (rule,) = [r for r in rules() if r.get("alert") == alert]
    return {
        key: text.replace("{{ $labels.mode }}", "check").replace(
            "{{ $value | humanize1024 }}", "60Gi"
        )
        for key, text in rule["annotations"].items()
    }


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_they_fire_when_they_should(
    scraped: tuple[Daemon, str], tmp_path: Path
) -> None:
    _daemon, text = scraped
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()))
    checked = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "4 rules found" in checked.stdout

    # the live scrape after a successful check, held for 2 hours: no alert
    live = []
    for match in SAMPLE.finditer(text):
        name, labels, value = match.groups()
        if name.startswith("registry_pruned_") and "timestamp" not in name:
            live.append({"series": f"{name}{labels or ''}", "values": f"{value}+0x120"})
    assert any(s["series"].startswith("registry_pruned_last_run_success") for s in live)
    gib = 1024**3  # 60 GiB: above the rule's 50 GiB
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    *live,
                    # ended at t=0 of the test: not 8 days old yet
                    {
                        "series": 'registry_pruned_last_success_timestamp_seconds{mode="check"}',
                        "values": "0+0x120",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "2h", "alertname": name, "exp_alerts": []}
                    for name in (
                        "RegistryPrunedRunFailed",
                        "RegistryPrunedReclaimableHigh",
                        "RegistryPrunedNoSuccessfulRun",
                    )
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'registry_pruned_last_run_success{mode="check"}',
                        "values": "0+0x14000",
                    },
                    {
                        "series": "registry_pruned_reclaimable_bytes",
                        "values": f"{60 * gib}+0x14000",
                    },
                    {
                        "series": 'registry_pruned_last_success_timestamp_seconds{mode="check"}',
                        "values": "0+0x14000",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "3h",
                        "alertname": "RegistryPrunedRunFailed",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "mode": "check"},
                                "exp_annotations": annotations("RegistryPrunedRunFailed"),
                            }
                        ],
                    },
                    {
                        "eval_time": "3h",
                        "alertname": "RegistryPrunedReclaimableHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "info"},
                                "exp_annotations": annotations("RegistryPrunedReclaimableHigh"),
                            }
                        ],
                    },
                    {
                        "eval_time": "3d",
                        "alertname": "RegistryPrunedNoSuccessfulRun",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "9d",
                        "alertname": "RegistryPrunedNoSuccessfulRun",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning"},
                                "exp_annotations": annotations("RegistryPrunedNoSuccessfulRun"),
                            }
                        ],
                    },
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    tested = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_cronjob_command_runs_a_check_with_its_token_file(
    scraped: tuple[Daemon, str], tmp_path: Path
) -> None:
    daemon, _text = scraped
    docs = list(yaml.safe_load_all((ROOT / "manifests/openshift/cronjob.yaml").read_text()))
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["registry-pruned"] and container["args"][:2] == ["run", "check"]
    env = {e["name"]: e["value"] for e in container["env"]}
    token = tmp_path / "token"
    token.write_text("a-projected-token\n")
    env.update(PRUNER_URL=daemon.url, PRUNER_TOKEN_FILE=str(token))
    script = Path(sys.executable).parent / container["command"][0]
    done = subprocess.run(
        [str(script), *container["args"]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Would delete 0 blobs")
    assert "check" in done.stderr and "100.0%" in done.stderr

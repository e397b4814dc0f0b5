"""Prometheus: alert rules, scrape configs (compose and Kubernetes), promtool checks
and the alert rules' unit tests."""

from __future__ import annotations

import re

import yaml

from tests.system.deploy_files import (
    DEPLOY,
    K8S,
    load_alert_rules,
    load_compose,
    load_yaml,
    metric_names_in_promql,
    run,
    tool,
)


def test_alert_rules_cover_the_failure_modes():
    rules = {r["alert"]: r for g in load_alert_rules()["groups"] for r in g["rules"]}
    needed = {
        "LaminaEngineDown": "lamina:engine_alive",
        "LaminaQueueGrowing": "lamina:num_requests_waiting",
        "LaminaHighTimeToFirstTokenP99": "lamina:time_to_first_token_seconds_bucket",
        "LaminaKVCacheNearFull": "lamina:kv_cache_usage_perc",
    }
    for alert, metric in needed.items():
        assert metric in metric_names_in_promql(rules[alert]["expr"]), alert
    assert "histogram_quantile(0.99" in rules["LaminaHighTimeToFirstTokenP99"]["expr"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_prometheus_scrapes_the_compose_replicas():
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "lamina"]
    [sd] = job["dns_sd_configs"]
    services = load_compose()["services"]
    port = int(services["lamina"]["environment"]["LAMINA_PORT"])
    assert sd["port"] == port and sd["names"] == ["lamina"]
    for service in ("lamina", "lamina-gpu"):  # both variants answer to the name `lamina`
        assert "lamina" in services[service]["networks"]["backend"]["aliases"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts


def test_promtool_checks_config_and_rules():
    promtool = tool("promtool")
    folder = DEPLOY / "prometheus"
    run([promtool, "check", "config", "prometheus.yml"], cwd=folder)
    run([promtool, "check", "rules", "alerts.yml"], cwd=folder)


def test_alert_rules_unit_tests():
    # Each alert fires on series that should trip it and stays silent on healthy ones.
    run([tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=DEPLOY / "prometheus")


def test_kubernetes_scrape_config(tmp_path):
    # Debian's promtool is built without Kubernetes discovery: check everything else
    # (relabelling regexes included) with the discovery swapped for a static target.
    promtool = tool("promtool")
    config = load_yaml(K8S / "monitoring/prometheus-scrape.yml")
    [job] = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__"} <= targets  # the adapter maps these
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    run([promtool, "check", "config", str(path)])

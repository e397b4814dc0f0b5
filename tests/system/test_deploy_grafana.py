"""The Grafana dashboard (what it shows, its layout, its queries parsed by promtool)
and its provisioning in docker-compose.yml."""

from __future__ import annotations

import re

import yaml

from tests.system.deploy_files import (
    DEPLOY,
    LABEL_VALUES,
    dashboard_queries,
    load_compose,
    load_dashboard,
    load_yaml,
    metric_names_in_dashboard,
    run,
    tool,
)


def test_dashboard_shows_what_operators_need():
    used = metric_names_in_dashboard(load_dashboard())
    needed = {
        "lamina:generation_tokens_total",  # throughput
        "lamina:time_to_first_token_seconds_bucket",
        "lamina:inter_token_latency_seconds_bucket",
        "lamina:num_requests_running",
        "lamina:num_requests_waiting",
        "lamina:kv_cache_usage_perc",
        "lamina:prefix_cache_hits_total",
        "lamina:prefix_cache_queries_total",
        "lamina:request_failure_total",
        "lamina:num_preemptions_total",
        "lamina:http_requests_total",
    }
    assert needed <= used
    queries = " ".join(dashboard_queries(load_dashboard()))
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert re.search(rf"histogram_quantile\(0\.99, [^;]*lamina:{histogram}_bucket", queries)
    assert "sum by (reason)" in queries and "sum by (status)" in queries


def test_dashboard_layout_is_consistent():
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cell = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & cell, f"panel {panel['title']!r} overlaps another"
        cells |= cell
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model_name", "instance"} <= variables


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses every query as a recording rule, with Grafana's variables filled in.
    promtool = tool("promtool")
    fill = {"$__rate_interval": "1m", "$model_name": ".*", "$instance": ".*"}
    rules = []
    for index, query in enumerate(dashboard_queries(load_dashboard())):
        match = LABEL_VALUES.match(query)
        expr = match.group(1) if match else query
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([promtool, "check", "rules", str(path)])


def test_grafana_provisioning_matches_compose():
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    [datasource] = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    grafana = load_compose()["services"]["grafana"]
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/lamina.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"

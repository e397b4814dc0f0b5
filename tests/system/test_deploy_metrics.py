"""The metric contract: the PromQL name extractor, the exposition parser, and every
metric name the dashboard, the alerts and the autoscaler use being one lamina exposes.
"""

from __future__ import annotations

import re

from tests.system.deploy_files import (
    DOCUMENTED_METRICS,
    K8S,
    ROUTER_SERIES,
    exposed_series_names,
    load_alert_rules,
    load_dashboard,
    load_yaml,
    metric_names_in_alert_rules,
    metric_names_in_dashboard,
    metric_names_in_grafana_query,
    metric_names_in_promql,
    metric_types_from_exposition,
    undefined_metric_names,
)


def test_promql_name_extraction():
    expr = (
        'sum by (model_name, le) (rate(lamina:x_bucket{le="0.5", a=~"b|c"}[5m])) '
        "/ on(instance) group_left(model_name) lamina:y offset 5m > 1e-9 and up == 0"
    )
    assert metric_names_in_promql(expr) == {"lamina:x_bucket", "lamina:y", "up"}
    quantile = "histogram_quantile(0.9, sum(rate(m_bucket[$__rate_interval])) by (le))"
    assert metric_names_in_promql(quantile) == {"m_bucket"}
    assert metric_names_in_grafana_query(
        'label_values(lamina:num_requests_running{model_name=~"$model_name"}, instance)'
    ) == {"lamina:num_requests_running"}
    assert metric_names_in_grafana_query("label_values(model_name)") == set()


def test_exposition_parsing_matches_the_documented_series():
    # Build the documented metrics with prometheus_client, as the server does, and read
    # the exposition back: the expansion rules must agree with what a scrape yields.
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    makers = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}
    for name, kind in DOCUMENTED_METRICS.items():
        metric = makers[kind](name, name, ["model_name"], registry=registry)
        child = metric.labels(model_name="m")
        getattr(child, {"gauge": "set", "counter": "inc", "histogram": "observe"}[kind])(1)
    text = generate_latest(registry).decode()
    assert metric_types_from_exposition(text) == DOCUMENTED_METRICS
    sample_names = set(re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", text, re.MULTILINE))
    assert exposed_series_names(DOCUMENTED_METRICS) <= sample_names


def test_dashboard_and_alerts_use_only_exposed_metrics():
    used = metric_names_in_dashboard(load_dashboard())
    used |= metric_names_in_alert_rules(load_alert_rules())
    assert undefined_metric_names(used, DOCUMENTED_METRICS) == set()
    assert used >= ROUTER_SERIES  # the dashboard's router panels
    adapter = load_yaml(K8S / "monitoring/prometheus-adapter-values.yaml")
    for rule in adapter["rules"]["custom"]:
        assert undefined_metric_names(metric_names_in_promql(rule["seriesQuery"]), {}) <= set(
            DOCUMENTED_METRICS
        )

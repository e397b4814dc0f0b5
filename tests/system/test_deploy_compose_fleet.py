"""docker-compose.fleet.yml (replicas behind sglang-router), the router's image and the
fleet's Prometheus config, checked without Docker: every router URL names a replica,
the router runs with the flags the fleet system test proves, and Prometheus scrapes
the replicas and the router."""

from __future__ import annotations

import re

from app.bench.fleet import ROUTER_FLAGS
from tests.system.deploy_files import (
    DEPLOY,
    EXIT_AFTER_DRAIN_S,
    ROOT,
    assert_valid_settings,
    load_yaml,
    run,
    tool,
)


def _fleet() -> dict:
    return load_yaml(ROOT / "docker-compose.fleet.yml")


def _replicas(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if re.fullmatch(r"lamina-\d+", n)}


def _router_args(compose: dict) -> tuple[dict[str, str], list[str]]:
    """({--flag: value} for --flag=value words, the --worker-urls list)."""
    words = compose["services"]["router"]["command"]
    start = words.index("--worker-urls") + 1
    end = next(i for i in range(start, len(words)) if words[i].startswith("--"))
    flags = dict(w.removeprefix("--").split("=", 1) for w in words if "=" in w)
    return flags, words[start:end]


def test_fleet_replicas_are_ready_gated_and_drain():
    replicas = _replicas(_fleet())
    assert len(replicas) >= 3
    for name, service in replicas.items():
        env = {
            k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
            for k, v in service["environment"].items()
        }
        assert_valid_settings(env, f"docker-compose.fleet.yml service {name}")
        assert "/ready" in " ".join(service["healthcheck"]["test"])
        assert "./model_weights:/app/model_weights:ro" in service["volumes"]
        grace_s = int(service["stop_grace_period"].rstrip("s"))
        assert grace_s > float(env["LAMINA_DRAIN_TIMEOUT_S"]) + EXIT_AFTER_DRAIN_S
        assert "lamina" in service["networks"]["backend"]["aliases"]


def test_router_routes_to_every_replica_with_the_tested_flags():
    compose = _fleet()
    replicas = _replicas(compose)
    flags, worker_urls = _router_args(compose)
    port = {n: int(s["environment"]["LAMINA_PORT"]) for n, s in replicas.items()}
    assert sorted(worker_urls) == sorted(f"http://{n}:{port[n]}" for n in replicas)
    # The same flags as tests/system/test_router_fleet.py runs the real router with.
    tested = dict(zip(ROUTER_FLAGS[::2], ROUTER_FLAGS[1::2], strict=True))
    assert {f"--{k}": v for k, v in flags.items() if f"--{k}" in tested} == tested
    router = compose["services"]["router"]
    assert all(router["depends_on"][n] == {"condition": "service_healthy"} for n in replicas)
    assert router["ports"] == [f"${{LAMINA_HTTP_PORT:-8080}}:{flags['port']}"]
    assert flags["prometheus-port"] in router["expose"]
    assert router["build"]["context"] == "deploy/router"


def test_fleet_prometheus_scrapes_replicas_and_router():
    compose = _fleet()
    flags, _ = _router_args(compose)
    config = load_yaml(DEPLOY / "prometheus/prometheus-fleet.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [sd] = jobs["lamina"]["dns_sd_configs"]
    assert sd["names"] == ["lamina"] and sd["port"] == 8000
    assert jobs["lamina-router"]["static_configs"] == [
        {"targets": [f"router:{flags['prometheus-port']}"]}
    ]
    prometheus = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus-fleet.yml" in prometheus["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    run([tool("promtool"), "check", "config", "prometheus-fleet.yml"], cwd=DEPLOY / "prometheus")


def test_fleet_mounts_exist():
    for name, service in _fleet()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./model_weights":
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_router_image_hadolint_and_pin():
    dockerfile = DEPLOY / "router/Dockerfile"
    run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile)])
    text = dockerfile.read_text()
    pinned = re.search(r"^ARG SGLANG_ROUTER_VERSION=(\S+)$", text, re.MULTILINE)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert pinned and f'"sglang-router=={pinned.group(1)};' in pyproject  # the tested one
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)

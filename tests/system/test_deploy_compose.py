"""docker-compose.yml: topology, healthchecks, drain timing, mounts."""

from __future__ import annotations

import re

from tests.system.deploy_files import EXIT_AFTER_DRAIN_S, ROOT, assert_valid_settings, load_compose


def test_compose_topology():
    compose = load_compose()
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
        assert_valid_settings(env, f"docker-compose.yml service {name}")
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
    for name, service in load_compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./model_weights":
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"

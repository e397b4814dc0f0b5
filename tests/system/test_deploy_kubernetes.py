"""Kubernetes: the overlays, the weights Job and the baked-weights component rendered by
`kubectl kustomize`, checked against the schemas and for what ties them together."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.system.deploy_files import (
    EXIT_AFTER_DRAIN_S,
    K8S,
    OVERLAYS,
    assert_valid_settings,
    by_kind,
    load_yaml,
    metric_names_in_promql,
    render,
)


@pytest.mark.parametrize("folder", [f"overlays/{o}" for o in OVERLAYS] + ["weights-job"])
@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "1.37.0"])
def test_manifests_match_kubernetes_schemas(folder, kubernetes_version):
    import kubernetes_validate

    for doc in render(K8S / folder):
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_security(overlay):
    kinds = by_kind(render(K8S / "overlays" / overlay))
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
    assert_valid_settings(configmap["data"], f"{overlay} ConfigMap")
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
    kinds = by_kind(render(K8S / "overlays" / overlay))
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
    adapter = load_yaml(K8S / "monitoring/prometheus-adapter-values.yaml")
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    rule = served[metric["pods"]["metric"]["name"]]
    assert metric_names_in_promql(rule["seriesQuery"]) == {"lamina:num_requests_waiting"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])


def test_weights_job_fills_the_volume_the_replicas_read():
    [job] = by_kind(render(K8S / "weights-job"))["Job"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["weights"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "model-weights"]
    assert mount["mountPath"] == "/app/model_weights" and not mount.get("readOnly")
    [deployment] = by_kind(render(K8S / "overlays/cpu"))["Deployment"]
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

    docs = render(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    kinds = by_kind(docs)
    assert "PersistentVolumeClaim" not in kinds
    [deployment] = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/tmp"]

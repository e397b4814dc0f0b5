"""Kubernetes in front of the lamina pods: sglang-router discovering them by label
(deploy/k8s/router) and the Gateway API Inference Extension (deploy/k8s/inference-gateway),
rendered by `kubectl kustomize` and checked against the schemas and the lamina pods."""

from __future__ import annotations

import pytest
import yaml

from app.bench.fleet import ROUTER_FLAGS
from tests.system.deploy_files import DOCUMENTED_METRICS, K8S, by_kind, render

# Core kinds are validated by kubernetes_validate; these belong to CRDs it does not know.
CRD_KINDS = {"InferencePool", "HTTPRoute"}

# InferencePool (inference.networking.k8s.io/v1, as the extension's v1.5.0 CRD defines
# it): the fields lamina's manifest uses, with their types and limits.
_PORT = {
    "type": "object",
    "required": ["number"],
    "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}},
    "additionalProperties": False,
}
INFERENCE_POOL_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "spec": {
            "type": "object",
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": _PORT},
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object",
                    "required": ["name", "port"],
                    "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1},
                        "port": _PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                },
            },
        },
    },
}


def _lamina_pod() -> tuple[dict, dict]:
    """(pod labels, the lamina container) of the CPU overlay's Deployment."""
    [deployment] = by_kind(render(K8S / "overlays/cpu"))["Deployment"]
    template = deployment["spec"]["template"]
    return template["metadata"]["labels"], template["spec"]["containers"][0]


def _validate_core_kinds(docs: list[dict], kubernetes_version: str) -> None:
    import kubernetes_validate

    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, kubernetes_version, strict=True)


@pytest.mark.parametrize("folder", ["router", "inference-gateway"])
@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "1.37.0"])
def test_manifests_match_kubernetes_schemas(folder, kubernetes_version):
    _validate_core_kinds(render(K8S / folder), kubernetes_version)


def test_router_discovers_the_lamina_pods_and_routes_by_readiness():
    kinds = by_kind(render(K8S / "router"))
    [deployment] = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    args = container["args"]
    pod_labels, lamina = _lamina_pod()
    # The selector names the lamina pods, not the router's own.
    key, _, value = args[args.index("--selector") + 1].partition("=")
    assert pod_labels[key] == value and pod["metadata"]["labels"].get(key) != value
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if "=" in a and "--" in a)
    assert "--service-discovery" in args
    assert flags["service-discovery-namespace"] == deployment["metadata"]["namespace"]
    assert int(flags["service-discovery-port"]) == lamina["ports"][0]["containerPort"]
    tested = dict(zip(ROUTER_FLAGS[::2], ROUTER_FLAGS[1::2], strict=True))
    assert {f"--{k}": v for k, v in flags.items() if f"--{k}" in tested} == tested
    assert lamina["readinessProbe"]["httpGet"]["path"] == tested["--health-check-endpoint"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/liveness"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(flags["port"]), "metrics": int(flags["prometheus-port"])}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == flags["prometheus-port"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # RBAC: the router's account may read pods in its namespace, and nothing more.
    [account] = kinds["ServiceAccount"]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    [role] = kinds["Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    [binding] = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    [subject] = binding["subjects"]
    assert (subject["kind"], subject["name"]) == ("ServiceAccount", account["metadata"]["name"])
    assert subject["namespace"] == account["metadata"]["namespace"]
    [service] = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_inference_pool_selects_the_lamina_pods():
    import jsonschema

    kinds = by_kind(render(K8S / "inference-gateway"))
    [pool] = kinds["InferencePool"]
    jsonschema.validate(pool, INFERENCE_POOL_SCHEMA)
    pod_labels, lamina = _lamina_pod()
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [
        lamina["ports"][0]["containerPort"]
    ]
    # The picker the pool names is the Service in front of the EPP's gRPC port.
    picker = pool["spec"]["endpointPickerRef"]
    [service] = [s for s in kinds["Service"] if s["metadata"]["name"] == picker["name"]]
    assert picker["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    [route] = kinds["HTTPRoute"]
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])


def test_endpoint_picker_reads_lamina_metric_names():
    kinds = by_kind(render(K8S / "inference-gateway"))
    [deployment] = kinds["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    [pool] = kinds["InferencePool"]
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-namespace"] == pool["metadata"]["namespace"]
    [configmap] = kinds["ConfigMap"]
    [volume] = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    [mount] = container["volumeMounts"]
    folder, _, key = args["config-file"].rpartition("/")
    assert mount["mountPath"] == folder and key in configmap["data"]

    config = yaml.safe_load(configmap["data"][key])
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    [engine] = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    assert engine["queuedRequestsSpec"] == "lamina:num_requests_waiting"
    assert engine["runningRequestsSpec"] == "lamina:num_requests_running"
    assert engine["kvUsageSpec"] == "lamina:kv_cache_usage_perc"
    for spec in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        assert DOCUMENTED_METRICS[engine[spec]] == "gauge"
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics"
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= set(plugins)
    assert "prefix-cache-scorer" in {
        p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]
    }

"""deploy/k8s: kustomize renders every target, and kubernetes-validate --strict accepts the output."""

from __future__ import annotations

import pytest
import yaml

from deploy_support import kustomize, run, tool

TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
OVERLAYS = TARGETS[1:]
# kubernetes-validate ships the schemas of the built-in API only; for a CRD kind it prints
# "Couldn't find schema" and passes it. We take out exactly these CRD kinds (checked by hand in
# test_servicemonitor_selects_the_metrics_port) and validate everything else strictly.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(target):
    _, docs = kustomize(target)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_validate_strict(target, tmp_path):
    _, docs = kustomize(target)
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    result = run(tool("kubernetes-validate"), "--strict", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed for resource") == len(builtin), output


def test_kubernetes_validate_rejects_unknown_fields(tmp_path):
    _, docs = kustomize("base")
    service = next(d for d in docs if d["kind"] == "Service")
    service["spec"]["ports"][0]["appProtocl"] = "kubernetes.io/h2c"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(service))
    assert run(tool("kubernetes-validate"), "--strict", str(path)).returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_use_the_monitoring_component(overlay):
    _, docs = kustomize(overlay)
    assert {(d["apiVersion"], d["kind"]) for d in docs} & CRD_KINDS == CRD_KINDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_selects_the_metrics_port(overlay):
    _, docs = kustomize(overlay)
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    services = [d for d in docs if d["kind"] == "Service"
                and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    assert services, "the ServiceMonitor selects no Service"
    port_names = {p["name"] for s in services for p in s["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"

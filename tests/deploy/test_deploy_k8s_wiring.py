"""deploy/k8s: the rendered objects agree with each other and with the server's settings."""

from __future__ import annotations

import tomllib
from pathlib import PurePosixPath

import pytest

from deploy_support import DEPLOY, config_from_toml, kustomize, parse_server_args

OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]


def objects(target: str) -> dict[str, dict]:
    _, docs = kustomize(target)
    return {d["kind"]: d for d in docs if d["kind"] != "PersistentVolumeClaim"}


def pod_spec(target: str) -> dict:
    return objects(target)["Deployment"]["spec"]["template"]["spec"]


def container(target: str) -> dict:
    (c,) = pod_spec(target)["containers"]
    return c


def server_config(target: str, tmp_path):
    """The ConfigMap's TOML as the server loads it, plus the --config path it is given."""
    spec, c = pod_spec(target), container(target)
    config_path = PurePosixPath(parse_server_args(c["args"]).config)
    mount = next(m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == config_path.parent)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = objects(target)["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    path = tmp_path / config_path.name
    path.write_text(configmap["data"][config_path.name])
    return config_from_toml(path)


@pytest.mark.parametrize("target", OVERLAYS)
def test_selectors_match_the_pods(target):
    objs = objects(target)
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert objs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert objs["Service"]["spec"]["selector"].items() <= pod_labels
    assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels
    ref = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", objs["Deployment"]["metadata"]["name"])
    assert "replicas" not in objs["Deployment"]["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("target", OVERLAYS)
def test_ports_probes_and_service_follow_the_config(target, tmp_path):
    cfg, c = server_config(target, tmp_path), container(target)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg.server.port, "http": cfg.server.http_port, "metrics": cfg.server.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": cfg.server.port}, f"{probe} must be a native gRPC probe"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "allow a slow model load"
    service_ports = {p["name"]: p for p in objects(target)["Service"]["spec"]["ports"]}
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert {p["targetPort"] for p in service_ports.values()} == set(ports)


@pytest.mark.parametrize("target", OVERLAYS)
def test_volumes_follow_the_config(target, tmp_path):
    cfg, c, spec = server_config(target, tmp_path), container(target), pod_spec(target)
    _, docs = kustomize(target)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    adapters = volumes[mounts[str(cfg.engine.lora.adapter_root)]["name"]]
    assert adapters["persistentVolumeClaim"]["claimName"] in claims
    cache = mounts[str(cfg.engine.model.cache_dir)]
    assert "emptyDir" in volumes[cache["name"]] and not cache.get("readOnly"), "cache must be writable"
    assert "/tmp" in mounts
    if cfg.engine.model.model is not None:  # a model from a volume
        model_mount = next(m for p, m in mounts.items() if cfg.engine.model.model.startswith(p + "/"))
        assert volumes[model_mount["name"]]["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("target", OVERLAYS)
def test_drain_fits_the_termination_grace_period(target, tmp_path):
    cfg = server_config(target, tmp_path)
    assert cfg.server.grace_period_s < pod_spec(target)["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_security_context(target):
    spec, c = pod_spec(target), container(target)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert spec["automountServiceAccountToken"] is False


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("overlay,tag", [("overlays/cpu", "cpu"), ("overlays/gpu", "gpu")])
def test_overlay_resources(overlay, tag, tmp_path):
    cfg, c = server_config(overlay, tmp_path), container(overlay)
    assert c["image"] == f"loraplex:{tag}"
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert cfg.engine.model.threads is not None and cfg.engine.model.threads <= _cpus(requests["cpu"])
    if tag == "gpu":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == "1"
        assert cfg.engine.model.device == "cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(overlay)["tolerations"])
    else:
        assert "nvidia.com/gpu" not in requests and cfg.engine.model.device == "cpu"


def test_overlay_configs_set_the_same_keys_as_the_base():
    """Overlays replace the whole file: they must not silently drop a base setting."""
    def keys(path):
        return {(s, k) for s, fields in tomllib.loads(path.read_text()).items() for k in fields}

    base = keys(DEPLOY / "k8s" / "base" / "loraplex.toml")
    for overlay in ("cpu", "gpu"):
        assert base <= keys(DEPLOY / "k8s" / "overlays" / overlay / "loraplex.toml"), overlay

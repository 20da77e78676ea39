"""deploy/ray: the Serve config and the KubeRay RayService parse, validate against Serve's own schema,
name what exists (import path, servicer functions, deployments) and agree with each other."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
schema = pytest.importorskip("ray.serve.schema", reason="needs the ray extra: pip install 'loraplex-server[ray]'")
from ray.serve import Application  # noqa: E402

from loraplex_server.ray_serve import app as ray_app  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "ray"


def _import(path: str, separator: str):
    module, _, attr = path.rpartition(separator)
    return getattr(importlib.import_module(module), attr)


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


@pytest.fixture(scope="module")
def rayservice() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))


def _check_serve_config(raw: dict) -> dict:
    """Valid for Serve, naming our builder, servicer functions and deployments; returns the app."""
    schema.ServeDeploySchema.model_validate(raw)
    assert raw["grpc_options"]["grpc_servicer_functions"] == list(ray_app.GRPC_SERVICER_FUNCTIONS)
    for name in raw["grpc_options"]["grpc_servicer_functions"]:
        assert callable(_import(name, "."))
    [application] = raw["applications"]
    assert _import(application["import_path"], ":") is ray_app.build_app
    ray_app.AppArgs.parse(application["args"])
    assert {d["name"] for d in application["deployments"]} == {ray_app.REPLICA_DEPLOYMENT,
                                                                ray_app.INGRESS_DEPLOYMENT}
    return application


def test_serve_config_builds_the_application_as_serve_run_would(serve_config, monkeypatch):
    application = _check_serve_config(serve_config)
    monkeypatch.chdir(REPO)  # `serve run deploy/ray/serve_config.yaml` runs from the repository root
    for name, value in application["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(name, value)
    built = ray_app.build_app(application["args"])
    assert isinstance(built, Application)
    root = Path(application["runtime_env"]["env_vars"]["LORAPLEX_ADAPTER_ROOT"])
    assert (REPO / root / "upper" / "adapter_config.json").is_file()


def test_rayservice_embeds_the_same_application_and_exposes_grpc(serve_config, rayservice):
    service, grpc_service = rayservice
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    application = _check_serve_config(embedded)
    local = serve_config["applications"][0]
    for key in ("name", "import_path", "route_prefix"):
        assert application[key] == local[key]
    assert embedded["grpc_options"] == serve_config["grpc_options"]
    grpc_port = embedded["grpc_options"]["port"]

    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert ports["grpc"] == grpc_port
        assert pod["metadata"]["labels"].items() >= {"app.kubernetes.io/name": "loraplex-ray"}.items()
    head_ports = {p["name"]: p["containerPort"] for p in pods[0]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == embedded["http_options"]["port"]  # KubeRay health-checks this one

    assert grpc_service["kind"] == "Service"
    assert grpc_service["spec"]["selector"]["app.kubernetes.io/name"] == "loraplex-ray"
    [port] = grpc_service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (grpc_port, "grpc")

"""deploy/compose, checked as data: `docker compose config` needs the compose plugin, which neither
this machine nor CI has (pip cannot install it), so the structure and every cross-reference is
checked with PyYAML: build, ports and mounts, the server's arguments, Prometheus and Grafana."""

from __future__ import annotations

import fnmatch
from pathlib import Path, PurePosixPath

import promql_parser

from deploy_support import DEPLOY, REPO, config_from_toml, load_yaml, parse_server_args
from loraplex_server.config import load_config

COMPOSE_DIR = DEPLOY / "compose"
SERVICE_KEYS = {"build", "image", "command", "environment", "ports", "volumes", "read_only", "tmpfs",
                "security_opt", "cap_drop", "stop_grace_period", "restart", "depends_on", "healthcheck", "user"}
IMAGE_CONFIG = DEPLOY / "docker" / "loraplex.toml"


def compose() -> dict:
    return load_yaml(COMPOSE_DIR / "compose.yaml")


def service(name: str) -> dict:
    return compose()["services"][name]


def bind_mounts(name: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to the compose file)."""
    out = {}
    for spec in service(name).get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE_DIR / source).resolve()
    return out


def host_path(name: str, container_path: str) -> Path:
    """Where a container path of a service lives on the host, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(name).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted into {name}")


def container_ports(name: str) -> set[int]:
    return {int(p.split(":")[-1]) for p in service(name).get("ports", [])}


def test_structure():
    data = compose()
    assert set(data) <= {"name", "services", "volumes", "networks"}
    assert set(data["services"]) == {"loraplex", "prometheus", "grafana"}
    named = set(data.get("volumes") or {})
    host_ports = []
    for name, svc in data["services"].items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: unknown keys {sorted(set(svc) - SERVICE_KEYS)}"
        assert "image" in svc
        assert set(svc.get("depends_on", [])) <= set(data["services"])
        host_ports += [p.split(":")[0] for p in svc.get("ports", [])]
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"
    assert len(host_ports) == len(set(host_ports)), "host ports collide"


def test_server_is_built_from_the_cpu_variant():
    build = service("loraplex")["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    dockerfile = (context / build["dockerfile"]).read_text()
    for arg in build["args"]:
        assert f"ARG {arg}=" in dockerfile, f"build arg {arg} is not declared in the Dockerfile"
    assert build["args"]["BASE_IMAGE"].startswith("python:3.11-slim")
    assert build["args"]["TORCH_INDEX"].endswith("/whl/cpu")


def test_server_arguments_environment_and_adapters(tmp_path):
    svc = service("loraplex")
    args = parse_server_args(svc["command"])
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert all(k.startswith("LORAPLEX_") for k in env)
    cfg = load_config(config_file=IMAGE_CONFIG, environ=env)  # rejects unknown or malformed settings
    assert cfg.engine.model.threads == int(env["LORAPLEX_THREADS"])
    for item in args.adapter:
        _, path = item.split("=")
        assert (host_path("loraplex", f"{cfg.engine.lora.adapter_root}/{path}") / "adapter_config.json").is_file()
    assert container_ports("loraplex") == {cfg.server.port, cfg.server.http_port, cfg.server.metrics_port}


def _prometheus_config() -> tuple[dict, Path]:
    command = service("prometheus")["command"]
    flag = next(c for c in command if c.startswith("--config.file="))
    path = host_path("prometheus", flag.split("=", 1)[1])
    return load_yaml(path), path


def test_prometheus_config_structure():
    config, _ = _prometheus_config()
    assert set(config) <= {"global", "rule_files", "scrape_configs"}
    for key in ("scrape_interval", "evaluation_interval"):
        assert promql_parser.parse_duration(config["global"][key]).total_seconds() > 0
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert jobs == ["loraplex"]
    for job in config["scrape_configs"]:
        assert set(job) <= {"job_name", "metrics_path", "scrape_interval", "static_configs"}
        assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_scrapes_the_server_metrics_port():
    config, _ = _prometheus_config()
    metrics_port = config_from_toml(IMAGE_CONFIG).server.metrics_port
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"loraplex:{metrics_port}"]
    assert metrics_port in container_ports("loraplex")


def test_prometheus_loads_every_alert_rule_file():
    config, _ = _prometheus_config()
    loaded = set()
    for pattern in config["rule_files"]:
        directory = host_path("prometheus", str(PurePosixPath(pattern).parent))
        loaded |= {p for p in directory.iterdir() if fnmatch.fnmatch(p.name, PurePosixPath(pattern).name)}
    assert loaded == set((DEPLOY / "prometheus" / "rules").glob("*.yml"))


def test_grafana_provisioning_is_mounted():
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    (provider,) = load_yaml(provisioning / "dashboards" / "loraplex.yml")["providers"]
    dashboards = host_path("grafana", provider["options"]["path"])
    assert (dashboards / "loraplex.json").is_file()
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path("grafana", home).is_file()


def test_grafana_datasource_points_at_prometheus():
    (ds,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    host, port = ds["url"].removeprefix("http://").rstrip("/").split(":")
    assert host == "prometheus" and int(port) in container_ports("prometheus")

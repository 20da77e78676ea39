"""The Serve application: ``LoraplexIngress`` in front of ``LoraplexReplica`` (one engine each).

``deploy/ray/serve_config.yaml`` names ``loraplex_server.ray_serve.app:build_app`` with ``args``
(see ``AppArgs``); the Loraplex settings come from ``config.py`` as for one server: the TOML file
``config_file`` and ``LORAPLEX_*`` variables (set them in the application's
``runtime_env.env_vars``). They are read once, where the application is built, and handed to every
replica, so all replicas run the same settings. Relative paths are made absolute there.

Serve's gRPC proxy needs ``GRPC_SERVICER_FUNCTIONS`` in ``grpc_options.grpc_servicer_functions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..config import Config, load_config, with_overrides

try:
    from ray import serve
    from ray.serve import Application
except ImportError as exc:  # the optional extra is missing
    raise ImportError("the Ray Serve application needs Ray Serve: pip install 'loraplex-server[ray]'") from exc

from .ingress import LoraplexIngress
from .replica import LoraplexReplica

GRPC_SERVICER_FUNCTIONS = (
    "loraplex.v1.loraplex_pb2_grpc.add_LoraplexServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
REPLICA_DEPLOYMENT = "LoraplexReplica"
INGRESS_DEPLOYMENT = "LoraplexIngress"
INGRESS_MAX_ONGOING_REQUESTS = 4096  # it only forwards; the replicas' limit is what backpressures


@dataclass(frozen=True)
class AppArgs:
    """The application's ``args`` in a Serve config."""

    config_file: str | None = None  # a Loraplex TOML file; LORAPLEX_* variables override it
    adapters_per_replica: int = 8  # Serve's max_num_models_per_replica: adapters one replica holds

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> AppArgs:
        known = {f.name for f in fields(cls)}
        unknown = set(raw or {}) - known
        if unknown:
            raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(known)}")
        args = cls(**(raw or {}))
        value = args.adapters_per_replica
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"application arg adapters_per_replica must be a positive integer, got {value!r}")
        return args


def absolute_paths(config: Config) -> Config:
    """Relative paths resolved here, where the application is built (replicas may run elsewhere)."""
    engine, server = config.engine, config.server
    lora_root = engine.lora.adapter_root
    model = engine.model.model
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    engine = with_overrides(engine, model={"model": model},
                            lora={"adapter_root": Path(lora_root).resolve() if lora_root else None})
    keys = Path(server.keys_file).resolve() if server.keys_file else None
    return replace(config, engine=engine, server=replace(server, keys_file=keys))


def loraplex_app(config: Config, adapters_per_replica: int = 8, num_replicas: int = 2,
                 replica_actor_options: Mapping[str, Any] | None = None) -> Application:
    """The application from a Config (Python API; ``build_app`` is the Serve-config entry point,
    where a ``deployments:`` entry sets replicas and resources)."""
    # serve.deployment's stubs type the class form as a decorator factory; it returns a Deployment
    replica = serve.deployment(LoraplexReplica).options(  # type: ignore[attr-defined]
        name=REPLICA_DEPLOYMENT, num_replicas=num_replicas,
        max_ongoing_requests=config.engine.scheduler.max_num_seqs,  # then Serve spreads the load
        ray_actor_options=dict(replica_actor_options or {"num_cpus": 1}))
    ingress = serve.deployment(LoraplexIngress).options(  # type: ignore[attr-defined]
        name=INGRESS_DEPLOYMENT, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(absolute_paths(config), adapters_per_replica))


def build_app(args: dict) -> Application:
    """``import_path: loraplex_server.ray_serve.app:build_app`` in a Serve config."""
    parsed = AppArgs.parse(args)
    config = load_config(config_file=Path(parsed.config_file) if parsed.config_file else None)
    return loraplex_app(config, parsed.adapters_per_replica)

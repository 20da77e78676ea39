"""deploy/docker: hadolint, and the image's promises (user, ports, volumes, health, settings)."""

from __future__ import annotations

import json
import re
import tomllib

from deploy_support import DEPLOY, REPO, config_from_toml, run, tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
IGNORE_FILE = DEPLOY / "docker" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return out


def last_stage() -> list[tuple[str, str]]:
    items = instructions()
    start = max(i for i, (word, _) in enumerate(items) if word == "FROM")
    return items[start:]


def args_of(word: str, stage=None) -> list[str]:
    return [rest for w, rest in (stage or instructions()) if w == word]


def test_hadolint_clean():
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_and_torch_index_are_build_args():
    items = instructions()
    assert items[0][0] == "ARG" and items[0][1].startswith("BASE_IMAGE=nvidia/cuda:")
    assert all(rest.startswith("${BASE_IMAGE}") for rest in args_of("FROM"))
    assert any(rest.startswith("TORCH_INDEX=") for rest in args_of("ARG"))
    assert any('--index-url "${TORCH_INDEX}"' in rest for rest in args_of("RUN"))
    # both distributions in one pip call: the client (./client) and the server (.), which requires it
    assert any(re.search(r"pip install .*--no-cache-dir \./client \.( |$)", rest) for rest in args_of("RUN"))


def test_runs_as_a_non_root_user():
    (user,) = args_of("USER", last_stage())
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), "numeric non-root uid (runAsNonRoot)"


def test_ports_and_volumes_match_the_image_settings():
    cfg = config_from_toml(DEPLOY / "docker" / "loraplex.toml")
    stage = last_stage()
    exposed = {int(p) for rest in args_of("EXPOSE", stage) for p in rest.split()}
    assert exposed == {cfg.server.port, cfg.server.http_port, cfg.server.metrics_port} == {50051, 8000, 9090}
    volumes = {v for rest in args_of("VOLUME", stage) for v in json.loads(rest)}
    assert volumes == {"/models", "/adapters"}
    assert str(cfg.engine.lora.adapter_root) == "/adapters"
    env = " ".join(args_of("ENV", stage))
    assert "LORAPLEX_CONFIG=/etc/loraplex/loraplex.toml" in env
    assert f"LORAPLEX_TARGET=localhost:{cfg.server.port}" in env
    assert f"chown loraplex:loraplex {cfg.engine.model.cache_dir}" in " ".join(args_of("RUN", stage))


def test_entrypoint_and_healthcheck_use_the_installed_commands():
    from loraplex.cli import build_parser as client_parser

    scripts = {name: target for pyproject in (REPO / "pyproject.toml", REPO / "client" / "pyproject.toml")
               for name, target in tomllib.loads(pyproject.read_text())["project"]["scripts"].items()}
    stage = last_stage()
    (entrypoint,) = args_of("ENTRYPOINT", stage)
    assert json.loads(entrypoint) == ["loraplex-server"] and "loraplex-server" in scripts
    (health,) = args_of("HEALTHCHECK", stage)
    assert "--start-period=" in health
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[0] == "loraplex" and "loraplex" in scripts
    assert client_parser().parse_args(command[1:]).command == "health"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_copied_sources_exist_and_are_not_dockerignored():
    patterns = [p.strip() for p in IGNORE_FILE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    copies = [rest.split()[:-1] for rest in args_of("COPY") if not rest.startswith("--from")]
    sources = [s for srcs in copies for s in srcs]
    assert "server" in sources and "client" in sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by {IGNORE_FILE.name}"
        assert not _ignored(f"{src}/x.py", patterns) or not (REPO / src).is_dir(), f"{src}/ contents excluded"
    assert _ignored("tests/assets/x", patterns) and _ignored("server/a/__pycache__/b.pyc", patterns)

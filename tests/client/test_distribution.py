"""Two distributions from one repository: the client wheel (`loraplex`, client/pyproject.toml) needs only
grpcio and protobuf; the server (`loraplex-server`, the top-level pyproject.toml) requires the client."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from loraplex._version import __version__ as CLIENT_VERSION

ROOT = Path(__file__).resolve().parents[2]
CLIENT_RUNTIME = {"grpcio", "grpcio-health-checking", "protobuf"}
HEAVY = {"torch", "transformers", "grpcio-tools", "safetensors", "accelerate", "numpy", "loraplex-server"}
# importing every client module and running `loraplex --help` must not touch these
NOT_IMPORTED = ("torch", "transformers", "numpy", "aiohttp", "grpc_tools", "loraplex_server")


def requirement_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement string."""
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def runtime_names(requirements: list[str]) -> set[str]:
    """Names of the requirements that hold without any extra."""
    return {requirement_name(r) for r in requirements if "extra ==" not in r.replace("'", '"')}


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The client wheel, built offline from a copy of client/ (so no build/ or egg-info lands there)."""
    pytest.importorskip("setuptools", reason="builds the wheel without build isolation (the test extra)")
    tmp = tmp_path_factory.mktemp("client-wheel")
    src = tmp / "client"
    shutil.copytree(ROOT / "client", src,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "-q", str(src), "-w", str(tmp / "dist")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp / "dist").glob("loraplex-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        yield archive


def wheel_metadata(archive: zipfile.ZipFile):
    (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return Parser().parsestr(archive.read(path).decode())


def test_client_wheel_requires_grpcio_and_protobuf_only(client_wheel):
    meta = wheel_metadata(client_wheel)
    assert (meta["Name"], meta["Version"]) == ("loraplex", CLIENT_VERSION)
    requirements = meta.get_all("Requires-Dist") or []
    assert runtime_names(requirements) == CLIENT_RUNTIME, requirements
    assert not {requirement_name(r) for r in requirements} & HEAVY, requirements
    assert "bench" in (meta.get_all("Provides-Extra") or [])
    bench = [r for r in requirements if 'extra == "bench"' in r.replace("'", '"')]
    assert [requirement_name(r) for r in bench] == ["aiohttp"], requirements


def test_client_wheel_holds_the_client_cli_and_stubs_only(client_wheel):
    names = set(client_wheel.namelist())
    for path in ("loraplex/__init__.py", "loraplex/cli.py", "loraplex/client.py", "loraplex/py.typed",
                 "loraplex/v1/__init__.py", "loraplex/v1/loraplex_pb2.py", "loraplex/v1/loraplex_pb2.pyi",
                 "loraplex/v1/loraplex_pb2_grpc.py"):
        assert path in names, f"{path} missing from the wheel"
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"loraplex", f"loraplex-{CLIENT_VERSION}.dist-info"}, tops
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert re.search(r"^loraplex = loraplex\.cli:main$", client_wheel.read(entry_points).decode(), re.M)


def test_server_distribution_requires_the_client_at_its_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta, setuptools = project["project"], project["tool"]["setuptools"]
    assert meta["name"] == "loraplex-server"
    assert setuptools["packages"]["find"]["where"] == ["server"]
    assert setuptools["dynamic"]["version"] == {"attr": "loraplex_server.__version__"}
    from loraplex_server import __version__ as server_version

    assert server_version == CLIENT_VERSION, "the client and the server are released together"
    assert f"loraplex=={CLIENT_VERSION}" in meta["dependencies"], "the server serves the client's stubs"
    assert "grpcio-tools" not in runtime_names(meta["dependencies"]), "only `make protos` needs grpcio-tools"
    extras = meta["optional-dependencies"]
    assert {"grpcio-tools"} <= {requirement_name(r) for r in extras["protos"]}
    assert {"grpcio-tools", "setuptools"} <= {requirement_name(r) for r in extras["test"]}
    assert "loraplex" not in meta.get("scripts", {}), "the `loraplex` command belongs to the client"


def test_server_package_data_ships_every_native_source():
    """A non-editable install (the Docker image) compiles csrc/ at first start: every file must ship."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    model = ROOT / "server" / "loraplex_server" / "model"
    shipped = {p for pattern in patterns["loraplex_server.model"] for p in model.glob(pattern)}
    assert set((model / "csrc").iterdir()) <= shipped


def test_client_modules_import_without_server_packages():
    """Every client module imports, and `loraplex --help` runs, with the server's packages hidden."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in NOT_IMPORTED)
    modules = sorted(f"loraplex.{p.stem}" for p in (ROOT / "client" / "loraplex").glob("*.py")
                     if p.stem not in ("__init__", "__main__"))
    code = (f"import sys; {blocked}\n"
            f"import importlib; [importlib.import_module(m) for m in {modules!r}]\n"
            "from loraplex.cli import main; sys.exit(main(['--help']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "usage: loraplex" in result.stdout

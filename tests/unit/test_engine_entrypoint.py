"""``python -m loraplex_server.engine``: flags not given leave the environment's settings alone;
the Python version pyproject claims can import what the code imports."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from loraplex_server.engine.__main__ import config_from_args, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_environment_settings_survive_flags_that_were_not_given():
    env = {"LORAPLEX_DEVICE": "cpu", "LORAPLEX_DTYPE": "bfloat16", "LORAPLEX_LOAD_FORMAT": "dummy"}
    config = config_from_args(parse_args([]), env)
    assert (config.model.device, config.model.dtype, config.model.load_format) == ("cpu", "bfloat16", "dummy")


def test_flags_given_override_the_environment():
    config = config_from_args(parse_args(["--dtype", "float32", "--load-format", "safetensors"]),
                              {"LORAPLEX_DTYPE": "bfloat16", "LORAPLEX_LOAD_FORMAT": "dummy"})
    assert (config.model.dtype, config.model.load_format) == ("float32", "safetensors")


def _imports_tomllib() -> list[str]:
    return [str(p.relative_to(ROOT)) for d in ("server", "client") for p in (ROOT / d).rglob("*.py")
            if re.search(r"^\s*import tomllib", p.read_text(), re.M)]


def test_requires_python_covers_the_stdlib_modules_the_code_imports():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", spec).groups())
    if _imports_tomllib():  # tomllib is stdlib from 3.11 on
        assert minimum >= (3, 11), f"requires-python {spec!r} but {_imports_tomllib()} import tomllib"

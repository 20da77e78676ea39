"""Fixtures of the Ray Serve tests: an adapter root with four adapters (two trained, two random)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from helpers import ASSETS, BENCHMARKS
from ray_support import DEMO_ADAPTERS, SYNTHETIC_ADAPTERS

sys.path.insert(0, str(BENCHMARKS))
from synthetic_adapters import write_adapter  # noqa: E402


@pytest.fixture(scope="session")
def adapter_root(model_dir, tmp_path_factory) -> Path:
    """Copies of the demo adapters (a symlink out of the root would be refused) plus two random ones."""
    root = tmp_path_factory.mktemp("ray-adapters")
    for name in DEMO_ADAPTERS:
        shutil.copytree(ASSETS / "adapters" / name, root / name)
    config = AutoConfig.from_pretrained(str(model_dir))
    for seed, name in enumerate(SYNTHETIC_ADAPTERS):
        write_adapter(root / name, config, rank=8, targets=("q_proj", "v_proj", "down_proj"), seed=seed,
                      b_scale=0.5)
    return root

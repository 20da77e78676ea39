"""``benchmarks/kernel_bench.py`` runs end to end before a GPU ever sees it: without CUDA, its
interpreter correctness smoke, then (``--cpu-decode``) the decode comparison on a 2-layer dummy
model with the decode steps in eager emulation. The numbers mean nothing on a CPU; the rows must
exist, be positive, and say the graphs were built."""

import json
import subprocess
import sys

import pytest

from helpers import BENCHMARKS, write_tiny_config


@pytest.mark.slow
def test_decode_comparison_runs_on_cpu(tmp_path):
    tiny = write_tiny_config(tmp_path / "tiny.json")
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_bench.py"), "--cpu-decode", "--presets", str(tiny),
         "--batches", "1", "3", "--steps", "2", "--adapters", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |diff| vs loop" in proc.stdout
    rows = json.loads(out.read_text())["decode"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["capture_s"] is not None and row["capture_s"] >= 0
        assert all(row[k] > 0 for k in ("base_eager_ms", "base_graph_ms", "lora_eager_ms", "lora_graph_ms"))
    assert "| LoRA/base (graph) |" in proc.stdout

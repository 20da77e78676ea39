"""``benchmarks/host_overhead.py`` runs end to end on its tiny model: one row per batch size, the
step split into forward and host time, both positive and adding up."""

import json
import subprocess
import sys

import pytest

from helpers import BENCHMARKS


@pytest.mark.slow
def test_host_overhead_rows(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "host_overhead.py"), "--seqs", "3", "8", "--steps", "3",
         "--adapters", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["seqs"] for r in rows] == [3, 8]
    for row in rows:
        assert row["host_ms"] > 0 and row["forward_ms"] > 0 and row["sampling_ms"] > 0 and row["text_ms"] > 0
        assert row["loop_host_ms"] > 0  # the same requests through EngineLoop measured decode steps
        # each step's forward and sampling are parts of it, so their medians are below the step's
        assert row["forward_ms"] < row["step_ms"] and row["sampling_ms"] < row["step_ms"]
    assert "| 8 |" in proc.stdout

"""``benchmarks/structured_outputs.py`` runs end to end, small: both batch kinds timed, the masks
timed only where rows are constrained, and the compile figures present."""

import json
import subprocess
import sys

import pytest

from helpers import BENCHMARKS


@pytest.mark.slow
def test_structured_outputs_benchmark_runs(tmp_path):
    out = tmp_path / "structured.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "structured_outputs.py"), "--seqs", "6", "--constrained", "2",
         "--steps", "3", "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["seqs"] == 6 and result["constrained"] == 2
    assert result["step_ms_none"] > 0 and result["step_ms_constrained"] > 0 and result["mask_ms"] > 0
    assert result["cold_ms"] > result["cached_ms"] >= 0
    assert "| 2 |" in proc.stdout

"""The soak script on a 15-second run (``make soak`` runs longer): its own assertions decide the exit code.

The mix (hot-swaps, loads, unloads, aborts, streams, bad requests) cycles every few seconds, so 15 s
exercises each kind several times; the suite's time budget pays for no more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_short_soak_passes(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--minutes", "0.25", "--workers", "4",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["requests"] > 20 and result["greedy_unchanged"]

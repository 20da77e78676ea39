"""``benchmarks/time_to_serving.py``: two real server processes reach SERVING, the second having
registered every adapter directory under its root by discovery (small count, seconds)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import BENCHMARKS


@pytest.mark.slow
def test_both_servers_reach_serving_and_list_every_adapter(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import time_to_serving

    out = tmp_path / "tts.json"
    result = time_to_serving.main(["--registered", "25", "--files", "2", "--adapter-dir", str(tmp_path / "pool"),
                                   "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["no_adapters"]["adapters"] == 0 and result["with_adapters"]["adapters"] == 25
    assert result["with_adapters"]["seconds_to_serving"] > 0 and result["no_adapters"]["seconds_to_serving"] > 0
    assert "| 25 |" in capsys.readouterr().out

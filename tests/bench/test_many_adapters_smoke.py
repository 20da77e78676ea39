"""``benchmarks/many_adapters.py --quick``: registers its hard-linked adapters, runs every point with
the requested spread, and reports registration cost and ratios (tiny dummy model, seconds)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import BENCHMARKS


@pytest.mark.slow
def test_quick_run_reports_every_point(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import many_adapters

    out = tmp_path / "many.json"
    results = many_adapters.run(["--quick", "--adapter-dir", str(tmp_path / "adapters"), "--json", str(out)])

    assert json.loads(out.read_text())["points"] == results["points"]
    reg, cfg = results["registration"], results["config"]
    assert reg["registered"] == cfg["registered"] == 300 and reg["register_s"] > 0
    assert len(list((tmp_path / "adapters").glob("*/a*"))) == 300
    assert [p["distinct"] for p in results["points"]] == [1, 4, 16]
    for point in results["points"]:
        assert point["requests"] == 16 and point["output_tokens"] == 16 * cfg["new_tokens"]
        assert point["output_tokens_per_s"] > 0 and point["ratio_vs_1"] > 0
        assert 1 <= point["extra"]["distinct_adapters"] <= point["distinct"]
    assert results["points"][0]["ratio_vs_1"] == 1.0
    assert "| 16 |" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_run_on_the_unified_pool(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import many_adapters

    results = many_adapters.run(["--quick", "--adapter-dir", str(tmp_path / "adapters"), "--memory-pool", "unified",
                                 "--max-loras", "0", "--kv-cache-bytes", "64MiB", "--distinct", "1", "16"])
    assert results["config"]["memory_pool"] == "unified" and results["config"]["kv_cache_bytes"] == 64 * 2 ** 20
    assert [p["distinct"] for p in results["points"]] == [1, 16]
    assert all(p["output_tokens"] == 16 * results["config"]["new_tokens"] for p in results["points"])
    assert "unified memory pool of 67108864 bytes" in capsys.readouterr().out

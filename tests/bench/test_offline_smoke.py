"""The offline benchmark harness end to end in smoke mode (tiny dummy Llama, seconds)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import BENCHMARKS

SYSTEMS = ("peft_sequential", "peft_batched", "loraplex_base", "loraplex_lora")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def offline():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.fail("matplotlib is required by the benchmark harness (plots): pip install matplotlib "
                    "(make install does it)", pytrace=False)
    sys.path.insert(0, str(BENCHMARKS))
    import offline

    return offline


@pytest.mark.slow
def test_smoke_run_writes_complete_results(offline, tmp_path):
    results = offline.run(["--smoke", "--out", str(tmp_path)])

    on_disk = json.loads((tmp_path / "offline_smoke.json").read_text())
    assert on_disk["systems"].keys() == results["systems"].keys()
    assert (tmp_path / "offline_smoke.md").read_text().startswith("# Offline benchmark")

    cfg = results["config"]
    for name in SYSTEMS:
        s = results["systems"][name]
        assert s["requests"] == cfg["requests"] == 8
        assert s["output_tokens"] == cfg["requests"] * cfg["new_tokens"]  # exactly new_tokens each
        assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
        assert 0 < s["e2e_s"]["p50"] <= s["e2e_s"]["p90"] <= s["e2e_s"]["p99"]
        if name != "peft_batched":
            assert 0 < s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= s["e2e_s"]["p99"]

    assert set(results["ratios"]) == {"loraplex_lora / peft_sequential", "loraplex_lora / peft_batched",
                                      "loraplex_lora / loraplex_base"}
    for ratio in results["ratios"].values():
        assert ratio["value"] > 0 and isinstance(ratio["met"], bool)

    # Same weights, prompts and adapter files everywhere: greedy outputs agree across systems.
    for pair, agreement in results["agreement"].items():
        assert agreement is not None and agreement >= 0.75, pair

    scaling = results["scaling"]
    assert [p["adapters"] for p in scaling["points"]] == [1, 8, 16]
    for point in scaling["points"]:
        assert point["output_tokens_per_s"] > 0 and point["ttft_s"]["p99"] > 0
        assert point["extra"]["distinct_adapters"] == point["adapters"]
    assert scaling["base"]["output_tokens_per_s"] > 0
    assert scaling["ratio"]["value"] > 0

    assert len(results["plots"]) == 2
    for name in results["plots"]:
        data = (tmp_path / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name

"""The vLLM rows' plumbing without vLLM: job files, the peer protocol (a fake peer script), results,
ratios and the skip when the venv is absent. Fast; never needs .venv-vllm."""

from __future__ import annotations

import json
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest

from helpers import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))

import report  # noqa: E402
import vllm_peer  # noqa: E402  (stdlib only at import time)
import vllm_rows  # noqa: E402
from peers import ModelSpec, Workload  # noqa: E402

# Answers like vllm_peer.py --serve: request i of a run gets tokens [i, i+1, ...] (adapter or not).
FAKE_PEER = textwrap.dedent('''
    import json, os, sys
    job = json.load(open(sys.argv[1]))
    if job.get("crash"):
        print("engine failed to start", file=sys.stderr)
        sys.exit(3)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "startup_s": 1.5, "warmup_s": 0.25}) + "\\n"); out.flush()
    runs = []
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        n = len(job["prompts"])
        tokens = [[i + k for k in range(job["new_tokens"])] for i in range(n)]
        run = {"wall_s": 2.0, "e2e": [1.0 + i / n for i in range(n)], "tokens": tokens,
               "output_tokens": n * job["new_tokens"], "output_tokens_per_s": n * job["new_tokens"] / 2.0,
               "cpu_per_wall": 1.5}
        runs.append(run)
        out.write(json.dumps(run) + "\\n"); out.flush()
    json.dump({"startup_s": 1.5, "runs": runs, "versions": {"vllm": "fake"}, "adapters": job["adapters"]},
              open(sys.argv[2], "w"))
''')


def workload() -> Workload:
    return Workload([[5, 6, 7], [8, 9, 10, 11], [12, 13]], ["a0", None, "a1"], 4)


def job(enable_lora: bool, **extra) -> dict:
    pool = {"a0": Path("/adapters/a0"), "a1": Path("/adapters/a1"), "unused": Path("/adapters/u")}
    j = vllm_rows.make_job(model_dir="/m", dtype="float32", threads=1, work=workload(), adapter_paths=pool,
                           enable_lora=enable_lora, max_lora_rank=32, max_loras=2, max_num_seqs=64,
                           max_batch_tokens=512)
    j.update(extra)
    return j


@pytest.fixture
def fake_peer(tmp_path) -> Path:
    path = tmp_path / "fake_peer.py"
    path.write_text(FAKE_PEER)
    return path


def test_job_files_base_and_lora_rows():
    base, lora = job(False), job(True)
    assert base["prompts"] == lora["prompts"] == [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    assert base["adapters"] == [None, None, None] and base["adapter_paths"] == {} and not base["enable_lora"]
    assert lora["adapters"] == ["a0", None, "a1"] and lora["enable_lora"]
    assert lora["adapter_paths"] == {"a0": "/adapters/a0", "a1": "/adapters/a1"}  # only the adapters used
    assert lora["new_tokens"] == 4 and lora["max_num_batched_tokens"] == 512
    json.dumps(lora)  # a JSON file as is


def test_peer_protocol_with_fake_peer(tmp_path, fake_peer):
    peer = vllm_rows.VllmPeer("vllm_lora", job(True), tmp_path / "w", python=sys.executable, script=fake_peer)
    assert peer.meta["startup_s"] == 1.5 and peer.meta["warmup_s"] == 0.25
    assert peer.meta["distinct_adapters"] == 2
    for _ in range(2):
        run = peer.run()
        assert run.system == "vllm_lora" and run.wall_s == 2.0
        assert [r.tokens for r in run.records] == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
        assert [r.e2e for r in run.records] == pytest.approx([1.0, 4 / 3, 5 / 3])
        assert all(r.ttft is None for r in run.records)
        assert run.output_tokens == 12 and run.extra["cpu_per_wall"] == 1.5
    summary = peer.close()
    assert summary["versions"] == {"vllm": "fake"} and "runs" not in summary
    assert json.loads((tmp_path / "w" / "vllm_lora_job.json").read_text())["adapters"] == ["a0", None, "a1"]


def test_peer_that_dies_reports_its_log(tmp_path, fake_peer):
    with pytest.raises(RuntimeError, match="engine failed to start"):
        vllm_rows.VllmPeer("vllm_base", job(False, crash=True), tmp_path, python=sys.executable, script=fake_peer)


def test_rows_skipped_without_venv(tmp_path):
    args = Namespace(vllm_venv=tmp_path / "no-venv")
    peers, info = vllm_rows.maybe_start(args, ModelSpec(model=str(tmp_path)), {}, workload(), tmp_path,
                                        log=lambda m: None)
    assert peers == {} and "no vLLM venv" in info["skipped"]
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    dummy = ModelSpec(model=str(tmp_path), load_format="dummy")
    assert "real weights" in vllm_rows.unavailable_reason(tmp_path / "venv", dummy, str(tmp_path))
    assert "model directory" in vllm_rows.unavailable_reason(tmp_path / "venv", ModelSpec(), str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert vllm_rows.unavailable_reason(tmp_path / "venv", ModelSpec(), str(tmp_path)) is None


def test_peer_settings():
    assert vllm_peer.cpu_bind(1) == "0" and vllm_peer.cpu_bind(2) == "0-1"
    assert [vllm_peer.lora_rank_cap(r) for r in (8, 9, 32, 33, 300)] == [8, 16, 32, 64, 320]
    with pytest.raises(ValueError):
        vllm_peer.lora_rank_cap(1024)


def test_ratios_agreement_and_markdown(tmp_path, fake_peer):
    runs = {}
    for system, lora in (("vllm_base", False), ("vllm_lora", True)):
        peer = vllm_rows.VllmPeer(system, job(lora), tmp_path / system, python=sys.executable, script=fake_peer)
        runs[system] = peer.run()
        peer.close()
    systems = {name: report.summarize(run) for name, run in runs.items()}
    systems["loraplex_lora"] = dict(systems["vllm_lora"], output_tokens_per_s=12.0)
    ratios = report.vllm_ratios(systems, 16)
    assert ratios == {"Loraplex 16 adapters / vLLM base": 2.0, "Loraplex 16 adapters / vLLM 16 adapters": 2.0,
                      "vLLM 16 adapters / vLLM base": 1.0}
    assert report.token_agreement(runs, "vllm_base", "vllm_lora") == 1.0
    md = report._vllm_lines({"vllm": {"skipped": "no venv"}})
    assert md[0] == "vLLM rows skipped: no venv."
    lines = report._vllm_lines({"vllm": {"start": {"vllm_base": {"ready_s": 90}}, "peers": {}},
                                "vllm_ratios": ratios})
    assert any("vllm_base 90 s" in line for line in lines) and "| Loraplex 16 adapters / vLLM base | 2.00 |" in lines

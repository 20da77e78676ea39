"""Captured decode steps (``engine/decode_graphs.py``, ``engine/decode_inputs.py``) on the CPU.

Without a GPU, ``cuda_graphs=on`` runs the exact padded static step a CUDA graph captures (same
input rows, padding, trash slot, static LoRA mapping, block-table attention), eagerly, with the
torch functions. These tests prove that step generates what the packed eager step generates and
that the runner sends it only the steps it can hold. ``tests/kernels`` runs the same comparison
on the Triton kernels (real captures on a GPU).
"""

import logging

import pytest
import torch

from helpers import MIXED_REQUESTS, assert_same_generation, dummy_engine_factory, generate_mixed
from loraplex_server.config import ModelConfig, load_config
from loraplex_server.cli import build_parser, flag_values
from loraplex_server.engine.decode_graphs import (DecodeGraphs, build_decode_graphs, capture_sizes, dynamic_rope,
                                                  graph_mode)
from loraplex_server.engine.decode_inputs import DecodeRow, StaticDecodeInputs
from loraplex_server.engine.request import Request, SamplingParams
from loraplex_server.engine.scheduler import ScheduledRequest, SchedulerOutput

CPU = torch.device("cpu")


@pytest.fixture
def make_engine(tmp_path):
    return dummy_engine_factory(tmp_path, CPU, max_model_len=128)


def count_graph_runs(engine) -> list[tuple[int, int]]:
    """Records (sequences, padded size) of every step the decode graphs run."""
    graphs = engine.runner.decode_graphs
    runs: list[tuple[int, int]] = []
    run = graphs.run

    def counted(batch):
        runs.append((len(batch), graphs.padded_size(len(batch))))
        return run(batch)
    graphs.run = counted
    return runs


# ---------------------------------------------------------------- sizes and settings


@pytest.mark.parametrize("max_batch,sizes", [
    (1, [1]), (3, [1, 2, 3]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]), (30, [1, 2, 4, 8, 16, 24, 30]),
    (32, [1, 2, 4, 8, 16, 24, 32]),
])
def test_capture_sizes_ladder(max_batch, sizes):
    assert capture_sizes(max_batch) == sizes


def test_capture_sizes_refuses_an_empty_ladder():
    with pytest.raises(ValueError, match=">= 1"):
        capture_sizes(0)


@pytest.mark.parametrize("setting,device,kernels,mode", [
    ("auto", "cpu", True, None), ("off", "cpu", True, None), ("on", "cpu", False, "eager"),
    ("auto", "cuda", True, "cuda"), ("on", "cuda", True, "cuda"), ("off", "cuda", True, None),
    ("auto", "cuda", False, None),  # without the Triton kernels auto stays eager ...
    ("on", "cuda", False, "cuda"),  # ... unless asked for
])
def test_graph_mode_per_setting_and_device(setting, device, kernels, mode):
    assert graph_mode(setting, torch.device(device), kernels) == mode


def test_dynamic_rope_is_detected_flat_or_per_attention_type():
    from types import SimpleNamespace as NS

    assert dynamic_rope(NS(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    assert dynamic_rope(NS(rope_parameters=None, rope_scaling={"type": "dynamic"}))
    assert dynamic_rope(NS(rope_parameters={"full_attention": {"rope_type": "dynamic"},
                                            "sliding_attention": {"rope_type": "default"}}))
    assert not dynamic_rope(NS(rope_parameters={"rope_type": "llama3", "factor": 8.0}))
    assert not dynamic_rope(NS())


def test_bad_graph_settings_are_configuration_errors():
    with pytest.raises(ValueError, match="auto, on or off"):
        ModelConfig(cuda_graphs="sometimes")
    with pytest.raises(ValueError, match=">= 1"):
        ModelConfig(cuda_graph_max_batch=0)
    with pytest.raises(ValueError, match="auto, on or off"):
        load_config(environ={"LORAPLEX_CUDA_GRAPHS": "yes"})
    args = build_parser().parse_args(["--cuda-graphs", "off", "--cuda-graph-max-batch", "16"])
    model = load_config(flag_values(args), environ={}).engine.model
    assert (model.cuda_graphs, model.cuda_graph_max_batch) == ("off", 16)


def test_default_cpu_engine_runs_no_static_steps(make_engine):
    engine = make_engine()
    assert engine.runner.decode_graphs is None
    assert engine.runner.kv_caches[0][0].shape[0] == 64 * 8  # no trash block either


# ---------------------------------------------------------------- static input rows


def test_rows_hold_the_sequences_then_padding():
    inputs = StaticDecodeInputs(max_batch=4, max_blocks=3, block_size=8, trash_block=9, device=CPU)
    inputs.write([DecodeRow(5, 10, [3, 7], 1), DecodeRow(6, 0, [2], -1), DecodeRow(7, 16, [1, 4, 8], 0)], 4)
    assert inputs.rows.tolist() == [[5, 10, 7 * 8 + 2, 11, 1], [6, 0, 2 * 8, 1, -1], [7, 16, 8 * 8, 17, 0],
                                    [0, 0, 9 * 8, 1, -1]]  # padding: the trash slot, no adapter
    assert inputs.tables[0, :2].tolist() == [3, 7] and inputs.tables[2].tolist() == [1, 4, 8]
    assert inputs.tables[1, 0] == 2 and inputs.tables[3, 0] == 9
    inputs.write([DecodeRow(1, 3, [5], 2)], 2)  # a smaller step re-pads the rows it uses
    assert inputs.rows[1].tolist() == [0, 0, 72, 1, -1] and inputs.tables[:2, 0].tolist() == [5, 9]
    meta = inputs.attention(2, kv_caches=[])
    assert meta.decode_slots()[0, :8].tolist() == list(range(40, 48))
    assert meta.varlen.ctx_lens.tolist() == [4, 1] and meta.varlen.block_tables.shape == (2, 3)
    assert inputs.lora_mapping(2).is_static and inputs.lora_mapping(2).token_slots.tolist() == [2, -1]


def test_rows_refuse_what_does_not_fit():
    inputs = StaticDecodeInputs(max_batch=2, max_blocks=2, block_size=4, trash_block=5, device=CPU)
    with pytest.raises(ValueError, match="do not fit"):
        inputs.write([DecodeRow(1, 0, [0], -1)] * 3, 2)
    with pytest.raises(ValueError, match="do not fit"):
        inputs.write([], 1)
    with pytest.raises(ValueError, match="3 blocks"):
        inputs.write([DecodeRow(1, 9, [0, 1, 2], -1)], 1)


# ---------------------------------------------------------------- the engine


def test_static_decode_steps_generate_what_packed_steps_generate(make_engine):
    expected = generate_mixed(make_engine())
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=4)
    graphs = engine.runner.decode_graphs
    assert isinstance(graphs, DecodeGraphs) and graphs.mode == "eager"
    assert sorted(graphs.steps) == [(s, lora) for s in (1, 2, 4) for lora in (False, True)]
    assert engine.runner.kv_caches[0][0].shape[0] == 65 * 8  # the trash block
    runs = count_graph_runs(engine)
    assert_same_generation(generate_mixed(engine), expected)
    assert (4, 4) in runs


def test_static_decode_steps_on_the_unified_pool_generate_what_packed_steps_generate(make_engine):
    """Adapter weights paged in the KV cache (the static step's gather reads them at element
    offsets of each layer's K and V cache, the trash block past the pool's pages)."""
    expected = generate_mixed(make_engine())
    engine = make_engine(memory_pool="unified", cuda_graphs="on", cuda_graph_max_batch=4)
    assert engine.lora.shared.pool.num_pages == 160 and engine.runner.kv_caches[0][0].shape[0] == 161 * 8
    runs = count_graph_runs(engine)
    assert_same_generation(generate_mixed(engine), expected)
    assert (4, 4) in runs and engine.lora.shared.pool.adapter_pages > 0


def test_padded_rows_are_computed_and_discarded(make_engine):
    """Three sequences replay the size-4 step: the padding row changes nothing."""
    requests = MIXED_REQUESTS[:3]
    expected = generate_mixed(make_engine(), requests)
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=4)
    runs = count_graph_runs(engine)
    assert_same_generation(generate_mixed(engine, requests), expected)
    assert (3, 4) in runs


def test_base_only_decode_replays_the_graph_without_lora(make_engine):
    requests = [(None, 4), (None, 7)]
    expected = generate_mixed(make_engine(), requests)
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=2)
    used = []
    for key, step in list(engine.runner.decode_graphs.steps.items()):
        engine.runner.decode_graphs.steps[key] = lambda key=key, step=step: (used.append(key), step())[1]
    assert_same_generation(generate_mixed(engine, requests), expected)
    assert used and all(not with_lora for _, with_lora in used)


def test_decode_rows_take_up_again_after_static_steps(make_engine):
    """Every third pure-decode step replays the static step, the others run the packed decode rows
    (engine/decode_batch.py): the rows never resume from the tokens of a step before the static one."""
    expected = generate_mixed(make_engine(), max_new_tokens=24)
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=4)
    graphs, calls = engine.runner.decode_graphs, iter(range(10**6))
    serves = graphs.serves
    graphs.serves = lambda num_seqs, with_lora: next(calls) % 3 == 2 and serves(num_seqs, with_lora)
    runs = count_graph_runs(engine)
    assert_same_generation(generate_mixed(engine, max_new_tokens=24), expected)
    assert len(runs) > 3


def test_decodes_past_the_largest_size_run_packed(make_engine):
    """Four decoding sequences, graphs up to 2: every step runs the packed path, same result."""
    expected = generate_mixed(make_engine())
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=2)
    runs = count_graph_runs(engine)
    assert_same_generation(generate_mixed(engine), expected)
    assert all(n <= 2 for n, _ in runs)


def _scheduled(engine, computed: int, new: int, samples: bool = True, blocks: int = 1,
               adapter_key: str | None = None) -> ScheduledRequest:
    request = Request("r", list(range(1, 20)), SamplingParams(max_new_tokens=4), adapter_key and "a0",
                      adapter_key=adapter_key)
    request.num_computed_tokens = computed
    request.block_ids = list(range(blocks))
    return ScheduledRequest(request, new, samples)


def test_runner_sends_only_pure_decode_steps_to_the_graphs(make_engine):
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=2)
    runner = engine.runner

    def graph_decode(*scheduled, lora_slots=None) -> bool:
        return runner.is_graph_decode(SchedulerOutput(list(scheduled)), lora_slots or {})
    decode = _scheduled(engine, 18, 1)
    assert graph_decode(decode)
    assert graph_decode(decode, _scheduled(engine, 5, 1))
    assert not graph_decode()
    assert not graph_decode(decode, decode, decode)  # past the largest size
    assert not graph_decode(decode, _scheduled(engine, 0, 1))  # a 1-token prompt
    assert not graph_decode(decode, _scheduled(engine, 4, 6))  # a prefill chunk
    assert not graph_decode(_scheduled(engine, 4, 1, samples=False))
    max_blocks = runner.decode_graphs.inputs.max_blocks
    assert not graph_decode(_scheduled(engine, 18, 1, blocks=max_blocks + 1))
    adapted = _scheduled(engine, 18, 1, adapter_key="a0@1")
    assert graph_decode(adapted, lora_slots={"a0@1": 0})
    runner.decode_graphs.steps = {k: v for k, v in runner.decode_graphs.steps.items() if not k[1]}
    assert not graph_decode(adapted, lora_slots={"a0@1": 0})  # no LoRA variant: eager
    assert graph_decode(decode)


@pytest.mark.parametrize("with_lora", [False, True])
def test_the_captured_body_never_reads_device_values_on_the_host(make_engine, with_lora):
    """What a CUDA graph cannot hold is a host read of device data (``.item()``, ``bool(t)``,
    boolean masks, data-dependent shapes): it would be baked in at capture, or fail it. Under
    ``FakeTensorMode`` every such read raises, so the step body (the model's forward, the torch
    attention and LoRA functions) running through proves it has none. The control proves the
    check bites."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    graphs = make_engine(cuda_graphs="on", cuda_graph_max_batch=4).runner.decode_graphs
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = graphs._forward_fn(4, with_lora)()
    assert logits.shape == (4, 49152)
    with pytest.raises(DataDependentOutputException), FakeTensorMode(allow_non_fake_inputs=True):
        int(graphs.inputs.rows[:4, 0].sum())


@pytest.mark.parametrize("error", [RuntimeError("operation not permitted when stream is capturing"),
                                   ValueError("need H % H_kv == 0 and contiguous head dims")])
def test_a_step_that_cannot_be_built_leaves_decode_eager(make_engine, caplog, error):
    """A forward that fails while the steps are built (capture-unsafe op, out of memory, a
    refused shape) logs why and leaves the engine on packed decode steps, not failing start-up."""
    engine = make_engine()
    calls = []

    class Broken(torch.nn.Module):
        config = engine.loaded.model.config

        def forward(self, **kwargs):
            calls.append(kwargs)
            raise error

    with caplog.at_level(logging.WARNING):
        graphs = build_decode_graphs("eager", Broken(), engine.runner.kv_caches, engine.lora, max_batch=2,
                                     max_blocks=4, block_size=8, trash_block=0, device=CPU)
    assert graphs is None and calls
    assert "decode graph capture (without LoRA) failed" in caplog.text and str(error) in caplog.text


def test_a_failing_lora_variant_keeps_the_base_graphs(make_engine, caplog):
    engine = make_engine()
    model = engine.loaded.model
    real_forward = model.forward

    def forward(**kwargs):
        if engine.lora.state.mapping is not None:
            raise RuntimeError("captured LoRA launch failed")
        return real_forward(**kwargs)
    model.forward = forward
    with caplog.at_level(logging.WARNING):
        graphs = build_decode_graphs("eager", model, engine.runner.kv_caches, engine.lora, max_batch=2,
                                     max_blocks=4, block_size=8, trash_block=0, device=CPU)
    assert sorted(graphs.steps) == [(1, False), (2, False)]
    assert graphs.serves(2, False) and not graphs.serves(2, True) and not graphs.serves(3, False)
    assert "(with LoRA) failed" in caplog.text and "captured LoRA launch failed" in caplog.text


def test_dynamic_rope_models_decode_eagerly(make_engine, caplog):
    engine = make_engine()
    config = engine.loaded.model.config
    original = config.rope_parameters
    config.rope_parameters = {**original, "rope_type": "dynamic", "factor": 2.0}
    try:
        with caplog.at_level(logging.WARNING):
            graphs = build_decode_graphs("eager", engine.loaded.model, engine.runner.kv_caches, engine.lora,
                                         max_batch=2, max_blocks=4, block_size=8, trash_block=0, device=CPU)
    finally:
        config.rope_parameters = original
    assert graphs is None and "dynamic RoPE" in caplog.text


def test_request_count_matches(make_engine):
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=4)
    outs = generate_mixed(engine)
    assert sorted(outs) == [f"r{j}" for j in range(len(MIXED_REQUESTS))]
    assert all(sum(len(o.token_ids) for o in deltas) == 6 for deltas in outs.values())

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
from loraplex_server.engine.decode_graphs import DecodeGraphs, build_decode_graphs, capture_sizes, graph_mode
from loraplex_server.engine.decode_inputs import COLUMNS, CONTEXT, LORA_SLOT, NEW_SLOT, DecodeRow, StaticDecodeInputs
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


@pytest.mark.parametrize("setting,device,mode", [
    ("auto", "cpu", None), ("off", "cpu", None), ("on", "cpu", "eager"),
    ("auto", "cuda", "cuda"), ("on", "cuda", "cuda"), ("off", "cuda", None),
])
def test_graph_mode_per_setting_and_device(setting, device, mode):
    assert graph_mode(setting, torch.device(device)) == mode


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
    rows = inputs.rows
    assert rows[0].tolist() == [5, 10, 7 * 8 + 2, 11, 1, 3, 7, 0]
    assert rows[1].tolist()[:COLUMNS + 1] == [6, 0, 2 * 8, 1, -1, 2]
    assert rows[2].tolist() == [7, 16, 8 * 8, 17, 0, 1, 4, 8]
    assert rows[3].tolist() == [0, 0, 9 * 8, 1, -1, 9, 0, 0]  # padding: the trash slot, no adapter
    inputs.write([DecodeRow(1, 3, [5], 2)], 2)  # a smaller step re-pads the rows it uses
    assert rows[1, [NEW_SLOT, CONTEXT, LORA_SLOT, COLUMNS]].tolist() == [72, 1, -1, 9]
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


def test_decodes_past_the_largest_size_run_packed(make_engine):
    """Four decoding sequences, graphs up to 2: every step runs the packed path, same result."""
    expected = generate_mixed(make_engine())
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=2)
    runs = count_graph_runs(engine)
    assert_same_generation(generate_mixed(engine), expected)
    assert all(n <= 2 for n, _ in runs)


def _scheduled(engine, computed: int, new: int, samples: bool = True, blocks: int = 1) -> ScheduledRequest:
    request = Request("r", list(range(1, 20)), SamplingParams(max_new_tokens=4))
    request.num_computed_tokens = computed
    request.block_ids = list(range(blocks))
    return ScheduledRequest(request, new, samples)


def test_runner_sends_only_pure_decode_steps_to_the_graphs(make_engine):
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=2)
    runner = engine.runner
    decode = _scheduled(engine, 18, 1)
    assert runner.is_graph_decode(SchedulerOutput([decode]))
    assert runner.is_graph_decode(SchedulerOutput([decode, _scheduled(engine, 5, 1)]))
    assert not runner.is_graph_decode(SchedulerOutput([]))
    assert not runner.is_graph_decode(SchedulerOutput([decode] * 3))  # past the largest size
    assert not runner.is_graph_decode(SchedulerOutput([decode, _scheduled(engine, 0, 1)]))  # a 1-token prompt
    assert not runner.is_graph_decode(SchedulerOutput([decode, _scheduled(engine, 4, 6)]))  # a prefill chunk
    assert not runner.is_graph_decode(SchedulerOutput([_scheduled(engine, 4, 1, samples=False)]))
    max_blocks = runner.decode_graphs.inputs.max_blocks
    assert not runner.is_graph_decode(SchedulerOutput([_scheduled(engine, 18, 1, blocks=max_blocks + 1)]))


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


def test_a_step_that_cannot_be_built_leaves_decode_eager(make_engine, caplog):
    """A forward that fails while the steps are built (capture-unsafe op, out of memory) logs why
    and leaves the engine on packed decode steps instead of failing start-up."""
    engine = make_engine()
    calls = []

    class Broken(torch.nn.Module):
        def forward(self, **kwargs):
            calls.append(kwargs)
            raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING):
        graphs = build_decode_graphs("eager", Broken(), engine.runner.kv_caches, engine.lora, max_batch=2,
                                     max_blocks=4, block_size=8, trash_block=0, device=CPU)
    assert graphs is None and calls
    assert "decode graph capture failed" in caplog.text and "stream is capturing" in caplog.text


def test_request_count_matches(make_engine):
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=4)
    outs = generate_mixed(engine)
    assert sorted(outs) == [f"r{j}" for j in range(len(MIXED_REQUESTS))]
    assert all(sum(len(o.token_ids) for o in deltas) == 6 for deltas in outs.values())

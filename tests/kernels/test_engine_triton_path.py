"""End to end through the engine's own wiring: the LoRA apply (``LoraStepState.apply``) and the
attention function the engine registers come from the per-device selection. Made to pick the
Triton kernels, an engine generates exactly what one on the torch functions generates (2-layer
dummy SmolLM2 shape, seeded weights, mixed adapters and base rows, chunked prefill, decodes)."""

import pytest
import torch
from transformers import AttentionInterface

from helpers import assert_same_generation, dummy_engine_factory, generate_mixed
from loraplex_server.engine import engine as engine_module
from loraplex_server.lora import manager as manager_module
from loraplex_server.lora import ops, triton_ops
from loraplex_server.model import attention, triton_attention


@pytest.fixture
def make_engine(tmp_path, device):
    return dummy_engine_factory(tmp_path, device)


def attention_of(engine):
    """The attention function the engine's model dispatches to."""
    return AttentionInterface()[engine.loaded.model.config._attn_implementation]


def force_selection(monkeypatch, lora_apply, attend) -> list[torch.device]:
    """Make the engine's selection return these functions; returns the devices it was asked for."""
    asked: list[torch.device] = []

    def apply_function(device, native=None):
        asked.append(torch.device(device))
        return lora_apply

    def select_attention_function(device):
        asked.append(torch.device(device))
        return attend

    monkeypatch.setattr(manager_module, "apply_function", apply_function)
    monkeypatch.setattr(engine_module, "select_attention_function", select_attention_function)
    return asked


def test_engine_installs_what_the_selection_gives_for_its_device(make_engine, device):
    """Unforced: the torch attention function on CPU with the native LoRA kernel when the native
    kernels build (else the torch apply), the Triton kernels on CUDA."""
    engine = make_engine()
    if device.type == "cuda":
        assert isinstance(engine.lora.state.apply, triton_ops.TritonLoraBackend)
        assert attention_of(engine) is triton_attention.triton_paged_attention
    else:
        native = engine.runner.decode_kernel is not None
        assert isinstance(engine.lora.state.apply, ops.NativeLoraApply) == native
        assert native or engine.lora.state.apply is ops.lora_apply
        assert attention_of(engine) is attention.paged_attention


def test_triton_path_generates_what_the_torch_path_generates(make_engine, device, monkeypatch):
    """Through the engine with the Triton backend itself and the Triton attention, each asked for
    with the engine's device: the generation equals the torch functions', and the projections
    sharing an input share one shrink (per layer one for q/k/v, one for gate/up, one each for o and
    down: 4 shrinks against 7 expands)."""
    force_selection(monkeypatch, ops.lora_apply, attention.paged_attention)
    expected = generate_mixed(make_engine())

    counts = {"shrink": 0, "expand": 0, "attention": 0}
    for name in ("shrink", "expand"):
        launch = getattr(triton_ops, f"lora_{name}")
        monkeypatch.setattr(triton_ops, f"lora_{name}",
                            lambda *a, name=name, launch=launch, **k: (counts.__setitem__(name, counts[name] + 1),
                                                                      launch(*a, **k))[1])

    def counted_attend(*args, **kwargs):
        counts["attention"] += 1
        return triton_attention.triton_paged_attention(*args, **kwargs)

    backend = triton_ops.TritonLoraBackend()
    asked = force_selection(monkeypatch, backend, counted_attend)
    engine = make_engine()
    assert [d.type for d in asked] == [device.type] * 2  # attention, then LoRA: each asked with the engine's device
    assert engine.lora.state.apply is backend and attention_of(engine) is counted_attend
    assert_same_generation(generate_mixed(engine), expected)
    assert counts["attention"] > 0 and counts["expand"] > 0
    assert counts["shrink"] * 7 == counts["expand"] * 4


def test_captured_decode_steps_generate_what_packed_steps_generate(make_engine, device, monkeypatch):
    """``cuda_graphs=on`` with the Triton kernels generates what the torch functions generate
    without graphs: real CUDA graph captures and replays on a GPU, the same static padded step
    run eagerly under the interpreter. The adapters are added after
    the steps were built, so the LoRA graphs read weight buffers, ranks and offsets (``SlotTable.table``)
    written after capture; three sequences replay the size-4 step (one padding row)."""
    requests = [("a0", 13), (None, 5), ("a1", 9)]
    force_selection(monkeypatch, ops.lora_apply, attention.paged_attention)
    expected = generate_mixed(make_engine(), requests)
    force_selection(monkeypatch, triton_ops.TritonLoraBackend(), triton_attention.triton_paged_attention)
    engine = make_engine(cuda_graphs="on", cuda_graph_max_batch=4)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.mode == ("cuda" if device.type == "cuda" else "eager")
    runs = []
    run = graphs.run
    graphs.run = lambda batch: (runs.append(len(batch)), run(batch))[1]
    assert_same_generation(generate_mixed(engine, requests), expected)
    assert 3 in runs


def test_prefix_cache_hits_on_the_triton_path_generate_what_a_cold_cache_generates(make_engine, device, monkeypatch):
    """The same mixed requests twice through one engine on the Triton kernels: the second time their
    full prompt blocks come from the prefix cache (the varlen kernel reads them through the block
    tables like an earlier prefill chunk), and the outputs equal the first, cold, run's."""
    requests = [("a0", 13), ("a1", 20)]
    force_selection(monkeypatch, triton_ops.TritonLoraBackend(), triton_attention.triton_paged_attention)
    engine = make_engine()
    cold = generate_mixed(engine, requests, max_new_tokens=2)
    assert engine.blocks.hit_tokens == 0
    warm = generate_mixed(engine, requests, max_new_tokens=2)
    assert engine.blocks.hit_tokens == 8 + 16  # a0's 13-token prompt: 1 block of 8; a1's 20 tokens: 2
    assert_same_generation(warm, cold, atol=1e-5)

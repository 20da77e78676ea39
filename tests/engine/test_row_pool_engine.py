"""The LoRA row pool and the unified memory pool (adapter pages beside KV blocks) in the engine,
against PEFT (fp32, CPU).

64 adapters of ranks 1..64 run in ONE step with ``max_loras=64`` over a pool of exactly their summed
ranks (2,080 rows, not 64 * 64), or paged in the KV cache: every row's first-step logits are within
1e-4 of PEFT's for its adapter alone and its greedy tokens equal PEFT's. Under row (or page)
pressure, eviction never takes a running request's adapter or a pinned one. The model is SmolLM2-135M cut to its first two layers (real
weights, so greedy choices are not near-ties; PEFT stays fast for 64 adapters).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers import engine_config, load_fresh, make_peft_adapter, run_to_completion, tokens_of
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.model.loader import LoadedModel

NUM_ADAPTERS = 64
RANKS = list(range(1, NUM_ADAPTERS + 1))
POOL_ROWS = sum(RANKS)  # 2080
NEW_TOKENS = 8
LOGITS_ATOL = 1e-4
TARGETS = [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["q_proj", "v_proj"],
           ["gate_proj", "up_proj", "down_proj"], ["k_proj", "o_proj"]]
WORDS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
         "Here is a recipe for pancakes. First,", "Write a poem about the sea:"]


def name(i: int) -> str:
    return f"r{RANKS[i]}"


def prompt(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} ({i})"


@pytest.fixture(scope="module")
def two_layer_model(model_dir) -> torch.nn.Module:
    full = load_fresh(model_dir)
    config = copy.deepcopy(full.config)
    config.num_hidden_layers = 2
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:2]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = model.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pool_adapters(two_layer_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool_adapters")
    return {name(i): make_peft_adapter(copy.deepcopy(two_layer_model), root / name(i), rank, 2 * rank,
                                       TARGETS[i % len(TARGETS)], seed=100 + i)
            for i, rank in enumerate(RANKS)}


@pytest.fixture(scope="module")
def peft_reference(two_layer_model, pool_adapters, tokenizer):
    """Per adapter i (on prompt i): PEFT's greedy tokens, last-position logits, the base's logits."""
    names = list(pool_adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(two_layer_model), str(pool_adapters[names[0]]),
                                      adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(pool_adapters[n]), adapter_name=n)
    model.eval()
    out = []
    for i, n in enumerate(names):
        ids = torch.tensor([tokenizer.encode(prompt(i))])
        with torch.no_grad():
            model.set_adapter(n)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            logits = model(input_ids=ids).logits[0, -1]
            with model.disable_adapter():
                base = model(input_ids=ids).logits[0, -1]
        out.append((gen[0, ids.shape[1]:].tolist(), logits, base))
    return out


def pool_engine(two_layer_model, tokenizer, pool_adapters, **config) -> LLMEngine:
    loaded = LoadedModel(copy.deepcopy(two_layer_model), tokenizer, "two-layer", torch.device("cpu"), torch.float32)
    config.setdefault("max_cpu_loras", NUM_ADAPTERS)  # every adapter's weights stay in memory: all ready at once
    engine = LLMEngine(engine_config(**config), loaded=loaded)
    for n, path in pool_adapters.items():
        engine.lora.add_adapter(n, path)
    return engine


def submit(engine, rows) -> None:
    for i in rows:
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS)
        engine.add_request(engine.make_request(Prompt(text=prompt(i)), sampling, adapter_id=name(i),
                                               request_id=f"row{i}"))


def run_rows_to_peft_tokens(engine, rows, peft_reference) -> None:
    """Submit ``rows`` and run them to the end: each finishes without error, with PEFT's greedy tokens."""
    submit(engine, rows)
    outputs = run_to_completion(engine)
    assert set(outputs) == {f"row{i}" for i in rows}
    for i in rows:
        assert outputs[f"row{i}"][-1].finish_reason is not None and outputs[f"row{i}"][-1].error is None
        assert tokens_of(outputs[f"row{i}"]) == peft_reference[i][0], f"row {i} (rank {RANKS[i]}) diverged"


ONE_STEP = dict(max_loras=NUM_ADAPTERS, max_rank=64, pool_rows=POOL_ROWS, max_tokens=2048, max_seqs=NUM_ADAPTERS)
# the unified pool: 2,400 pages of 16-token KV blocks (3,072 floats of K and of V per layer) hold the
# 64 adapters (2,150-odd pages at their true ranks) and the 64 requests' KV blocks; no slot cap
UNIFIED_ONE_STEP = dict(max_loras=0, max_rank=64, max_tokens=2048, max_seqs=NUM_ADAPTERS,
                        num_blocks=2400, memory_pool="unified")


def assert_step_logits_match_peft(engine, batch, slots, peft_reference) -> None:
    """One forward of the scheduled step: every row's last logits within LOGITS_ATOL of PEFT's for
    its adapter alone (and the adapter visibly moves them off the base model's)."""
    packed = engine.runner.pack(batch, slots)
    logits = engine.runner.forward_logits(packed)
    for row, req in enumerate(packed.sampling_requests):
        i = int(req.request_id[3:])
        diff = (logits[row] - peft_reference[i][1]).abs().max().item()
        assert diff < LOGITS_ATOL, f"row {i} (rank {RANKS[i]}): max |diff| {diff}"
        moved = (peft_reference[i][1] - peft_reference[i][2]).abs().max().item()
        assert moved > 10 * LOGITS_ATOL, f"row {i}: the adapter barely moves the logits ({moved})"


def test_64_adapters_of_ranks_1_to_64_in_one_step_match_peft_logits(two_layer_model, tokenizer, pool_adapters,
                                                                     peft_reference):
    engine = pool_engine(two_layer_model, tokenizer, pool_adapters, **ONE_STEP)
    layer = next(iter(engine.lora.layers.values()))
    assert layer.pool_rows == POOL_ROWS < NUM_ADAPTERS * 64  # rows, not max_loras * max_rank
    assert layer.lora_a.numel() == POOL_ROWS * layer.in_features
    submit(engine, range(NUM_ADAPTERS))
    batch = engine.scheduler.schedule()
    assert len(batch.scheduled) == NUM_ADAPTERS and len(batch.adapter_keys) == NUM_ADAPTERS
    slots = engine.lora.activate(batch.adapter_keys, engine.scheduler.running_adapter_keys())
    assert engine.lora.slots.rows.free_rows == 0 and engine.lora.slots.num_evictions == 0  # every row in use
    assert_step_logits_match_peft(engine, batch, slots, peft_reference)


def test_64_adapters_paged_with_the_kv_cache_in_one_step_match_peft_logits(two_layer_model, tokenizer,
                                                                           pool_adapters, peft_reference):
    """The unified pool: every adapter's weights live in pages of the KV cache tensors themselves,
    beside the step's KV blocks, and every row's logits are PEFT's."""
    engine = pool_engine(two_layer_model, tokenizer, pool_adapters, **UNIFIED_ONE_STEP)
    pool = engine.lora.shared.pool
    assert engine.lora.slots.max_loras == engine.scheduler.max_loras == 2400  # max_loras 0: a slot per page
    for key, layer in engine.lora.layers.items():  # A in the layer's K cache, Bt in its V cache
        k_cache, v_cache = engine.runner.kv_caches[key.layer]
        assert layer.lora_a.data_ptr() == k_cache.data_ptr() and layer.lora_bt.data_ptr() == v_cache.data_ptr()
    submit(engine, range(NUM_ADAPTERS))
    batch = engine.scheduler.schedule()
    assert len(batch.scheduled) == NUM_ADAPTERS and len(batch.adapter_keys) == NUM_ADAPTERS
    slots = engine.lora.activate(batch.adapter_keys, engine.scheduler.running_adapter_keys())
    assert engine.lora.slots.num_evictions == 0
    kv_pages = sum(len(s.request.block_ids) for s in batch.scheduled)
    assert pool.kv_pages == kv_pages and pool.adapter_pages == engine.lora.slots.used_rows
    assert pool.free_pages == pool.num_pages - kv_pages - pool.adapter_pages
    pages_of = {k: engine.lora.slots.rows_of(k)[1] for k in batch.adapter_keys}
    assert max(pages_of.values()) > 5 * min(pages_of.values())  # each at its own rank, not max_rank
    assert_step_logits_match_peft(engine, batch, slots, peft_reference)


@pytest.mark.parametrize("layout", [ONE_STEP, UNIFIED_ONE_STEP], ids=["row_pool", "unified"])
def test_64_adapters_of_ranks_1_to_64_greedy_equal_peft_alone(two_layer_model, tokenizer, pool_adapters,
                                                              peft_reference, layout):
    engine = pool_engine(two_layer_model, tokenizer, pool_adapters, **layout)
    submit(engine, range(NUM_ADAPTERS))
    outputs = run_to_completion(engine)
    for i in range(NUM_ADAPTERS):
        assert tokens_of(outputs[f"row{i}"]) == peft_reference[i][0], f"row {i} (rank {RANKS[i]}) diverged from PEFT"
    assert engine.lora.slots.num_evictions == 0


def checked_evictions(engine, monkeypatch, pinned_key=None) -> list:
    """Check each adapter eviction when it happens (never a running request's adapter, never a
    pinned one); returns the list of evicted keys, filled as the engine runs."""
    slots = engine.lora.slots
    evicted = []
    drop = slots._drop

    def checked_drop(key):
        assert key not in engine.scheduler.running_adapter_keys(), f"evicted {key} of a running request"
        assert key not in slots.pinned and key != pinned_key, f"evicted pinned {key}"
        evicted.append(key)
        drop(key)
    monkeypatch.setattr(slots, "_drop", checked_drop)
    return evicted


def test_row_pressure_never_evicts_a_running_or_pinned_adapter(two_layer_model, tokenizer, pool_adapters,
                                                               peft_reference, monkeypatch):
    """A 64-row pool, max rank 32: a pinned rank-16 adapter and requests for ranks 20..32 that cannot
    all be resident at once. Each eviction is checked when it happens; outputs stay exact."""
    rows = [19, 23, 27, 31, 21, 15, 25]  # ranks 20, 24, 28, 32, 22, 16 (the pinned one), 26
    used = {name(i): pool_adapters[name(i)] for i in rows}
    engine = pool_engine(two_layer_model, tokenizer, used, max_loras=8, max_rank=32, pool_rows=64)
    engine.pin_adapter(name(15))  # rank 16, pinned
    pinned_key = engine.lora.resolve(name(15)).key
    slots = engine.lora.slots
    evicted = checked_evictions(engine, monkeypatch, pinned_key)
    run_rows_to_peft_tokens(engine, rows, peft_reference)
    assert evicted and slots.num_evictions == len(evicted)
    assert slots.slot_of(pinned_key) is not None


def test_a_tiny_pool_and_a_tiny_kv_cache_evict_and_preempt_together_without_losing_a_request(
        two_layer_model, tokenizer, pool_adapters, peft_reference, monkeypatch):
    """48 LoRA rows for ranks 12..32 (two or three adapters resident at once) and 7 KV blocks of 4
    tokens for requests of 16-20 tokens (5 blocks each once decoded): adapters are evicted and
    requests preempted (recomputed) in the same run. Every request ends with PEFT's greedy tokens;
    no eviction touches a running request's adapter."""
    rows = [11, 31, 15, 27, 19, 23, 13, 29]  # ranks 12, 32, 16, 28, 20, 24, 14, 30
    used = {name(i): pool_adapters[name(i)] for i in rows}
    engine = pool_engine(two_layer_model, tokenizer, used, max_loras=8, max_rank=32, pool_rows=48,
                         num_blocks=7, block_size=4)
    evicted = checked_evictions(engine, monkeypatch)
    run_rows_to_peft_tokens(engine, rows, peft_reference)
    assert evicted and engine.scheduler.num_preemptions > 0


def test_a_tiny_unified_pool_evicts_adapters_for_kv_and_preempts_without_losing_a_request(
        two_layer_model, tokenizer, pool_adapters, peft_reference, monkeypatch):
    """One pool of 438 pages of 4-token KV blocks (768 floats of K and of V per layer): the pinned
    rank-4 adapter takes the top 6, leaving the 432 that a max_lora_rank of 32 needs, for adapters of
    ranks 12..32 (18-196 pages each) and requests of 16-20 tokens (5-7 blocks): KV blocks take idle
    adapters' pages, adapters take cached KV blocks' pages, requests are preempted (deterministic:
    every adapter is in memory from registration, so nothing depends on load timing). Every request ends with PEFT's greedy tokens; no eviction touches
    a running request's adapter or the pinned one."""
    rows = [12, 28, 16, 24, 20, 11, 31]  # ranks 13, 29, 17, 25, 21 on all 7 modules; 12, 32 on k and o
    used = {name(i): pool_adapters[name(i)] for i in rows + [3]}  # 3: rank 4 on k and o, pinned
    engine = pool_engine(two_layer_model, tokenizer, used, max_loras=8, max_rank=32, num_blocks=438,
                         block_size=4, memory_pool="unified")
    engine.pin_adapter(name(3))  # rank 4: never evicted, by adapters or by KV blocks
    pinned_key = engine.lora.resolve(name(3)).key
    evicted = checked_evictions(engine, monkeypatch, pinned_key)
    pool = engine.lora.shared.pool
    for_kv, reclaimed = [], []  # adapters evicted for KV blocks; cached KV blocks taken for adapters
    evict_idle, reclaim = engine.lora.evict_idle, engine.blocks.reclaim_cached
    monkeypatch.setattr(engine.lora, "evict_idle", lambda busy: for_kv.append(evict_idle(busy)) or for_kv[-1])
    monkeypatch.setattr(engine.blocks, "reclaim_cached", lambda blocks: reclaimed.extend(blocks) or reclaim(blocks))
    placed = []  # the scheduler's fit checks: on this pool they place the adapter, or keep the request waiting
    fits = engine.scheduler.lora_fits
    monkeypatch.setattr(engine.scheduler, "lora_fits", lambda keys: placed.append(fits(keys)) or placed[-1])
    seen = []
    step = engine.step

    def checked_step():
        out = step()
        held = sum(len(r.block_ids) for r in engine.scheduler.running)
        assert pool.kv_pages >= held and pool.adapter_pages == engine.lora.slots.used_rows
        assert pool.free_pages + pool.kv_pages + pool.adapter_pages == pool.num_pages
        seen.append((pool.kv_pages, pool.adapter_pages))
        return out
    monkeypatch.setattr(engine, "step", checked_step)
    run_rows_to_peft_tokens(engine, rows, peft_reference)
    assert evicted and any(for_kv) and reclaimed and engine.scheduler.num_preemptions > 0
    assert True in placed and False in placed  # some placements waited for pages, and then ran
    assert engine.lora.slots.slot_of(pinned_key) is not None
    assert max(kv + adapters for kv, adapters in seen) > 0.9 * pool.num_pages  # the pool really was full


def test_a_rank_above_the_pool_is_refused_at_registration(two_layer_model, tokenizer, pool_adapters):
    """As a rank above max_lora_rank is: a clear error when the adapter is added, never a queue
    that waits for rows that cannot exist."""
    from loraplex_server.errors import AdapterLoadError

    engine = pool_engine(two_layer_model, tokenizer, {}, max_loras=4, max_rank=64, pool_rows=16)
    engine.lora.add_adapter("r16", pool_adapters[name(15)])
    with pytest.raises(AdapterLoadError, match="rank 17 exceeds max_lora_rank 16"):
        engine.lora.add_adapter("r17", pool_adapters[name(16)])


def test_the_unified_pool_refuses_settings_it_cannot_serve(two_layer_model, tokenizer, pool_adapters):
    """An adapter of max_lora_rank must fit in half the pool; the weights must be in the KV cache's
    dtype (a bf16 model on the torch ops computes LoRA in fp32); pins may hold a quarter of it."""
    from loraplex_server.errors import AdapterPinError

    with pytest.raises(ValueError, match="would hold 108 of the 200 pages"):  # 64 * 5,184 / 3,072 -> 108
        pool_engine(two_layer_model, tokenizer, {}, max_rank=64, num_blocks=200, memory_pool="unified")
    bf16 = LoadedModel(copy.deepcopy(two_layer_model).to(torch.bfloat16), tokenizer, "two-layer",
                       torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="computes in torch.float32"):
        LLMEngine(engine_config(max_rank=16, num_blocks=400, cpu_kernels="off", memory_pool="unified"), loaded=bf16)
    used = {name(i): pool_adapters[name(i)] for i in (28, 3)}  # rank 29 on all 7 modules; rank 4
    engine = pool_engine(two_layer_model, tokenizer, used, max_loras=4, max_rank=32, num_blocks=432,
                         block_size=4, memory_pool="unified")
    with pytest.raises(AdapterPinError, match="more than the quarter"):  # 196 of 432 pages
        engine.pin_adapter(name(28))
    engine.pin_adapter(name(3))
    assert engine.lora.slots.slot_of(engine.lora.resolve(name(3)).key) is not None

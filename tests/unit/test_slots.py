import pytest
import torch
from torch import nn

from loraplex_server.lora.layers import LoraLinear, LoraStepState
from loraplex_server.lora.mapping import LoraMapping
from loraplex_server.lora.slots import SlotManager, SlotsExhaustedError
from loraplex_server.lora.weights import LoraAdapter, LoraModuleWeights, ModuleKey

KEYS = [ModuleKey(0, "q_proj"), ModuleKey(0, "v_proj")]


def layers(max_loras=2, rank=8):
    state = LoraStepState()
    return {k: LoraLinear(nn.Linear(16, 16), k, max_loras, rank, state) for k in KEYS}, state


def adapter(name, rank=4, keys=KEYS, value=1.0):
    mods = {k: LoraModuleWeights(torch.full((rank, 16), value), torch.full((16, rank), value), 0.5) for k in keys}
    return LoraAdapter(name, source=None, modules=mods, lora_alpha=rank * 0.5)


def manager(max_loras=2):
    ls, state = layers(max_loras)
    adapters = {n: adapter(n, value=i + 1.0, keys=KEYS[:1] if n == "q-only" else KEYS)
                for i, n in enumerate(["a", "b", "c", "q-only"])}
    fetched = []

    def fetch(name):
        fetched.append(name)
        return adapters[name]
    return SlotManager(ls, max_loras), ls, state, fetch, fetched


def test_activate_loads_once_and_reuses():
    sm, ls, _, fetch, fetched = manager()
    assert sm.activate({"a"}, fetch) == {"a": 0}
    assert sm.activate({"a"}, fetch) == {"a": 0}
    assert fetched == ["a"] and sm.num_loads == 1
    q = ls[KEYS[0]]
    assert q.slot_ranks == [4, 0]
    torch.testing.assert_close(q.lora_bt[0, :4], torch.full((4, 16), 0.5))  # scale folded into B
    assert q.lora_a[0, 4:].abs().sum() == 0  # rank padding stays zero


def test_lru_eviction_skips_protected_and_pinned():
    sm, _, _, fetch, _ = manager()
    sm.activate({"a"}, fetch)
    sm.activate({"b"}, fetch)
    sm.activate({"c"}, fetch, protected={"a"})  # b is LRU among evictable
    assert set(sm.resident) == {"a", "c"} and sm.num_evictions == 1
    sm.pinned.add("c")
    with pytest.raises(SlotsExhaustedError):
        sm.activate({"b"}, fetch, protected={"a"})


def test_unused_module_slot_is_cleared_on_reuse():
    sm, ls, _, fetch, _ = manager(max_loras=1)
    sm.activate({"a"}, fetch)
    sm.activate({"q-only"}, fetch)
    v = ls[KEYS[1]]
    assert v.slot_ranks == [0] and v.lora_a.abs().sum() == 0 and v.lora_bt.abs().sum() == 0


def test_layer_adds_delta_only_for_mapped_rows():
    sm, ls, state, fetch, _ = manager()
    sm.activate({"a"}, fetch)
    layer = ls[KEYS[0]]
    x = torch.randn(1, 3, 16)
    base = layer.base(x)
    state.mapping = LoraMapping.from_runs([(0, 2), (-1, 1)])
    y = layer(x)
    expected = base[0, :2] + (x[0, :2] @ layer.lora_a[0, :4].T) @ layer.lora_bt[0, :4]
    torch.testing.assert_close(y[0, :2], expected)
    assert torch.equal(y[0, 2], base[0, 2])


def test_evict_clears_slot():
    sm, ls, _, fetch, _ = manager()
    sm.activate({"a"}, fetch)
    sm.evict("a")
    assert sm.resident == [] and ls[KEYS[0]].slot_ranks == [0, 0]
    assert sm.activate({"b"}, fetch)["b"] in (0, 1)


def test_placement_keeps_equal_ranks_side_by_side():
    ls, _ = layers(max_loras=6, rank=8)
    ranks = {"r4a": 4, "r8a": 8, "r2a": 2, "r4b": 4, "r8b": 8, "r2b": 2}
    adapters = {n: adapter(n, rank=r) for n, r in ranks.items()}
    sm = SlotManager(ls, 6)
    slots = sm.activate(set(ranks), adapters.__getitem__)
    by_slot = [ranks[a] for a, _ in sorted(slots.items(), key=lambda kv: kv[1])]
    assert by_slot == [2, 2, 4, 4, 8, 8]
    sm.evict("r4a")
    sm.evict("r8b")  # free slots 2 and 5: a rank-8 adapter goes beside the other rank-8 one
    assert sm.activate({"r8b"}, adapters.__getitem__) == {"r8b": 5}

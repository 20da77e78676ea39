import pytest
import torch
from torch import nn

from loraplex_server.lora.layers import LoraLinear, LoraStepState
from loraplex_server.lora.mapping import LoraMapping
from loraplex_server.lora.slots import SlotManager, SlotsExhaustedError
from loraplex_server.lora.weights import LoraAdapter, LoraModuleWeights, ModuleKey

KEYS = [ModuleKey(0, "q_proj"), ModuleKey(0, "v_proj")]


def layers(max_loras=2, rank=8, pool_rows=None):
    state = LoraStepState()
    rows = max_loras * rank if pool_rows is None else pool_rows
    return {k: LoraLinear(nn.Linear(16, 16), k, max_loras, rank, state, rows) for k in KEYS}, state


def adapter(name, rank=4, keys=KEYS, value=1.0):
    mods = {k: LoraModuleWeights.from_peft(torch.full((rank, 16), value), torch.full((16, rank), value), 0.5)
            for k in keys}
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
    assert q.slot_ranks == [4, 0] and q.a_offsets == [0, 0] and q.b_offsets == [0, 0] and sm.rows_of("a") == (0, 4)
    torch.testing.assert_close(q.rows(0, 4)[1], torch.full((4, 16), 0.5))  # scale folded into B
    assert q.lora_a[4 * 16:].abs().sum() == 0  # rows past the adapter's extent are untouched


def test_the_pool_defaults_to_max_loras_times_max_rank_rows():
    ls, _ = layers(max_loras=3, rank=8)
    assert ls[KEYS[0]].lora_a.shape == (24 * 16,) and ls[KEYS[0]].lora_bt.shape == (24 * 16,)
    assert ls[KEYS[0]].pool_rows == 24 and ls[KEYS[0]].row_bytes == 32 * 4


def test_lru_eviction_skips_protected_and_pinned():
    sm, _, _, fetch, _ = manager()
    sm.activate({"a"}, fetch)
    sm.activate({"b"}, fetch)
    sm.activate({"c"}, fetch, protected={"a"})  # b is LRU among evictable
    assert set(sm.resident) == {"a", "c"} and sm.num_evictions == 1
    sm.pinned.add("c")
    with pytest.raises(SlotsExhaustedError):
        sm.activate({"b"}, fetch, protected={"a"})
    assert set(sm.resident) == {"a", "c"} and sm.rows.free_rows == 16 - 8  # nothing leaked


def test_a_module_the_adapter_does_not_touch_reads_rank_zero():
    sm, ls, _, fetch, _ = manager(max_loras=1)
    sm.activate({"a"}, fetch)
    sm.activate({"q-only"}, fetch)
    assert ls[KEYS[1]].slot_ranks == [0] and ls[KEYS[0]].slot_ranks == [4]


def test_layer_adds_delta_only_for_mapped_rows():
    sm, ls, state, fetch, _ = manager()
    sm.activate({"a"}, fetch)
    sm.activate({"b"}, fetch)
    layer = ls[KEYS[0]]
    x = torch.randn(1, 3, 16)
    base = layer.base(x)
    slot, (o, r) = sm.slot_of("b"), sm.rows_of("b")
    state.mapping = LoraMapping.from_runs([(slot, 2), (-1, 1)])
    y = layer(x)
    a_rows, bt_rows = layer.rows(o, r)
    expected = base[0, :2] + (x[0, :2] @ a_rows.T) @ bt_rows
    torch.testing.assert_close(y[0, :2], expected)
    assert torch.equal(y[0, 2], base[0, 2])


def test_evict_clears_slot_and_frees_rows():
    sm, ls, _, fetch, _ = manager()
    sm.activate({"a"}, fetch)
    sm.evict("a")
    assert sm.resident == [] and ls[KEYS[0]].slot_ranks == [0, 0] and sm.rows.free_rows == 16
    assert sm.activate({"b"}, fetch)["b"] in (0, 1)


def test_placement_keeps_equal_ranks_side_by_side():
    ls, _ = layers(max_loras=6, rank=8)
    ranks = {"r4a": 4, "r8a": 8, "r2a": 2, "r4b": 4, "r8b": 8, "r2b": 2}
    adapters = {n: adapter(n, rank=r) for n, r in ranks.items()}
    sm = SlotManager(ls, 6)
    sm.activate(set(ranks), adapters.__getitem__)
    by_row = [ranks[k] for k in sorted(ranks, key=lambda k: sm.rows_of(k)[0])]
    assert by_row == [2, 2, 4, 4, 8, 8]
    sm.evict("r4a")
    sm.evict("r8b")
    sm.activate({"r8b"}, adapters.__getitem__)  # goes back beside the other rank-8 adapter
    assert abs(sm.rows_of("r8b")[0] - sm.rows_of("r8a")[0]) == 8


def row_pressure_manager(max_loras=8, pool_rows=12):
    ls, _ = layers(max_loras=max_loras, rank=8, pool_rows=pool_rows)
    ranks = {"a": 4, "b": 4, "c": 4, "d": 8, "e": 2, "big": 12}
    adapters = {n: adapter(n, rank=r) for n, r in ranks.items()}
    return SlotManager(ls, max_loras), ls, adapters.__getitem__


def test_row_pressure_evicts_least_recently_used_until_the_rank_fits():
    sm, _, fetch = row_pressure_manager()
    for key in ("a", "b", "c"):  # rows 0..11 full; LRU order a, b, c
        sm.activate({key}, fetch)
    sm.activate({"a"}, fetch)  # a used again: b is now least recently used
    sm.activate({"d"}, fetch)  # 8 rows: b then c go (a is more recent than both)
    assert set(sm.resident) == {"a", "d"} and sm.num_evictions == 2


def test_row_pressure_never_evicts_running_or_pinned_adapters():
    sm, _, fetch = row_pressure_manager()
    for key in ("a", "b", "c"):
        sm.activate({key}, fetch)
    sm.pinned.add("a")
    sm.activate({"e"}, fetch, protected={"b"})  # c is the only evictable one
    assert set(sm.resident) == {"a", "b", "e"}
    with pytest.raises(SlotsExhaustedError):  # 8 rows cannot be freed without a, b or e
        sm.activate({"d"}, fetch, protected={"b", "e"})
    assert set(sm.resident) == {"a", "b", "e"}


def test_scattered_free_rows_are_compacted_instead_of_evicting():
    sm, ls, fetch = row_pressure_manager(pool_rows=16)
    for key in ("a", "b", "c"):  # a 0..3, b 4..7, c 8..11
        sm.activate({key}, fetch)
    sm.evict("b")  # free: 4..7 and 12..15, 8 rows but no 8 in one piece
    layer = ls[KEYS[0]]
    c_rows = layer.rows(8, 4)[0].clone()
    sm.activate({"d"}, fetch, protected={"a", "c"})
    assert set(sm.resident) == {"a", "c", "d"} and sm.num_evictions == 0 and sm.num_compactions == 1
    o, r = sm.rows_of("c")
    slot = sm.slot_of("c")
    assert o == 4 and layer.a_offsets[slot] == 4 * 16 and layer.b_offsets[slot] == 4 * 16
    assert torch.equal(layer.rows(o, r)[0], c_rows)


def test_a_rank_beyond_the_pool_is_exhausted_not_a_loop():
    sm, _, fetch = row_pressure_manager(pool_rows=8)
    with pytest.raises(SlotsExhaustedError):
        sm.activate({"big"}, fetch)
    assert sm.resident == [] and not sm.fits([12]) and sm.fits([4, 4]) and not sm.fits([4, 4, 2])

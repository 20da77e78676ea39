from loraplex_server.config import SchedulerConfig
from loraplex_server.engine.kv_blocks import BlockManager
from loraplex_server.engine.request import Request, RequestStatus, SamplingParams
from loraplex_server.engine.scheduler import Scheduler


def make(budget=16, max_seqs=8, num_blocks=64, block_size=4, max_loras=2, bypass=0, **kwargs):
    bm = BlockManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_slot_bypass_steps=bypass)
    return Scheduler(config, bm, max_loras, **kwargs), bm


def req(rid, n_prompt=4, adapter=None):
    return Request(rid, list(range(n_prompt)), SamplingParams(), adapter_id=adapter, adapter_key=adapter)


def step(s, sample_token=7):
    """Schedule, mark computed, and append a token to every request that sampled."""
    out = s.schedule()
    sampled = [x.request for x in out.scheduled if x.samples]
    s.after_step(out)
    for r in sampled:
        r.output_token_ids.append(sample_token)
    return out


def scheduled(out):
    return {x.request.request_id: x.num_new_tokens for x in out.scheduled}


def test_token_budget_chunks_long_prefill():
    s, _ = make(budget=10)
    s.add(req("long", 25))
    assert scheduled(step(s)) == {"long": 10}
    assert scheduled(step(s)) == {"long": 10}
    out = step(s)
    assert scheduled(out) == {"long": 5} and out.scheduled[0].samples
    assert scheduled(step(s)) == {"long": 1}  # now decoding


def test_decodes_first_then_fcfs_admission_in_budget():
    s, _ = make(budget=6)
    s.add(req("a", 4))
    step(s)
    s.add(req("b", 4))
    s.add(req("c", 4))
    out = step(s)
    assert scheduled(out) == {"a": 1, "b": 4, "c": 1}  # c gets the last token of budget (chunked)
    assert not [x for x in out.scheduled if x.request.request_id == "c"][0].samples


def test_running_cap():
    s, _ = make(max_seqs=2)
    for r in "abc":
        s.add(req(r))
    out = step(s)
    assert set(scheduled(out)) == {"a", "b"} and len(s.waiting) == 1


def test_max_loras_cap_is_fcfs_and_does_not_starve():
    s, _ = make(max_loras=2, budget=64)
    s.add(req("x", adapter="A"))
    s.add(req("y", adapter="B"))
    s.add(req("z", adapter="C"))  # third distinct adapter: must wait
    s.add(req("w", adapter="A"))  # behind z: FCFS, must not overtake it
    out = step(s)
    assert set(scheduled(out)) == {"x", "y"}
    assert out.adapter_keys == {"A", "B"}
    s.finish(s.running[1])  # y finishes -> B frees up
    out = step(s)
    assert set(scheduled(out)) == {"x", "z", "w"}


def test_requests_for_batched_adapters_pass_one_kept_out_by_the_cap_for_a_bounded_time():
    s, _ = make(max_loras=2, budget=64, bypass=2)
    s.add(req("x", adapter="A"))
    s.add(req("y", adapter="B"))
    s.add(req("z", adapter="C"))  # third distinct adapter: waits for a slot
    s.add(req("w", adapter="A"))  # A is in the batch: may pass z
    s.add(req("v", adapter="D"))  # a fourth adapter gains nothing from z's wait
    s.add(req("base"))
    assert set(scheduled(step(s))) == {"x", "y", "w", "base"}
    s.add(req("u", adapter="A"))
    assert "u" in scheduled(step(s))  # z has waited 2 steps: still within the bound
    s.add(req("t", adapter="A"))
    assert "t" not in scheduled(step(s))  # bound exceeded: admission stops at z again
    assert [r.request_id for r in s.waiting] == ["z", "v", "t"]
    s.finish(next(r for r in s.running if r.request_id == "y"))  # B frees its slot
    out = step(s)
    assert "z" in scheduled(out) and out.adapter_keys == {"A", "C"}


def test_preempts_latest_when_blocks_run_out_and_requeues_at_head():
    s, bm = make(num_blocks=3, block_size=4, budget=64)
    s.add(req("old", 4))
    s.add(req("new", 4))
    step(s)  # each holds one full block (4 tokens) and sampled one token
    s.add(req("later", 2))
    out = step(s)  # old needs block 2 (ok, 1 free); new then needs one: preempted (latest)
    assert [r.request_id for r in out.preempted] == ["new"]
    assert scheduled(out) == {"old": 1}
    preempted = s.waiting[0]
    assert preempted.request_id == "new" and preempted.status is RequestStatus.WAITING
    assert preempted.num_computed_tokens == 0 and preempted.block_ids == []
    assert preempted.output_token_ids == [7]  # recompute keeps generated tokens
    assert s.num_preemptions == 1


def test_a_lone_request_is_never_preempted_into_a_livelock():
    s, bm = make(num_blocks=2, block_size=4, budget=64)
    s.add(req("solo", 7))
    out = step(s)
    assert scheduled(out) == {"solo": 7}
    assert bm.num_free_blocks == 0


def test_finish_frees_blocks_everywhere():
    s, bm = make()
    s.add(req("a"))
    s.add(req("b"))
    step(s)
    a = s.running[0]
    s.finish(a)
    assert a.status is RequestStatus.FINISHED and a.block_ids == []
    s.add(req("c"))
    s.finish(s.waiting[0])
    assert not s.waiting and len(s.running) == 1


def test_requests_for_a_loading_adapter_wait_while_others_pass():
    loading = {"L"}
    s, _ = make(max_loras=3, budget=64, key_ready=lambda key: key not in loading)
    s.add(req("slow", adapter="L"))
    s.add(req("fast", adapter="A"))
    s.add(req("base"))
    out = step(s)
    assert set(scheduled(out)) == {"fast", "base"}
    assert [r.request_id for r in s.waiting] == ["slow"]  # keeps its place
    loading.clear()
    assert set(scheduled(step(s))) == {"fast", "base", "slow"}


def test_pinned_adapters_count_against_the_cap():
    s, _ = make(max_loras=2, budget=64, reserved_keys=lambda: {"P"})
    s.add(req("a", adapter="A"))
    s.add(req("b", adapter="B"))
    s.add(req("p", adapter="P"))
    out = step(s)
    assert set(scheduled(out)) == {"a"}  # A + pinned P fill both slots; B waits (FCFS: p waits too)


RANKS = {"A": 8, "B": 16, "C": 8, "P": 4}


def rows_fit(pool_rows):
    """A ``lora_fits`` callback for a pool of ``pool_rows`` rows and the ranks above."""
    seen: list[set] = []

    def fits(keys):
        seen.append(set(keys))
        return sum(RANKS[k] for k in keys) <= pool_rows
    return fits, seen


def test_pool_rows_cap_admission_like_the_max_loras_cap():
    fits, seen = rows_fit(24)
    s, _ = make(max_loras=8, budget=64, lora_fits=fits)
    s.add(req("a", adapter="A"))
    s.add(req("b", adapter="B"))
    s.add(req("c", adapter="C"))  # 8 + 16 + 8 rows > 24: waits (FCFS: nothing new passes it)
    s.add(req("base"))
    out = step(s)
    assert set(scheduled(out)) == {"a", "b"}
    assert {"A", "B", "C"} in seen  # asked with the batch's adapters plus the new one
    s.finish(next(r for r in s.running if r.request_id == "b"))  # B's 16 rows free up
    assert set(scheduled(step(s))) == {"a", "c", "base"}


def test_requests_for_batched_adapters_pass_one_kept_out_by_rows_for_a_bounded_time():
    fits, _ = rows_fit(24)
    s, _ = make(max_loras=8, budget=64, bypass=1, lora_fits=fits)
    s.add(req("a", adapter="A"))
    s.add(req("b", adapter="B"))
    s.add(req("c", adapter="C"))  # kept out by rows
    s.add(req("a2", adapter="A"))  # A is resident and in the batch: may pass c
    assert set(scheduled(step(s))) == {"a", "b", "a2"}
    s.add(req("a3", adapter="A"))
    assert "a3" not in scheduled(step(s))  # c waited past the bound: admission stops at it


def test_pinned_rows_count_against_the_pool():
    fits, seen = rows_fit(20)
    s, _ = make(max_loras=8, budget=64, reserved_keys=lambda: {"P"}, lora_fits=fits)
    s.add(req("b", adapter="B"))  # 16 + pinned 4 = 20: fits
    s.add(req("a", adapter="A"))  # + 8: does not
    assert set(scheduled(step(s))) == {"b"}
    assert {"P", "B", "A"} in seen


def test_decodes_take_a_block_only_at_a_block_boundary_and_a_one_token_chunk_does_not_sample():
    s, bm = make(budget=16, block_size=4)
    s.add(req("a", 6))  # 6 tokens: two blocks, room for two more in the second
    step(s)
    a = s.running[0]
    blocks_after_prefill = list(a.block_ids)
    for _ in range(2):  # positions 6 and 7 fit the second block
        out = step(s)
        assert scheduled(out) == {"a": 1} and out.scheduled[0].samples and a.block_ids == blocks_after_prefill
    out = step(s)  # position 8 opens a third block
    assert scheduled(out) == {"a": 1} and len(a.block_ids) == 3 and a.block_ids[:2] == blocks_after_prefill

    s, _ = make(budget=1, block_size=4)
    s.add(req("p", 3))  # a prefill chunked one token per step: only the last chunk samples
    outs = [step(s) for _ in range(3)]
    assert [o.scheduled[0].samples for o in outs] == [False, False, True]
    assert all(scheduled(o) == {"p": 1} for o in outs)


def test_fairness_refreshes_only_when_requests_come_or_leave():
    from loraplex_server.engine.fairness import VirtualTokenCounter

    class Spy(VirtualTokenCounter):
        calls = 0

        def refresh(self, waiting, running):
            Spy.calls += 1
            super().refresh(waiting, running)
    vtc = Spy()
    s, _ = make(budget=16, max_seqs=2, fairness=vtc)
    a, b = req("a"), req("b")
    a.tenant, b.tenant = "t1", "t2"
    s.add(a)
    step(s)  # a admitted
    calls = Spy.calls
    step(s)
    step(s)  # decodes of the same request: the same tenants, nothing to lift
    assert Spy.calls == calls == 1
    vtc.counters["t1"] = 100.0
    s.add(b)
    step(s)  # t2 arrives: refreshed, so it is lifted to the active tenants' smallest counter
    assert Spy.calls == calls + 1 and vtc.counters["t2"] == 100.0 + 4  # lifted, then charged its prompt
    s.finish(a)
    step(s)
    assert Spy.calls == calls + 2  # a left

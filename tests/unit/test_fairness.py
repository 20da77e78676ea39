from loraplex_server.config import SchedulerConfig
from loraplex_server.engine.fairness import FcfsOrder, VirtualTokenCounter
from loraplex_server.engine.kv_blocks import BlockManager
from loraplex_server.engine.request import Request, SamplingParams
from loraplex_server.engine.scheduler import Scheduler


def req(rid, tenant, n=4):
    return Request(rid, list(range(n)), SamplingParams(), tenant=tenant)


def test_one_tenant_is_plain_fcfs():
    waiting = [req(f"r{i}", "a") for i in range(5)]
    vtc = VirtualTokenCounter()
    vtc.refresh(waiting, [])
    assert [r.request_id for r in vtc.candidates(waiting)] == [r.request_id for r in waiting]
    assert list(FcfsOrder().candidates(waiting)) == waiting


def test_smallest_counter_first_and_charges_are_weighted():
    vtc = VirtualTokenCounter(weight_of=lambda t: 2.0 if t == "b" else 1.0)
    waiting = [req("a1", "a"), req("a2", "a"), req("b1", "b"), req("b2", "b")]
    vtc.refresh(waiting, [])
    order = []
    for r in vtc.candidates(waiting):
        order.append(r.request_id)
        vtc.charge(r, 4)  # 4 prompt tokens
    assert order == ["a1", "b1", "b2", "a2"]  # b pays half per token (weight 2)
    assert vtc.counters == {"a": 8.0, "b": 4.0}


def test_output_tokens_cost_twice_input_tokens():
    vtc = VirtualTokenCounter()
    r = req("x", "a", n=3)
    vtc.charge(r, 3)
    r.num_computed_tokens = 3
    r.output_token_ids = [1]
    vtc.charge(r, 1)
    assert vtc.counters["a"] == 3 + 2


def test_newly_active_tenant_is_lifted_to_the_minimum():
    vtc = VirtualTokenCounter()
    busy = [req("a1", "a"), req("c1", "c")]
    vtc.refresh(busy, [])
    vtc.counters.update(a=100.0, c=40.0)
    late = req("b1", "b")
    vtc.refresh(busy + [late], [])
    assert vtc.counters["b"] == 40.0  # no credit for having been idle


def test_scheduler_alternates_tenants_under_vtc_but_not_fcfs():
    def admitted(fairness):
        s = Scheduler(SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=3), BlockManager(64, 4), 2,
                      fairness=fairness)
        for i in range(6):
            s.add(req(f"a{i}", "a"))
        s.add(req("b0", "b"))
        return [x.request.request_id for x in s.schedule().scheduled]
    assert admitted(FcfsOrder()) == ["a0", "a1", "a2"]
    assert admitted(VirtualTokenCounter()) == ["a0", "b0", "a1"]


def test_a_step_charges_decodes_and_chunks_as_the_per_request_formula():
    """The scheduler tallies its decodes (one output token each) apart from the other rows (prefill
    chunks, a prompt's last token): every tenant is charged what ``charge_all`` charges row by row."""
    vtc = VirtualTokenCounter(weight_of=lambda t: 2.0 if t == "b" else 1.0)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), BlockManager(64, 4), 2, fairness=vtc)
    requests = [req("a-decode", "a", n=5), req("b-decode", "b", n=3), req("b-chunk", "b", n=20),
                req("a-last-prompt-token", "a", n=6)]
    for r in requests:
        s.add(r)
    s.schedule()  # admits all four (their first chunks charged as prompt tokens)
    for r in requests:
        r.num_computed_tokens = {"a-decode": 5, "b-decode": 3, "b-chunk": 8, "a-last-prompt-token": 5}[r.request_id]
    for r in requests[:2]:
        r.output_token_ids = [7]
    reference = VirtualTokenCounter(weight_of=vtc.weight_of)
    reference.counters = dict(vtc.counters)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [
        ("a-decode", 1), ("b-decode", 1), ("b-chunk", 12), ("a-last-prompt-token", 1)]
    before = dict(reference.counters)
    reference.charge_all((x.request, x.num_new_tokens) for x in out.scheduled)
    assert vtc.counters == reference.counters
    # a: a decode (2) and a prompt token (1); b (weight 2): a decode (2) and 12 prompt tokens, halved
    assert (vtc.counters["a"] - before["a"], vtc.counters["b"] - before["b"]) == (3.0, 7.0)

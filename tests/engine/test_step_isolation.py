"""A failing forward ends only the request that makes it fail (INTERNAL, with its id); the others
continue with identical outputs; N failing steps in a row turn the engine unhealthy."""

from __future__ import annotations

import threading

import pytest

from helpers import run_to_completion, tokens_of
from loraplex_server.engine.fault_isolation import bisect_failures
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.engine.request import FinishReason, Prompt, SamplingParams
from loraplex_server.errors import EngineFailure

PARAMS = SamplingParams(max_new_tokens=5, ignore_eos=True)
JOBS = [("base-req", None), ("good-req", "good"), ("bad-req", "bad"), ("good-2", "good")]


def test_bisection_finds_every_culprit_and_runs_each_item_once_when_it_succeeds():
    runs = []

    def run(group):
        runs.append(tuple(group))
        if 5 in group or 2 in group:
            raise RuntimeError("boom")
        return sum(group)
    items = list(range(8))
    ok, culprits = bisect_failures(items, run)
    assert sorted(c for c, _ in culprits) == [2, 5]
    assert sorted(i for group, _ in ok for i in group) == [0, 1, 3, 4, 6, 7]
    assert all(result == sum(group) for group, result in ok)
    assert len(runs) <= 2 * len(items)


def _inject_fault(engine, fires):
    run = engine.runner.run

    def faulty(batch, lora_slots):
        if fires(batch):
            raise RuntimeError("injected kernel fault")
        return run(batch, lora_slots)
    engine.runner.run = faulty


def _submit_all(engine):
    for rid, adapter in JOBS:
        engine.add_request(engine.make_request(Prompt(token_ids=(21, 22, 23, 24)), PARAMS, adapter, rid))


def test_a_fault_for_one_requests_adapter_ends_only_that_request(make_engine, peft_adapters):
    engine = make_engine()
    engine.lora.add_adapter("good", peft_adapters["qv-r4"])
    engine.lora.add_adapter("bad", peft_adapters["ko-r32"])
    _submit_all(engine)
    expected = {rid: tokens_of(d) for rid, d in run_to_completion(engine).items()}
    _inject_fault(engine, lambda batch: any(s.request.adapter_id == "bad" for s in batch.scheduled))
    _submit_all(engine)
    outputs = run_to_completion(engine)  # before: the step raised for everyone
    bad = outputs["bad-req"][-1]
    assert bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, EngineFailure)
    assert "bad-req" in str(bad.error) and "injected kernel fault" in str(bad.error)
    for rid in ("base-req", "good-req", "good-2"):
        assert outputs[rid][-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(outputs[rid]) == expected[rid], rid
    assert engine.failed_steps_in_a_row == 0  # the later steps were clean
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_consecutive_failing_steps_turn_the_loop_unhealthy(make_engine):
    engine = make_engine(max_failed_steps=2)
    _inject_fault(engine, lambda batch: True)  # the device is broken for everyone
    reasons, told = [], threading.Event()

    def unhealthy(reason):
        reasons.append(reason)
        told.set()
    with EngineLoop(engine, on_unhealthy=unhealthy) as loop:
        streams = [loop.submit(Prompt(token_ids=(5, 6)), PARAMS) for _ in range(2)]
        finals = [list(s)[-1] for s in streams]  # every stream ends
        assert all(f.finish_reason is FinishReason.ERROR and isinstance(f.error, EngineFailure) for f in finals)
        if engine.failed_steps_in_a_row < 2:
            loop.submit(Prompt(token_ids=(7,)), PARAMS).result()
        assert told.wait(30)
    assert len(reasons) == 1 and "2 engine steps failed in a row" in reasons[0]
    assert not loop.healthy

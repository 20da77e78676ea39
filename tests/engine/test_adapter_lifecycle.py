"""Adapter lifecycle at scale: many adapters over few slots, hot-swap under load, slow/failing loads."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from helpers import ASSETS, BENCHMARKS, run_to_completion, tokens_of
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.engine.request import ChatMessage, FinishReason, Prompt, SamplingParams
from loraplex_server.errors import AdapterUnavailableError
from loraplex_server.lora.loader import load_adapter

sys.path.insert(0, str(BENCHMARKS))
from synthetic_adapters import write_adapter  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def many_adapters(tmp_path_factory, model_dir):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(model_dir))
    root = tmp_path_factory.mktemp("many")
    return [write_adapter(root / f"ad{i:03d}", config, rank=2 + i % 3, targets=("q_proj", "v_proj"), seed=i,
                          b_scale=0.5) for i in range(200)]


@pytest.mark.slow
def test_200_adapters_over_4_slots_equal_each_adapter_alone(make_engine, many_adapters):
    engine = make_engine(max_loras=4, max_cpu_loras=16, max_rank=8)
    for i, path in enumerate(many_adapters):
        engine.lora.add_adapter(f"ad{i:03d}", path, eager=False)  # registration only: header check
    assert engine.lora.registry.num_in_cpu_cache == 0
    rng = random.Random(7)
    jobs = [(f"job{j}", rng.choice([None] + [f"ad{i:03d}" for i in range(200)]), rng.randint(3, 12))
            for j in range(40)]
    for rid, adapter, n in jobs:
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(range(300 + n, 300 + 2 * n))),
                                               SamplingParams(max_new_tokens=NEW, ignore_eos=True), adapter, rid))
    mixed = run_to_completion(engine)
    registry, slots = engine.lora.registry, engine.lora.slots
    assert registry.num_cpu_loads > 16 and registry.num_cpu_evictions > 0 and slots.num_evictions > 0

    alone = make_engine(max_loras=1, max_cpu_loras=1, max_rank=8)
    for rid, adapter, n in jobs:
        if adapter:
            alone.lora.add_adapter(adapter, many_adapters[int(adapter[2:])])
        alone.add_request(alone.make_request(Prompt(token_ids=tuple(range(300 + n, 300 + 2 * n))),
                                             SamplingParams(max_new_tokens=NEW, ignore_eos=True), adapter, rid))
        expected = tokens_of(run_to_completion(alone)[rid])
        assert tokens_of(mixed[rid]) == expected, (rid, adapter)
    distinct = {tuple(tokens_of(mixed[rid])) for rid, _, n in jobs if n == jobs[0][2]}
    assert len(distinct) > 1  # the adapters really change outputs


def test_a_long_queue_of_cold_adapters_loads_each_once_within_the_prefetch_window(make_engine, many_adapters):
    loads = []

    def counting_load(adapter_id, *args):
        loads.append(adapter_id)
        return load_adapter(adapter_id, *args)
    engine = make_engine(adapter_load_fn=counting_load, max_loras=2, max_cpu_loras=4, max_rank=8)
    names = [f"ad{i:03d}" for i in range(30)]
    for name in names:
        engine.lora.add_adapter(name, many_adapters[int(name[2:])], eager=False)
    for name in names:  # every request on its own cold adapter, all queued at once
        engine.add_request(engine.make_request(Prompt(token_ids=(5, 6, 7)), SamplingParams(max_new_tokens=2,
                                                                                              ignore_eos=True), name))
    first = engine.step()
    assert len(loads) <= 2  # the prefetch window (half the CPU cache), however long the queue
    outputs = run_to_completion(engine)
    for out in first:
        outputs.setdefault(out.request_id, []).insert(0, out)
    assert len(outputs) == 30 and all(len(tokens_of(deltas)) == 2 for deltas in outputs.values())
    assert sorted(loads) == names  # each adapter read from disk exactly once: no CPU-cache thrash


def chat(q):
    return Prompt(messages=(ChatMessage("user", q),))


@pytest.mark.parametrize("memory_pool", ["separate", "unified"])
def test_hot_swap_under_load_never_mixes_versions(make_engine, memory_pool):
    engine = make_engine(max_loras=2, max_rank=16, num_blocks=512, memory_pool=memory_pool)
    versions = [ASSETS / "adapters" / "upper", ASSETS / "adapters" / "json"]
    params = SamplingParams(max_new_tokens=12)
    prompt = chat("What is the capital of Italy?")
    expected = set()
    for i, path in enumerate(versions):
        engine.lora.add_adapter(f"ref{i}", path)
    with EngineLoop(engine) as loop:
        for i in range(2):
            expected.add(loop.generate(prompt, params, f"ref{i}").token_ids)
        assert len(expected) == 2
        loop.add_adapter("hot", versions[0])
        stop, results, failures = threading.Event(), [], []
        epoch, served = [0], threading.Condition()  # swaps done; notified at each finished request

        def client():
            while not stop.is_set():
                started_in = epoch[0]  # a request made now gets this swap's version or a later one
                try:
                    deltas = list(loop.submit(prompt, params, "hot"))
                    assert deltas[-1].finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
                    with served:
                        results.append((started_in, tuple(t for d in deltas for t in d.token_ids)))
                except Exception as exc:  # noqa: BLE001 - counted, must stay zero
                    failures.append(exc)
                with served:
                    served.notify_all()
        workers = [threading.Thread(target=client) for _ in range(4)]
        for w in workers:
            w.start()
        for swap in range(1, 5):  # no clock: each version serves a request made under it before the next swap
            loop.add_adapter("hot", versions[swap % 2])
            epoch[0] = swap
            with served:
                assert served.wait_for(lambda: failures or any(e == swap for e, _ in results), timeout=120)
        stop.set()
        for w in workers:
            w.join(60)
    assert failures == []
    outputs = {tokens for _, tokens in results}
    assert len(results) >= 4 and outputs <= expected
    assert outputs == expected  # both versions really served
    assert engine.lora.registry.current("hot").version > 4
    if memory_pool == "unified":  # retired versions gave their pages back: at most the 2 slots' worth held
        pool = engine.lora.shared.pool
        largest = max(engine.lora.rank_of(engine.lora.resolve(ref).key) for ref in ("ref0", "ref1"))
        assert pool.adapter_pages == engine.lora.slots.used_rows <= 2 * largest


def test_slow_load_does_not_stall_others_and_failed_load_is_a_clear_error(make_engine):
    gate, slow_load_returned = threading.Event(), threading.Event()

    def faulty_load(adapter_id, path, *args):
        if adapter_id == "slow":
            gate.wait(30)
            slow_load_returned.set()
        if adapter_id == "broken":
            raise OSError("simulated disk error")
        return load_adapter(adapter_id, path, *args)
    engine = make_engine(adapter_load_fn=faulty_load, max_loras=4, max_rank=16)
    for name, source in [("slow", "upper"), ("broken", "json"), ("fine", "json")]:
        engine.lora.add_adapter(name, ASSETS / "adapters" / source, eager=False)
    with EngineLoop(engine) as loop:
        slow = loop.submit(chat("Hi"), SamplingParams(max_new_tokens=8), "slow")
        broken = loop.submit(chat("Hi"), SamplingParams(max_new_tokens=8), "broken")
        others = [loop.submit(chat("Hello there"), SamplingParams(max_new_tokens=8, ignore_eos=True), a)
                  for a in (None, "fine", None)]
        for s in others:
            assert s.result().completion_tokens == 8
        # everything else ran while the slow load was still held at the gate (had it waited on that
        # load, it could only have finished once the gate timed out and the load returned)
        assert not slow_load_returned.is_set() and not slow.finished
        failure = broken.result()
        assert failure.finish_reason is FinishReason.ERROR and isinstance(failure.error, AdapterUnavailableError)
        assert "simulated disk error" in str(failure.error)
        with pytest.raises(AdapterUnavailableError, match="simulated disk error"):
            loop.submit(chat("again"), SamplingParams(max_new_tokens=2), "broken")
        gate.set()
        assert slow.result().completion_tokens > 0

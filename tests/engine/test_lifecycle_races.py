"""Issue #12 races, each forced deterministically (no sleeps): the interleaving is driven by calling
the engine's pieces in the racy order, or by a hook that runs the other side at the racy moment."""

from __future__ import annotations

import threading

import pytest

from helpers import run_to_completion, tokens_of
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.engine.request import FinishReason, Prompt, SamplingParams
from loraplex_server.errors import AdapterPinError, EngineStoppedError, QueueFullError
from loraplex_server.lora.loader import load_adapter

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
PROMPT = Prompt(token_ids=(11, 12, 13, 14, 15))


def _generate(engine, adapter_id, request_id):
    engine.add_request(engine.make_request(PROMPT, PARAMS, adapter_id, request_id))
    return tokens_of(run_to_completion(engine)[request_id])


def _versions(engine) -> set[str]:
    return set(engine.lora.registry._versions)


# ---- 1. unload / hot-swap while a request for that version is on its way to the engine ----------
@pytest.mark.parametrize("change", ["unload", "hot-swap"])
def test_a_request_made_before_unload_or_swap_keeps_its_version(make_engine, peft_adapters, change):
    engine = make_engine()
    engine.lora.add_adapter("a", peft_adapters["qv-r4"])
    expected = _generate(engine, "a", "first")
    old_key = engine.lora.resolve("a").key
    # make_request ran on a caller thread; the "add" is still in the loop's command queue when the
    # engine thread applies the unload (or the swap's retirement of the old version)
    pending = engine.make_request(PROMPT, PARAMS, "a", "pending")
    if change == "unload":
        engine.remove_adapter("a")
    else:
        engine.lora.add_adapter("a", peft_adapters["ko-r32"])
        engine.adapter_replaced(old_key)
    assert old_key in _versions(engine)  # still referenced by the pending request
    engine.add_request(pending)
    outputs = run_to_completion(engine)
    assert outputs["pending"][-1].finish_reason is FinishReason.LENGTH
    assert tokens_of(outputs["pending"]) == expected  # served by the version it was bound to
    assert old_key not in _versions(engine) and engine.lora.slots.slot_of(old_key) is None  # freed after


def test_a_refused_submit_gives_its_version_reference_back(make_engine, peft_adapters):
    engine = make_engine(max_queued=0)  # every submit is refused after make_request
    engine.lora.add_adapter("a", peft_adapters["qv-r4"])
    key = engine.lora.resolve("a").key
    with EngineLoop(engine) as loop:
        with pytest.raises(QueueFullError):
            loop.submit(PROMPT, PARAMS, "a")
        loop.remove_adapter("a").result(30)
        assert loop.call(lambda e: key in _versions(e)).result(30) is False


# ---- 2. a per-adapter fault ends only that adapter's requests ------------------------------------
def test_weights_evicted_between_schedule_and_activate_are_not_read_on_the_engine_thread(make_engine,
                                                                                        peft_adapters):
    reads = []

    def load_once_then_fail(adapter_id, *args):
        if reads:
            raise OSError(5, "Input/output error")
        reads.append(adapter_id)
        return load_adapter(adapter_id, *args)
    engine = make_engine(adapter_load_fn=load_once_then_fail)
    engine.lora.add_adapter("a", peft_adapters["qv-r4"])  # eager: the one good read
    key = engine.lora.resolve("a").key
    expected = _generate(engine, "a", "first")
    base_expected = _generate(engine, None, "base-first")
    engine.lora.slots.evict(key)  # only the CPU tier holds it now
    schedule = engine.scheduler.schedule

    def schedule_then_evict():
        batch = schedule()
        engine.lora.registry._cpu.clear()  # a background load's insert evicted it just now
        return batch
    engine.scheduler.schedule = schedule_then_evict
    for rid, adapter in (("base", None), ("lora", "a")):
        engine.add_request(engine.make_request(PROMPT, PARAMS, adapter, rid))
    outputs = run_to_completion(engine)  # before: the step read from disk, raised, failed both
    assert tokens_of(outputs["lora"]) == expected and tokens_of(outputs["base"]) == base_expected
    assert reads == ["a"]


# ---- 4. a failed pin leaves nothing pinned -------------------------------------------------------
def test_a_pin_that_cannot_get_a_slot_is_refused_and_leaves_nothing_pinned(make_engine, peft_adapters):
    engine = make_engine(max_loras=2)
    for name, spec in (("a", "qv-r4"), ("b", "ko-r32"), ("c", "mlp-r16")):
        engine.lora.add_adapter(name, peft_adapters[spec])
    for name in ("a", "b"):
        engine.add_request(engine.make_request(PROMPT, PARAMS, name, name))
    engine.step()  # a and b run: both device slots are held by running requests
    with pytest.raises(AdapterPinError, match="'c'"):
        engine.pin_adapter("c")
    assert "c" not in engine.lora.pinned_ids
    assert not next(i for i in engine.lora.info() if i.meta.adapter_id == "c").pinned
    outputs = run_to_completion(engine)
    assert all(outputs[n][-1].finish_reason is FinishReason.LENGTH for n in ("a", "b"))
    engine.pin_adapter("c")  # slots free again: the same pin now succeeds
    assert "c" in engine.lora.pinned_ids and engine.lora.slots.slot_of(engine.lora.resolve("c").key) is not None


# ---- 5. a submit racing shutdown always gets an ending -------------------------------------------
def test_a_submit_racing_shutdown_is_refused_or_ended(make_engine):
    engine = make_engine()
    loop = EngineLoop(engine).start()
    make_request = engine.make_request

    def make_request_while_the_loop_stops(*args, **kwargs):
        request = make_request(*args, **kwargs)  # submit passed its "stopping?" check already
        loop.stop()  # the whole shutdown runs now, before submit registers the stream
        return request
    engine.make_request = make_request_while_the_loop_stops
    ended = threading.Event()
    outcome = []

    def submit_and_consume():
        try:
            outcome.append(list(loop.submit(PROMPT, PARAMS)))
        except EngineStoppedError as exc:
            outcome.append(exc)
        ended.set()
    worker = threading.Thread(target=submit_and_consume, daemon=True)
    worker.start()
    assert ended.wait(30), "the stream never ended"
    assert isinstance(outcome[0], EngineStoppedError)

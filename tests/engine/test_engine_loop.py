"""The engine on its own thread: sync and asyncio streaming, abort, limits, input kinds, invariance."""

from __future__ import annotations

import asyncio
import threading

import pytest

from helpers import run_to_completion, tokens_of
from loraplex_server.engine.info import ServerInfo
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.engine.request import ChatMessage, FinishReason, Prompt, SamplingParams
from loraplex_server.errors import (AdapterNotFoundError, InvalidRequestError, PromptTooLongError,
                                    QueueFullError)


@pytest.fixture
def loop(make_engine, peft_adapters):
    engine = make_engine(num_blocks=128, block_size=16)
    engine.lora.add_adapter("a", peft_adapters["all7-r8"])
    with EngineLoop(engine) as running:
        yield running


def greedy(n=8, **kw):
    return SamplingParams(max_new_tokens=n, **kw)


def test_sync_stream_deltas_add_up(loop, tokenizer):
    stream = loop.submit(Prompt(text="The capital of France is"), greedy(8, ignore_eos=True))
    deltas = list(stream)
    assert deltas[-1].finished and deltas[-1].finish_reason is FinishReason.LENGTH
    ids = tokens_of(deltas)
    assert len(ids) == 8 and "".join(d.text for d in deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_asyncio_streams_run_concurrently(loop):
    async def one(text, adapter):
        deltas = [d async for d in loop.submit(Prompt(text=text), greedy(6, ignore_eos=True), adapter)]
        return tokens_of(deltas)

    async def main():
        return await asyncio.gather(one("Hello", None), one("Hello", "a"), one("Tell me", "a"))

    base, adapted, other = asyncio.run(main())
    assert len(base) == len(adapted) == 6 and base != adapted


def test_abort_frees_kv_and_ends_stream(loop):
    stream = loop.submit(Prompt(text="Count to a thousand:"), greedy(500, ignore_eos=True))
    first = next(iter(stream))
    loop.abort(stream.request_id)
    rest = list(stream)
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert len(tokens_of([first] + rest)) < 500
    loop.generate(Prompt(text="x"), greedy(1))  # one more step: the abort has been processed
    assert loop.engine.blocks.num_free_blocks == loop.engine.blocks.num_blocks


def test_cancelled_async_consumer_aborts_request(loop):
    async def main():
        stream = loop.submit(Prompt(text="Count to a thousand:"), greedy(500, ignore_eos=True))
        async for _ in stream:
            break  # consumer goes away
        await asyncio.sleep(0.3)
    asyncio.run(main())
    loop.generate(Prompt(text="x"), greedy(1))
    assert not loop.engine.requests
    assert loop.engine.blocks.num_free_blocks == loop.engine.blocks.num_blocks


def test_bad_input_raises_at_submit(loop):
    with pytest.raises(AdapterNotFoundError):
        loop.submit(Prompt(text="hi"), greedy(), "nope")
    with pytest.raises(InvalidRequestError, match="sampling.top_p"):
        loop.submit(Prompt(text="hi"), SamplingParams(top_p=2.0))
    with pytest.raises(InvalidRequestError, match="empty"):
        loop.submit(Prompt(token_ids=()), greedy())
    with pytest.raises(InvalidRequestError, match="outside vocabulary"):
        loop.submit(Prompt(token_ids=(10**7,)), greedy())
    with pytest.raises(PromptTooLongError):
        loop.submit(Prompt(token_ids=(1,) * (128 * 16)), greedy())  # KV capacity is 2048 tokens
    with pytest.raises(InvalidRequestError, match="exactly one"):
        Prompt(text="a", token_ids=(1,))
    assert loop.generate(Prompt(text="still serving"), greedy(2)).finished


def test_chat_text_and_token_prompts_agree(loop, tokenizer):
    messages = (ChatMessage("user", "What is 2+2?"),)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    by_chat = loop.generate(Prompt(messages=messages), greedy(10))
    by_ids = loop.generate(Prompt(token_ids=tuple(ids)), greedy(10))
    assert by_chat.token_ids == by_ids.token_ids and by_chat.prompt_tokens == len(ids)


def test_stop_strings_and_logprobs_end_to_end(loop):
    full = loop.generate(Prompt(text="1, 2, 3, 4,"), greedy(12, ignore_eos=True))
    stop = full.text[4:7]
    cut = loop.generate(Prompt(text="1, 2, 3, 4,"), greedy(12, ignore_eos=True, stop=(stop,), logprobs=3))
    assert cut.finish_reason is FinishReason.STOP and cut.text == full.text[:full.text.find(stop)]
    assert len(cut.logprobs) == len(cut.token_ids)
    assert all(lp.top[0][0] == lp.token_id and len(lp.top) == 3 for lp in cut.logprobs)  # greedy = top-1


def test_seeded_sampling_is_batch_invariant(loop):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = loop.generate(Prompt(text="Tell me a story"), params, "a")
    busy = [loop.submit(Prompt(text=f"Noise {i}:"), SamplingParams(max_new_tokens=20, temperature=1.0),
                        "a" if i % 2 else None) for i in range(6)]
    again = loop.submit(Prompt(text="Tell me a story"), params, "a")
    assert again.result().token_ids == alone.token_ids
    for s in busy:
        s.result()


def test_queue_full_is_refused(make_engine):
    engine = make_engine(max_queued=2)
    loop = EngineLoop(engine)  # not started: requests stay queued
    loop.submit(Prompt(text="a"), greedy())
    loop.submit(Prompt(text="b"), greedy())
    with pytest.raises(QueueFullError):
        loop.submit(Prompt(text="c"), greedy())


def test_remove_adapter_lets_accepted_requests_finish_and_refuses_new(make_engine, peft_adapters):
    engine = make_engine()
    engine.lora.add_adapter("a", peft_adapters["qv-r4"])
    running = engine.make_request(Prompt(text="Hello"), greedy(6, ignore_eos=True), "a", "running")
    engine.add_request(running)
    engine.step()
    queued = engine.make_request(Prompt(text="Hi"), greedy(4, ignore_eos=True), "a", "queued")
    engine.add_request(queued)
    engine.remove_adapter("a")
    with pytest.raises(AdapterNotFoundError):
        engine.make_request(Prompt(text="Hi"), greedy(), "a")
    result = run_to_completion(engine)
    assert len(tokens_of(result["running"])) == 5 and len(tokens_of(result["queued"])) == 4
    assert engine.lora.slots.resident == []  # the retired version's slot is freed once unused


def test_prompt_over_model_context_is_refused(make_engine):
    engine = make_engine()
    engine.inputs.max_model_len = 32  # as if the model's context were 32 tokens
    with pytest.raises(PromptTooLongError, match="context length"):
        engine.make_request(Prompt(token_ids=(1,) * 32), greedy())
    engine.make_request(Prompt(token_ids=(1,) * 31), greedy())


def test_kv_capacity_bounds_a_sequence_with_length(make_engine):
    engine = make_engine(num_blocks=2, block_size=4)  # 8 tokens in all
    req = engine.make_request(Prompt(token_ids=(1, 2, 3, 4, 5)), greedy(100, ignore_eos=True))
    engine.add_request(req)
    out = run_to_completion(engine)[req.request_id]
    assert out[-1].finish_reason is FinishReason.LENGTH and len(tokens_of(out)) == 3


def test_shutdown_ends_the_adapter_loader_threads_stop_alone_does_not(make_engine, peft_adapters):
    before = set(threading.enumerate())
    engine = make_engine()
    engine.lora.add_adapter("a", peft_adapters["qv-r4"], eager=False)  # weights read on a loader thread
    loop = EngineLoop(engine).start()
    assert loop.generate(Prompt(text="Hi"), greedy(2), "a").completion_tokens == 2
    loaders = [t for t in threading.enumerate() if t not in before and t.name.startswith("loraplex-adapter-load")]
    assert loaders
    loop.stop()  # the engine may serve another loop: its loaders stay
    assert all(t.is_alive() for t in loaders)
    loop.shutdown()
    for thread in loaders:
        thread.join(10)
    assert not [t.name for t in loaders if t.is_alive()]


def test_server_info_is_a_plain_value_of_the_model_and_its_capacities(loop):
    info, engine = loop.server_info(), loop.engine
    assert isinstance(info, ServerInfo)
    assert (info.model, info.device, info.dtype) == (engine.loaded.name, "cpu",
                                                     str(engine.loaded.dtype).removeprefix("torch."))
    assert (info.max_loras, info.max_lora_rank, info.max_cpu_loras) == (4, 32, 16)
    assert info.context_length == engine.inputs.max_model_len
    assert info.kv_cache_tokens == 128 * 16 and info.prefix_caching is engine.config.cache.prefix_caching


def test_the_adapter_questions_of_the_api_are_answered_by_the_loop(loop, tokenizer):
    assert loop.has_adapter("a") and not loop.has_adapter("b")
    assert loop.adapter_owner("a") is None
    with pytest.raises(AdapterNotFoundError):
        loop.adapter_owner("b")
    [info] = loop.adapter_infos().result(30)
    assert info.meta.adapter_id == "a" and not info.pinned
    loop.pin_adapter("a").result(30)
    assert loop.adapter_infos().result(30)[0].pinned
    ids = tokenizer.encode("Hello world")
    assert loop.decode(ids) == tokenizer.decode(ids)

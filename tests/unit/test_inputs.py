"""engine/inputs.py: prompts -> token ids, and every request-level check before the engine sees it.

Chat templating runs on the embedded model's real tokenizer (SmolLM2's ChatML template), checked
against the ChatML text written out by hand; the rest uses small fakes and exact limits.
"""

from __future__ import annotations

import threading
import time

import pytest

from loraplex_server.engine.inputs import InputProcessor
from loraplex_server.engine.request import ChatMessage, Prompt, SamplingParams
from loraplex_server.errors import InvalidRequestError, PromptTooLongError

VOCAB = 1000


class CharTokenizer:
    """One token per character (its code point), no special tokens; no chat template. Fails if
    two threads are inside it at once, as HF fast tokenizers may."""

    chat_template = None

    def __init__(self) -> None:
        self.inside = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.inside += 1
        try:
            if self.inside > 1:
                raise RuntimeError("tokenizer used from two threads at once")
            time.sleep(0.0005)  # widen the window a concurrent caller would hit
            return [ord(c) for c in text]
        finally:
            self.inside -= 1


def processor(tokenizer=None, vocab=VOCAB, max_model_len=64, kv_tokens=48) -> InputProcessor:
    return InputProcessor(tokenizer, vocab, max_model_len, kv_tokens)


# ---------------------------------------------------------------- token ids


def test_token_ids_pass_through_when_inside_the_vocabulary():
    assert processor().token_ids(Prompt(token_ids=(0, 5, VOCAB - 1))) == [0, 5, VOCAB - 1]


@pytest.mark.parametrize("ids, bad", [((1, VOCAB, 2), VOCAB), ((1, -1), -1), ((VOCAB + 7, VOCAB), VOCAB + 7)])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_first(ids, bad):
    with pytest.raises(InvalidRequestError) as info:
        processor().token_ids(Prompt(token_ids=ids))
    assert info.value.field == "prompt_token_ids"
    assert f"token id {bad} outside vocabulary [0, {VOCAB})" in str(info.value)


@pytest.mark.parametrize("prompt", [Prompt(token_ids=()), Prompt(text="")])
def test_an_empty_prompt_is_refused(prompt):
    with pytest.raises(InvalidRequestError) as info:
        processor(CharTokenizer()).token_ids(prompt)
    assert info.value.field == "prompt"


def test_text_needs_a_tokenizer_and_chat_needs_a_template():
    with pytest.raises(InvalidRequestError, match="send prompt_token_ids") as info:
        processor(None).token_ids(Prompt(text="hi"))
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="no chat template") as info:
        processor(CharTokenizer()).token_ids(Prompt(messages=(ChatMessage("user", "hi"),)))
    assert info.value.field == "messages"
    assert processor(None).token_ids(Prompt(token_ids=(3,))) == [3]  # ids need neither


def test_text_is_tokenized_by_the_model_tokenizer():
    assert processor(CharTokenizer()).token_ids(Prompt(text="abc")) == [97, 98, 99]


def test_tokenizing_from_many_threads_is_serialized():
    inputs, errors = processor(CharTokenizer()), []

    def work():
        try:
            for _ in range(20):
                assert inputs.token_ids(Prompt(text="xyz")) == [120, 121, 122]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


# ---------------------------------------------------------------- chat templating (real tokenizer)


@pytest.fixture(scope="module")
def smol(tokenizer) -> InputProcessor:
    return InputProcessor(tokenizer, len(tokenizer), 8192, 4096)


def test_chat_messages_render_with_the_models_template(smol, tokenizer):
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"),
                ChatMessage("assistant", "Hello!"), ChatMessage("user", "Name a fruit."))
    ids = smol.token_ids(Prompt(messages=messages))
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
        "<|im_start|>assistant\n")  # ends with the generation prompt
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # markers are single tokens


def test_a_chat_without_messages_is_refused(smol):
    with pytest.raises(InvalidRequestError) as info:
        smol.token_ids(Prompt(messages=()))
    assert info.value.field == "messages"


def test_text_prompts_are_not_templated(smol, tokenizer):
    ids = smol.token_ids(Prompt(text="Name a fruit."))
    assert tokenizer.decode(ids) == "Name a fruit."


# ---------------------------------------------------------------- limits and sampling


def test_max_total_tokens_is_the_smaller_of_context_and_kv_capacity():
    assert processor(max_model_len=64, kv_tokens=48).max_total_tokens == 48
    assert processor(max_model_len=32, kv_tokens=48).max_total_tokens == 32


def test_prompt_length_limit_is_the_context_less_one_output_token():
    inputs = processor(max_model_len=16, kv_tokens=1000)
    inputs.check([1] * 15, SamplingParams())  # room for one output token
    with pytest.raises(PromptTooLongError) as info:
        inputs.check([1] * 16, SamplingParams())
    assert (info.value.num_tokens, info.value.limit, info.value.field) == (16, 15, "prompt")
    assert "context length" in str(info.value)


def test_prompt_length_limit_is_the_kv_capacity_less_one_output_token():
    inputs = processor(max_model_len=1000, kv_tokens=24)
    inputs.check([1] * 23, SamplingParams())
    with pytest.raises(PromptTooLongError) as info:
        inputs.check([1] * 24, SamplingParams())
    assert (info.value.num_tokens, info.value.limit) == (24, 23)
    assert "KV cache capacity" in str(info.value)


def test_check_validates_the_sampling_params():
    with pytest.raises(InvalidRequestError) as info:
        processor().check([1, 2], SamplingParams(top_p=0.0))
    assert info.value.field == "sampling.top_p"
    with pytest.raises(InvalidRequestError) as info:
        processor().check([1, 2], SamplingParams(max_new_tokens=0))
    assert info.value.field == "sampling.max_new_tokens"


def test_stop_token_ids_must_be_inside_the_vocabulary():
    processor().check([1], SamplingParams(stop_token_ids=(0, VOCAB - 1)))
    with pytest.raises(InvalidRequestError) as info:
        processor().check([1], SamplingParams(stop_token_ids=(3, VOCAB)))
    assert info.value.field == "sampling.stop_token_ids"

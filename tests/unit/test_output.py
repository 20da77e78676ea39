import random
import threading

import pytest

from loraplex_server.engine.detokenizer import IncrementalDetokenizer, StreamDetokenizer, make_detokenizer
from loraplex_server.engine.output import OutputProcessor, decode_texts
from loraplex_server.engine.request import FinishReason, Request, SamplingParams


def both(tokenizer, prompt):
    return [IncrementalDetokenizer(tokenizer, prompt), StreamDetokenizer(tokenizer._tokenizer, prompt)]


def test_fast_tokenizers_stream_in_rust():
    assert isinstance(make_detokenizer(None, [1, 2]), IncrementalDetokenizer)


@pytest.mark.parametrize("kind", ["window", "stream"])
def test_incremental_text_equals_full_decode_with_multibyte(tokenizer, kind):
    text = "Héllo wörld — 你好, 世界! 🙂🚀 naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    detok = both(tokenizer, prompt)[kind == "stream"]
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some emoji span tokens: held until complete


def test_stream_and_window_emit_the_same_text_for_random_texts(tokenizer):
    """Random texts (words, punctuation, accents, CJK, emoji split over byte tokens, special tokens)
    after random prompt ids: the Rust stream and the window decoder emit the same text. (They part
    only on invalid UTF-8, which a model can emit: the stream then shows U+FFFD, as a full decode
    does, where the window decoder may drop the fragment.)"""
    assert isinstance(make_detokenizer(tokenizer, [1]), StreamDetokenizer)
    rng, kinds = random.Random(0), set()
    pieces = [" the", " quick", "Fox", ",", ".", "\n", " naïve", " café", " 你好", "世界", " 🙂", "🚀", " — ", "  ", "x",
              tokenizer.eos_token]
    for _ in range(40):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 8))]
        ids = tokenizer.encode("".join(rng.choice(pieces) for _ in range(20)), add_special_tokens=False)
        window, chosen = IncrementalDetokenizer(tokenizer, prompt), make_detokenizer(tokenizer, prompt)
        window_text = "".join(window.add(t) for t in ids)
        assert "".join(chosen.add(t) for t in ids) == window_text
        clean = "\ufffd" not in tokenizer.decode(prompt[-5:], skip_special_tokens=True)
        assert isinstance(chosen, StreamDetokenizer) == clean
        kinds.add(clean)
    assert kinds == {True, False}  # both kinds of prompt tail were seen


def feed(proc, request, ids):
    outs = []
    for t in ids:
        out = proc.append(request, t, None)
        decode_texts(proc.take_undecoded())
        if out:
            outs.append(out)
        if request.finish_reason:
            break
    return outs


def make(tokenizer, **sp):
    proc = OutputProcessor(tokenizer, eos_token_ids={tokenizer.eos_token_id}, max_total_tokens=10_000)
    r = Request("r", tokenizer.encode("Hi"), SamplingParams(**sp))
    proc.start(r)
    return proc, r


def test_stop_string_across_tokens_is_cut_and_never_leaked(tokenizer):
    ids = tokenizer.encode(" one two three four five", add_special_tokens=False)
    proc, r = make(tokenizer, max_new_tokens=50, stop=("three f",))
    outs = feed(proc, r, ids)
    assert r.finish_reason is FinishReason.STOP
    assert "".join(o.text for o in outs) == " one two "
    assert outs[-1].finished


def test_stop_token_id_and_eos_and_ignore_eos(tokenizer):
    ids = tokenizer.encode(" a b c", add_special_tokens=False)
    proc, r = make(tokenizer, stop_token_ids=(ids[1],))
    feed(proc, r, ids)
    assert r.finish_reason is FinishReason.STOP and r.output_token_ids == ids[:2]
    eos = tokenizer.eos_token_id
    proc, r = make(tokenizer)
    feed(proc, r, [ids[0], eos])
    assert r.finish_reason is FinishReason.EOS
    proc, r = make(tokenizer, ignore_eos=True, max_new_tokens=3)
    feed(proc, r, [eos, eos, eos])
    assert r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 3


def test_max_total_tokens_ends_with_length(tokenizer):
    proc = OutputProcessor(tokenizer, set(), max_total_tokens=5)
    r = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=100))
    proc.start(r)
    feed(proc, r, [10, 11, 12])
    assert r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 2


def test_deltas_add_up_and_count_tokens(tokenizer):
    ids = tokenizer.encode(" the quick brown fox", add_special_tokens=False)
    proc, r = make(tokenizer, max_new_tokens=len(ids))
    outs = feed(proc, r, ids)
    assert [t for o in outs for t in o.token_ids] == ids
    assert "".join(o.text for o in outs) == tokenizer.decode(ids)
    assert outs[-1].completion_tokens == len(ids) and outs[-1].finish_reason is FinishReason.LENGTH


def test_only_stop_string_requests_are_detokenized_as_tokens_arrive(tokenizer):
    """A request without stop strings leaves its text to decode later, on any one thread, in order:
    the deltas' texts add up to the full decode, and a closing EOS is not text."""
    ids = tokenizer.encode(" Héllo wörld 🙂 naïve café", add_special_tokens=False) + [tokenizer.eos_token_id]
    proc, plain = make(tokenizer, max_new_tokens=50)
    stopping = Request("s", tokenizer.encode("Hi"), SamplingParams(max_new_tokens=50, stop=("zzz",)))
    proc.start(stopping)
    outs, pending = [], []
    for t in ids:
        outs.append(proc.append(plain, t, None))
        stopping_out = proc.append(stopping, t, None)
        pending += proc.take_undecoded()
    assert all(o.text == "" for o in outs) and len(pending) == len(ids) - 1  # EOS: no text to decode
    assert [p.output for p in pending] == outs[:-1] and stopping_out.finished
    worker = threading.Thread(target=decode_texts, args=(pending,))
    worker.start()
    worker.join()
    assert "".join(o.text for o in outs) == tokenizer.decode(ids[:-1])
    assert outs[-1].finish_reason is FinishReason.EOS and outs[-1].token_ids == (ids[-1],)
    assert not proc.take_undecoded()


def test_a_failing_decode_leaves_its_delta_without_text_and_the_rest_decoded(tokenizer, caplog):
    ids = tokenizer.encode(" one two", add_special_tokens=False)
    proc, r = make(tokenizer, max_new_tokens=10)
    other = Request("o", tokenizer.encode("Hi"), SamplingParams(max_new_tokens=10))
    proc.start(other)
    broken, fine = proc.append(r, ids[0], None), proc.append(other, ids[0], None)
    pending = proc.take_undecoded()

    def fail(token_id):
        raise ValueError("bad token")
    pending[0].detokenizer.add = fail  # type: ignore[method-assign]
    decode_texts(pending)
    assert broken.text == "" and broken.token_ids == (ids[0],)
    assert fine.text == tokenizer.decode(ids[:1])
    assert "detokenizing request r failed" in caplog.text

from loraplex_server.engine.detokenizer import IncrementalDetokenizer
from loraplex_server.engine.output import OutputProcessor
from loraplex_server.engine.request import FinishReason, Request, SamplingParams


def test_incremental_text_equals_full_decode_with_multibyte(tokenizer):
    text = "Héllo wörld — 你好, 世界! 🙂🚀 naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some emoji span tokens: held until complete


def feed(proc, request, ids):
    outs = []
    for t in ids:
        out = proc.append(request, t, None)
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

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from loraplex_server.engine.request import Request, SamplingParams
from loraplex_server.engine.sampler import Sampler, apply_repetition_penalty, apply_top_k_top_p
from loraplex_server.errors import InvalidRequestError


def req(rid="r", history=(1, 2, 3), **sp):
    return Request(rid, list(history), SamplingParams(**sp))


def test_greedy_rows_take_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    res = Sampler(torch.device("cpu"))(logits, [req("a"), req("b")])
    assert res.token_ids == [1, 0] and res.logprobs == [None, None]


@pytest.mark.parametrize("sp,plain", [({}, True), ({"temperature": 0.7}, False),
                                      ({"repetition_penalty": 1.3}, False), ({"logprobs": 2}, False),
                                      ({"stop": ("x",), "max_new_tokens": 3}, True)])
def test_plain_greedy_is_greedy_on_the_raw_logits_with_nothing_else_asked(sp, plain):
    import dataclasses
    params = SamplingParams(**sp)
    assert params.plain_greedy is plain
    assert dataclasses.replace(params, temperature=0.0, repetition_penalty=1.0, logprobs=0).plain_greedy


def test_one_row_asking_for_more_than_argmax_takes_the_whole_batch_off_the_fast_path():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0], [0.0, 0.5, 2.0]])
    plain = Sampler(torch.device("cpu"))(logits.clone(), [req("a"), req("b"), req("c")])
    mixed = Sampler(torch.device("cpu"))(logits.clone(), [req("a"), req("b", logprobs=1),
                                                          req("c", history=(2, 2), repetition_penalty=5.0)])
    assert plain.token_ids == [1, 0, 2] and plain.logprobs == [None, None, None]
    assert mixed.token_ids == [1, 0, 1]  # c's penalty (token 2 seen) turns its choice to token 1
    assert mixed.logprobs[0] is None and mixed.logprobs[1].token_id == 0


@pytest.mark.parametrize("k,p", [(0, 0.9), (5, 1.0), (3, 0.5), (1, 0.3)])
def test_top_k_top_p_match_transformers(k, p):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(1, 50, generator=g) * 3
    ours = apply_top_k_top_p(logits.clone(), torch.tensor([k]), torch.tensor([p]))
    ref = logits.clone()
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_top_k_top_p_rows_are_independent():
    logits = torch.randn(3, 20)
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 0.1]))
    assert (~torch.isinf(out[0])).sum() == 2
    assert torch.equal(out[1], logits[1])
    assert (~torch.isinf(out[2])).sum() >= 1


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 10)
    r = req(history=(1, 4, 4, 7), repetition_penalty=1.3)
    ours = logits.clone()
    apply_repetition_penalty(ours, [r])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 4, 4, 7]]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_same_seed_same_tokens_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    alone = Sampler(torch.device("cpu"))
    batch = Sampler(torch.device("cpu"))
    seq_alone, seq_batch = [], []
    for _ in range(20):
        seq_alone.append(alone(logits[2:3], [req("x", temperature=1.0, seed=42)]).token_ids[0])
        rows = [req("a", temperature=0.7), req("b"), req("x", temperature=1.0, seed=42), req("c", top_k=3, temperature=2.0)]
        seq_batch.append(batch(logits, rows).token_ids[2])
    assert seq_alone == seq_batch
    assert len(set(seq_alone)) > 1  # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = Sampler(torch.device("cpu"))
    counts = torch.zeros(3)
    for i in range(2000):
        counts[s(logits, [req(f"r{i}", temperature=1.0, seed=i)]).token_ids[0]] += 1
    torch.testing.assert_close(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04, rtol=0)


def test_logprobs_are_raw_log_softmax_with_top_n():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    res = Sampler(torch.device("cpu"))(logits, [req(logprobs=2)])
    lp = res.logprobs[0]
    expected = torch.log_softmax(logits[0], 0)
    assert lp.token_id == 0 and lp.logprob == pytest.approx(expected[0].item())
    assert [t for t, _ in lp.top] == [0, 1]
    assert lp.top[1][1] == pytest.approx(expected[1].item())


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
    ("repetition_penalty", 0.0), ("logprobs", 21), ("stop", ("",)), ("temperature", float("nan")),
])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**{field: value}).validate()
    assert exc.value.field == f"sampling.{field}"

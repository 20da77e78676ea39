"""engine/runner.py: a scheduled batch -> packed tensors -> forward -> samples back to their requests.

Packing is checked against hand-computed positions, cache slots, spans and logits rows for a mix
of a fresh prefill, a continuing prefill chunk and decodes with and without adapters. The forward
is checked twice: with a fake model (which rows reach it, which sample goes to which request, the
LoRA mapping set and cleared), and on a tiny real model, where a chunked prefill and a decode from
the paged KV cache must give the logits of one full prefill of the same tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import dummy_engine_factory
from loraplex_server.engine.request import Request, SamplingParams
from loraplex_server.engine.runner import ModelRunner
from loraplex_server.engine.scheduler import ScheduledRequest, SchedulerOutput
from loraplex_server.lora.mapping import NO_SLOT

CPU = torch.device("cpu")
BS = 4  # block size of the packing tests
VOCAB = 512
SLOTS = {"a@1": 0, "b@1": 1}  # adapter version key -> device slot


def request(rid, prompt, blocks, computed=0, output=(), key=None) -> Request:
    r = Request(rid, list(prompt), SamplingParams(max_new_tokens=8), adapter_id=key and key.split("@")[0],
                adapter_key=key)
    r.output_token_ids, r.num_computed_tokens, r.block_ids = list(output), computed, list(blocks)
    return r


@pytest.fixture
def mixed():
    """Four requests, scheduled in this order (the runner reorders them by LoRA slot):

    chunk  (adapter b): a 10-token prompt, 4 computed, now positions 4..7: does not sample
    dec    (adapter a): 3 prompt + 1 output token, decoding position 3
    pre    (base):      a fresh 6-token prompt, positions 0..5: samples
    dec2   (adapter a): 5 prompt + 2 output tokens, decoding position 6 (in its second block)
    """
    reqs = dict(
        chunk=request("chunk", range(100, 110), blocks=[3, 5, 9], computed=4, key="b@1"),
        dec=request("dec", [200, 201, 202], blocks=[1], computed=3, output=[300], key="a@1"),
        pre=request("pre", range(10, 16), blocks=[7, 2]),
        dec2=request("dec2", [400, 401, 402, 403, 404], blocks=[4, 6], computed=6, output=[310, 311], key="a@1"),
    )
    batch = SchedulerOutput([ScheduledRequest.of(reqs["chunk"], 4), ScheduledRequest.of(reqs["dec"], 1),
                             ScheduledRequest.of(reqs["pre"], 6), ScheduledRequest.of(reqs["dec2"], 1)])
    return reqs, batch


class SlotOrderLora:
    """A LoRA manager stand-in whose slots' pool rows are in slot order (``pack_order``)."""

    def pack_order(self, slot: int) -> int:
        return slot

    def set_mapping(self, mapping) -> None:
        self.mapping = mapping


def runner(model=None, lora=None) -> ModelRunner:
    return ModelRunner(model, kv_caches=[], block_size=BS, device=CPU, lora=lora)


def test_samples_flag_marks_only_steps_that_reach_the_last_token(mixed):
    reqs, batch = mixed
    assert {s.request.request_id: s.samples for s in batch.scheduled} == \
        dict(chunk=False, dec=True, pre=True, dec2=True)


def test_pack_orders_by_slot_and_lays_out_tokens_positions_and_cache_slots(mixed):
    reqs, batch = mixed
    packed = runner(lora=SlotOrderLora()).pack(batch, SLOTS)
    # packed order: base (no slot) first, then slot 0 (dec, dec2 in scheduled order), then slot 1
    assert packed.input_ids.tolist() == [[10, 11, 12, 13, 14, 15, 300, 311, 104, 105, 106, 107]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 6, 4, 5, 6, 7]]
    # slot = block * 4 + position % 4: pre in blocks 7, 2; dec in 1; dec2's position 6 in block 6;
    # chunk's positions 4..7 in its second block, 5
    assert packed.attention.slot_mapping.tolist() == [28, 29, 30, 31, 8, 9, 7, 26, 20, 21, 22, 23]


def test_pack_splits_prefill_spans_from_decode_rows(mixed):
    reqs, batch = mixed
    att = runner().pack(batch, SLOTS).attention
    pre, chunk = att.prefills
    assert (pre.q_start, pre.q_len, pre.ctx_len, pre.ctx_slots) == (0, 6, 6, None)  # only new tokens
    assert (chunk.q_start, chunk.q_len, chunk.ctx_len) == (8, 4, 8)
    assert chunk.ctx_slots.tolist() == [12, 13, 14, 15, 20, 21, 22, 23]  # its blocks 3 and 5, all 8 positions
    assert att.decode_rows.tolist() == [6, 7]
    assert att.decode_ctx_lens.tolist() == [4, 7]
    assert att.decode_block_tables.tolist() == [[1, 0], [4, 6]]  # padded with block 0
    assert att.block_size == BS


def test_pack_keeps_logits_rows_of_the_sampling_requests_only(mixed):
    reqs, batch = mixed
    packed = runner().pack(batch, SLOTS)
    assert packed.logits_rows.tolist() == [5, 6, 7]  # last token of pre, dec, dec2; chunk does not sample
    assert packed.sampling_requests == [reqs["pre"], reqs["dec"], reqs["dec2"]]


def test_pack_maps_tokens_to_lora_slots_in_contiguous_segments(mixed):
    reqs, batch = mixed
    lora = runner(lora=SlotOrderLora()).pack(batch, SLOTS).lora
    assert lora.token_slots.tolist() == [NO_SLOT] * 6 + [0, 0] + [1] * 4
    assert lora.segments == ((6, 8, 0), (8, 12, 1))
    assert runner(lora=None).pack(batch, SLOTS).lora is None  # no LoRA manager: no mapping


def test_an_adapter_without_a_device_slot_runs_as_the_base_model():
    r = request("r", [1, 2, 3], blocks=[0], key="gone@2")
    lora = runner(lora=SlotOrderLora()).pack(SchedulerOutput([ScheduledRequest.of(r, 3)]), SLOTS).lora
    assert lora.token_slots.tolist() == [NO_SLOT] * 3 and lora.segments == ()


def test_a_one_token_prompt_is_a_prefill_not_a_decode():
    r = request("r", [42], blocks=[5])
    att = runner().pack(SchedulerOutput([ScheduledRequest.of(r, 1)]), {}).attention
    assert [(p.q_start, p.q_len, p.ctx_len, p.ctx_slots) for p in att.prefills] == [(0, 1, 1, None)]
    assert att.decode_rows is None and att.slot_mapping.tolist() == [20]


# ---------------------------------------------------------------- forward with a fake model


class EchoModel:
    """Logits that name the input token: row i is one-hot at (token at logits_to_keep[i]) + 1."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def __call__(self, *, input_ids, position_ids, use_cache, logits_to_keep, **kwargs):
        self.calls.append(SimpleNamespace(input_ids=input_ids, logits_to_keep=logits_to_keep, kwargs=kwargs))
        if self.fail:
            raise RuntimeError("kernel exploded")
        rows = input_ids[0, logits_to_keep] + 1
        logits = torch.full((1, len(rows), VOCAB), -10.0)
        logits[0, torch.arange(len(rows)), rows] = 10.0
        return SimpleNamespace(logits=logits)


class FakeLora(SlotOrderLora):
    def __init__(self):
        self.mappings = []

    def set_mapping(self, mapping):
        self.mappings.append(mapping)


def test_each_sample_goes_back_to_its_own_request(mixed):
    reqs, batch = mixed
    lora = FakeLora()
    model = EchoModel()
    requests, result = runner(model, lora).run(batch, SLOTS)
    assert model.calls[0].logits_to_keep.tolist() == [5, 6, 7]
    assert dict(zip([r.request_id for r in requests], result.token_ids)) == dict(pre=16, dec=301, dec2=312)
    assert lora.mappings[0].segments == ((6, 8, 0), (8, 12, 1)) and lora.mappings[-1] is None


def test_a_step_where_nothing_samples_returns_no_samples():
    r = request("r", range(20, 30), blocks=[0, 1, 2], computed=0)
    model = EchoModel()
    requests, result = runner(model).run(SchedulerOutput([ScheduledRequest.of(r, 4)]), {})
    assert requests == [] and result.token_ids == [] and result.logprobs == []
    assert len(model.calls) == 1  # the chunk's K/V are still computed


def test_a_failing_forward_still_clears_the_lora_mapping(mixed):
    reqs, batch = mixed
    lora = FakeLora()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        runner(EchoModel(fail=True), lora).run(batch, SLOTS)
    assert len(lora.mappings) == 2 and lora.mappings[0] is not None and lora.mappings[-1] is None


# ---------------------------------------------------------------- a tiny real model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer SmolLM2-shaped engine with seeded dummy weights (block size 8, 64 blocks); only
    its runner and KV cache are used, with blocks chosen by hand."""
    return dummy_engine_factory(tmp_path_factory.mktemp("tiny"), CPU)()


def last_logits(engine, scheduled) -> torch.Tensor:
    runner = engine.runner
    return runner.forward_logits(runner.pack(SchedulerOutput(scheduled), {})).clone()


def test_chunked_prefill_and_decode_match_one_full_prefill(tiny):
    bs = tiny.runner.block_size
    prompt = [(7 * i + 3) % 4000 + 50 for i in range(13)]
    other = [900, 901, 902, 903, 904]
    x = request("x", prompt, blocks=[1, 2])
    y = request("y", other, blocks=[3])
    assert len(prompt) > bs  # the chunk boundary and the decode cross a block boundary
    # step 1: the first 6 prompt tokens (no sample); step 2: the other 7 with a second request
    last_logits(tiny, [ScheduledRequest.of(x, 6)])
    x.num_computed_tokens = 6
    step2 = last_logits(tiny, [ScheduledRequest.of(x, 7), ScheduledRequest.of(y, 5)])
    # step 3: one decode of x from the cache
    token = int(step2[0].argmax())
    x.output_token_ids.append(token)
    x.num_computed_tokens = 13
    y.output_token_ids.append(int(step2[1].argmax()))
    y.num_computed_tokens = 5
    step3 = last_logits(tiny, [ScheduledRequest.of(x, 1), ScheduledRequest.of(y, 1)])
    # references: each sequence computed at once in blocks nobody else uses
    full_x = last_logits(tiny, [ScheduledRequest.of(request("fx", prompt, blocks=[10, 11]), 13)])
    full_y = last_logits(tiny, [ScheduledRequest.of(request("fy", other, blocks=[12]), 5)])
    full_x1 = last_logits(tiny, [ScheduledRequest.of(request("fx1", prompt + [token], blocks=[13, 14]), 14)])
    torch.testing.assert_close(step2[0], full_x[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step2[1], full_y[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step3[0], full_x1[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(step2[0], step2[1], atol=1e-2)  # different sequences, different logits

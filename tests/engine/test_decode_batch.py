"""The persistent decode rows (engine/decode_batch.py) pack exactly what packing every row does."""

import pytest
import torch

from helpers import dummy_engine_factory, run_to_completion, tokens_of
from loraplex_server.engine.decode_batch import DecodeRows
from loraplex_server.engine.request import Prompt, Request, SamplingParams
from loraplex_server.lora.mapping import NO_SLOT


def assert_same_packing(got, expected) -> None:
    for name in ("input_ids", "position_ids", "logits_rows"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    a, b = got.attention, expected.attention
    for name in ("slot_mapping", "decode_rows", "decode_ctx_lens", "decode_block_tables"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.prefills == b.prefills == []
    assert [r.request_id for r in got.sampling_requests] == [r.request_id for r in expected.sampling_requests]
    assert torch.equal(got.lora.token_slots, expected.lora.token_slots)
    assert got.lora.segments == expected.lora.segments


def add(engine, i, adapter, prompt_len, new_tokens):
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine.add_request(engine.make_request(Prompt(token_ids=tuple(range(10 + i, 10 + i + prompt_len))), sampling,
                                           adapter, f"r{i}"))


def churn(engine) -> dict[str, list]:
    """Requests of mixed adapters and lengths, some admitted mid-decode, one aborted."""
    for i, (adapter, prompt, new) in enumerate([("a0", 5, 30), (None, 9, 12), ("a1", 3, 25), ("a0", 12, 7),
                                                (None, 4, 40), ("a1", 7, 18)]):
        add(engine, i, adapter, prompt, new)
    outputs: dict[str, list] = {}
    for step in range(200):
        if not engine.has_work:
            break
        if step == 20:
            for i, (adapter, prompt, new) in enumerate([("a1", 6, 9), (None, 2, 21), ("a0", 8, 14)], start=6):
                add(engine, i, adapter, prompt, new)
        if step == 30:
            engine.abort("r4")
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_work
    return outputs


@pytest.mark.parametrize("memory_pool", ["separate", "unified"])
def test_decode_rows_pack_what_packing_every_row_does(tmp_path, memory_pool):
    make = dummy_engine_factory(tmp_path, torch.device("cpu"), max_batch_tokens=64)
    engine = make(memory_pool)
    runner, seen, mismatches = engine.runner, {"kept": 0, "subset": 0, "built": 0, "from tokens": 0}, []
    pack = runner.pack

    def checked(batch, lora_slots):
        before = runner.decode_rows
        seen["from tokens"] += before is not None and before.sampled is not None
        expected = runner.pack_all(batch, lora_slots)
        n_before = len(before.requests) if before is not None else None
        got = pack(batch, lora_slots)
        if got.attention.decode_rows is not None and not got.attention.prefills:
            try:  # recorded, not raised: the engine would isolate a failing step and go on
                assert_same_packing(got, expected)
            except AssertionError as exc:
                mismatches.append(exc)
            after = runner.decode_rows
            kind = "built" if after is not before else "kept" if len(after.requests) == n_before else "subset"
            seen[kind] += 1
        return got
    runner.pack = checked
    got = churn(engine)
    assert not mismatches, mismatches[0]
    assert all(seen.values()), seen  # every path ran: kept as is, a subset kept, rows built, last tokens
    reference = make(memory_pool)
    reference.runner.pack = reference.runner.pack_all  # every step packed from scratch
    expected = churn(reference)
    assert {k: tokens_of(v) for k, v in got.items()} == {k: tokens_of(v) for k, v in expected.items()}


def request(name: str, blocks: list[int], computed: int) -> Request:
    r = Request(name, list(range(computed)), SamplingParams())
    r.output_token_ids, r.block_ids, r.num_computed_tokens = [7], list(blocks), computed
    return r


def test_rows_follow_only_their_own_requests_on_unmoved_slots():
    a, b, c = request("a", [3], 4), request("b", [5, 6], 9), request("c", [8], 2)
    rows = DecodeRows.build([a, b], [a, b], [NO_SLOT, 0], {"k@1": 0}, {NO_SLOT: -1, 0: 12}, None)
    order = {NO_SLOT: -1, 0: 12}.get
    assert rows.follow([a, b], {"k@1": 0}, order, torch.device("cpu"))
    assert not rows.follow([a, b, c], {"k@1": 0}, order, torch.device("cpu"))  # c is new to the rows
    assert not rows.follow([a, b], {"k@1": 1}, order, torch.device("cpu"))  # the adapter moved slot
    assert not rows.follow([a, b], {"k@1": 0}, {NO_SLOT: -1, 0: 40}.get, torch.device("cpu"))  # its rows moved
    assert rows.follow([b], {}, order, torch.device("cpu")) and rows.requests == [b]
    b.block_ids += [11, 12]  # grows past the table's spare column
    b.num_computed_tokens = 3 * 4 + 1  # block size 4: position 13 is in the fourth block
    ids, positions, new_slots, table = rows.step_arrays(4)
    assert ids.tolist() == [7] and positions.tolist() == [13]
    assert table.tolist() == [[5, 6, 11, 12]] and new_slots.tolist() == [12 * 4 + 1]


def test_rows_resume_from_the_tokens_their_last_step_sampled():
    """After ``took_tokens`` a step reads no request but those whose new position starts a block;
    without it (the step failed before sampling) every request is read again."""
    a, b = request("a", [3], 3), request("b", [5, 6], 6)  # block size 4: positions 3 and 6
    rows = DecodeRows.build([a, b], [a, b], [NO_SLOT, NO_SLOT], {}, {NO_SLOT: -1}, None)
    ids, positions, _, _ = rows.step_arrays(4)
    assert ids.tolist() == [7, 7] and positions.tolist() == [3, 6]
    rows.took_tokens([41, 42])
    a.block_ids.append(9)  # position 4 starts a's second block
    a.output_token_ids, b.output_token_ids = [7, 41], [7, 42]
    a.num_computed_tokens, b.num_computed_tokens = 4, 7
    ids, positions, new_slots, table = rows.step_arrays(4)
    assert ids.tolist() == [41, 42] and positions.tolist() == [4, 7]
    assert table.tolist() == [[3, 9], [5, 6]] and new_slots.tolist() == [9 * 4, 6 * 4 + 3]
    b.output_token_ids.append(43)  # no tokens taken (say the forward failed): read from the requests
    b.num_computed_tokens = 8
    assert rows.follow([b], {}, {NO_SLOT: -1}.get, torch.device("cpu"))
    b.block_ids.append(10)
    ids, positions, new_slots, table = rows.step_arrays(4)
    assert ids.tolist() == [43] and positions.tolist() == [8] and table.tolist() == [[5, 6, 10]]


def test_a_failed_pure_decode_step_leaves_the_rows_reading_the_requests(tmp_path):
    """The third pure-decode forward in a row (its rows resumed from the last step's tokens) fails
    once: the engine re-runs the step in halves, which must read their requests again, and every
    step generates what packing every row generates."""
    make = dummy_engine_factory(tmp_path, torch.device("cpu"), max_batch_tokens=64)
    engine, failed, decodes_in_a_row = make("separate"), [], [0]
    forward = engine.runner.forward_logits

    def fails_once(packed):
        decodes_in_a_row[0] = 0 if packed.attention.prefills else decodes_in_a_row[0] + 1
        if not failed and decodes_in_a_row[0] == 3 and len(packed.sampling_requests) > 3:
            failed.append(len(packed.sampling_requests))
            raise RuntimeError("injected")
        return forward(packed)
    engine.runner.forward_logits = fails_once
    got = churn(engine)
    assert failed
    reference = make("separate")
    reference.runner.pack = reference.runner.pack_all
    assert {k: tokens_of(v) for k, v in got.items()} == {k: tokens_of(v) for k, v in churn(reference).items()}

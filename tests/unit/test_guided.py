"""Structured outputs below the engine: constraint checks, the compiled-grammar cache, row masks."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch

from loraplex.v1 import loraplex_pb2 as pb
from loraplex_server.api.calls import check_final
from loraplex_server.api.convert import constraint_from_proto, sampling_from_proto
from loraplex_server.api.errors import status_for
from loraplex_server.config import GuidedConfig
from loraplex_server.engine.guided import GrammarBackend, GrammarCache, Guide, backend as backend_module
from loraplex_server.engine.request import (Constraint, FinishReason, Request, RequestOutput, SamplingParams)
from loraplex_server.engine.sampler import Sampler
from loraplex_server.errors import GuidedDecodingUnavailableError, InvalidRequestError
from loraplex_server.metrics import Metrics

SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                     "additionalProperties": False})


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, 49152, {tokenizer.eos_token_id})


def make_cache(backend, **config) -> GrammarCache:
    return GrammarCache(GuidedConfig(**config), lambda: backend)


def compiled_guide(cache: GrammarCache, constraint: Constraint) -> Guide:
    future = cache.get(constraint)
    future.result(30)
    return Guide(constraint, future)


# ---------------------------------------------------------------- structural checks


@pytest.mark.parametrize("constraint,field,words", [
    (Constraint("choice"), "sampling.choice", "empty"),
    (Constraint("choice", choices=("a", "")), "sampling.choice", "non-empty"),
    (Constraint("regex", spec=" "), "sampling.regex", "empty"),
    (Constraint("json_schema"), "sampling.json_schema", "empty"),
    (Constraint("grammar"), "sampling.grammar", "empty"),
    (Constraint("yaml", spec="x"), "sampling.constraint", "unknown kind"),
])
def test_structurally_bad_constraints_name_the_field(constraint, field, words):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(constraint=constraint).validate()
    assert exc.value.field == field and words in str(exc.value)


def test_ignore_eos_cannot_be_combined_with_a_constraint():
    with pytest.raises(InvalidRequestError, match="sampling.ignore_eos"):
        SamplingParams(ignore_eos=True, constraint=Constraint("regex", spec="a")).validate()
    SamplingParams(constraint=Constraint("json_object")).validate()  # json_object needs no text


# ---------------------------------------------------------------- compiling


@pytest.mark.parametrize("constraint,words", [
    (Constraint("json_schema", spec="{not json"), "not valid JSON"),
    (Constraint("json_schema", spec="[1, 2]"), "must be a JSON object"),
    (Constraint("json_schema", spec='{"type": "frobnicate"}'), "frobnicate"),
    (Constraint("regex", spec="([a-z]"), "does not compile"),
    (Constraint("grammar", spec="root ::= missing_rule"), "missing_rule"),
])
def test_constraints_that_do_not_compile_fail_their_future_naming_the_problem(backend, constraint, words):
    cache = make_cache(backend)
    with pytest.raises(InvalidRequestError) as exc:
        cache.get(constraint).result(30)
    assert exc.value.field == constraint.field and words in str(exc.value)
    guide = Guide(constraint, cache.get(constraint))  # the failure is cached: a hit, already failed
    assert not guide.ready and guide.error.startswith(constraint.field) and words in guide.error
    assert (cache.hits, cache.misses) == (1, 1)


def test_constraint_over_the_size_limit_is_refused_before_compiling(backend):
    cache = make_cache(backend, max_constraint_bytes=100)
    with pytest.raises(InvalidRequestError, match="sampling.json_schema: 1[0-9]{2} bytes exceed the limit of 100"):
        cache.get(Constraint("json_schema", spec=json.dumps({"description": "x" * 120})))
    with pytest.raises(InvalidRequestError, match="sampling.choice"):
        cache.get(Constraint("choice", choices=tuple("c" * 30 for _ in range(4))))
    assert cache.misses == 0 and len(cache) == 0


def test_cache_is_lru_bounded_counts_hits_and_times_compiles(backend):
    cache = make_cache(backend, grammar_cache_size=2)
    a, b, c = (Constraint("regex", spec=s) for s in ("a+", "b+", "c+"))
    for constraint in (a, b, a, c):  # c evicts b (a was used more recently)
        cache.get(constraint).result(30)
    assert len(cache) == 2 and (cache.hits, cache.misses) == (1, 3)
    cache.get(a)
    cache.get(b)
    assert (cache.hits, cache.misses) == (2, 4)
    times = cache.drain_compile_seconds()
    assert len(times) >= 3 and all(t >= 0 for t in times) and cache.drain_compile_seconds() == ()


def test_compiles_run_off_the_calling_thread(backend):
    cache = make_cache(backend)
    release, names = threading.Event(), []

    def slow(b, constraint):
        names.append(threading.current_thread().name)
        release.wait(10)
        return b.compile(constraint)
    cache.compile_fn = slow
    future = cache.get(Constraint("regex", spec="x"))
    guide = Guide(Constraint("regex", spec="x"), future)
    assert not guide.ready and guide.error is None  # still compiling: neither ready nor failed
    release.set()
    future.result(30)
    assert guide.ready and names[0].startswith("loraplex-grammar")


def test_without_the_grammar_engine_constraints_are_failed_precondition(backend, monkeypatch):
    monkeypatch.setattr(backend_module, "xgr", None)
    monkeypatch.setattr(backend_module, "IMPORT_ERROR", "ModuleNotFoundError: No module named 'xgrammar'")
    with pytest.raises(GuidedDecodingUnavailableError, match="xgrammar") as exc:
        make_cache(backend).get(Constraint("regex", spec="a"))
    assert status_for(exc.value) is grpc.StatusCode.FAILED_PRECONDITION


def test_the_server_modules_import_when_xgrammar_cannot_be_imported():
    import subprocess
    import sys
    code = ("import sys; sys.modules['xgrammar'] = None\n"  # makes `import xgrammar` raise ImportError
            "from loraplex_server.engine.guided import backend\n"
            "import loraplex_server.api.server\n"
            "assert backend.xgr is None\n"
            "print(backend.IMPORT_ERROR)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ModuleNotFoundError") and "xgrammar" in proc.stdout


# ---------------------------------------------------------------- masking and sampling


def test_choice_guide_allows_only_its_prefixes_then_only_eos(backend, tokenizer):
    guide = compiled_guide(make_cache(backend), Constraint("choice", choices=("yes", "no")))
    bitmask = backend.new_bitmask(1)
    logits = torch.zeros(1, 49152)
    guide.fill(bitmask, 0)
    backend.apply(logits, bitmask, [0])
    allowed = {tokenizer.decode([t]) for t in torch.nonzero(logits[0] > float("-inf")).flatten().tolist()}
    assert allowed and all("yes".startswith(s) or "no".startswith(s) for s in allowed)
    for token in tokenizer.encode("yes", add_special_tokens=False):
        assert guide.accept(token)
    logits = torch.zeros(1, 49152)
    guide.fill(bitmask, 0)
    backend.apply(logits, bitmask, [0])
    assert torch.nonzero(logits[0] > float("-inf")).flatten().tolist() == [tokenizer.eos_token_id]
    assert not guide.accept(tokenizer.encode("x", add_special_tokens=False)[0])


def constrained_row(rid, guide, **sp):
    return Request(rid, [1, 2], SamplingParams(constraint=guide.constraint, **sp), guide=guide)


@pytest.mark.parametrize("logprobs", [0, 2])  # 0: masked in place; 2: on a copy (logprobs are raw)
def test_sampler_masks_constrained_rows_only_and_keeps_others_identical(backend, tokenizer, logprobs):
    cache = make_cache(backend)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 49152, generator=g) * 4
    plain = [Request(f"p{i}", [1, 2], SamplingParams(temperature=0.9 * i, seed=i, logprobs=logprobs))
             for i in range(2)]
    alone = Sampler(torch.device("cpu"))(logits[:2].clone(), plain)
    guides = [compiled_guide(cache, Constraint("regex", spec="[0-9]+")),
              compiled_guide(cache, Constraint("choice", choices=("alpha", "beta")))]
    rows = [plain[0], constrained_row("c0", guides[0]), plain[1], constrained_row("c1", guides[1], temperature=1.0, seed=3)]
    sampler = Sampler(torch.device("cpu"))
    mixed = sampler(torch.stack([logits[0], logits[2], logits[1], logits[3]]), rows)
    assert [mixed.token_ids[0], mixed.token_ids[2]] == alone.token_ids
    assert [mixed.logprobs[0], mixed.logprobs[2]] == alone.logprobs  # raw logprobs, untouched rows
    assert tokenizer.decode([mixed.token_ids[1]]).isdigit()
    assert "alpha".startswith(tokenizer.decode([mixed.token_ids[3]])) or \
        "beta".startswith(tokenizer.decode([mixed.token_ids[3]]))


def test_batches_without_constrained_rows_never_reach_the_mask(monkeypatch):
    import loraplex_server.engine.sampler as sampler_module

    def fail(*args):
        raise AssertionError("mask applied to a batch without constrained rows")
    monkeypatch.setattr(sampler_module, "mask_constrained_rows", fail)
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert Sampler(torch.device("cpu"))(logits, [Request("a", [1], SamplingParams()),
                                                 Request("b", [1], SamplingParams(temperature=1.0, seed=1))]).token_ids[0] == 1


# ---------------------------------------------------------------- the API edge


@pytest.mark.parametrize("fields,expected", [
    ({"json_schema": SCHEMA}, Constraint("json_schema", spec=SCHEMA)),
    ({"regex": "[a-z]+"}, Constraint("regex", spec="[a-z]+")),
    ({"choice": pb.Choice(choices=["a", "b"])}, Constraint("choice", choices=("a", "b"))),
    ({"choice": pb.Choice()}, Constraint("choice")),
    ({"grammar": 'root ::= "x"'}, Constraint("grammar", spec='root ::= "x"')),
    ({"json_object": True}, Constraint("json_object")),
    ({"json_object": False}, None),
    ({}, None),
])
def test_constraint_oneof_converts_to_the_engine_type(fields, expected):
    sp = pb.SamplingParams(**fields)
    assert constraint_from_proto(sp) == expected
    assert sampling_from_proto(sp).constraint == expected


def test_a_compile_failure_from_the_queue_is_invalid_argument_naming_the_field():
    out = RequestOutput("r", (), "", finished=True, finish_reason=FinishReason.ERROR,
                        error=InvalidRequestError("sampling.regex", "does not compile: Unclosed '['"))
    with pytest.raises(InvalidRequestError) as exc:
        check_final(out)
    assert exc.value.field == "sampling.regex" and status_for(exc.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert str(exc.value) == "sampling.regex: does not compile: Unclosed '['"


def test_grammar_metrics_record_compiles_and_cache_lookups():
    from prometheus_client import generate_latest

    from loraplex_server.metrics import StepStats
    metrics = Metrics()
    base = dict(num_seqs=1, num_tokens=1, duration_s=0.01, running=1, waiting=0, kv_blocks_used=1,
                kv_blocks_total=8, adapters_device=0, adapters_cpu=0, adapters_registered=0, device_loads=0,
                device_evictions=0, cpu_loads=0, cpu_evictions=0, preemptions=0)
    metrics.record_step(StepStats(**base, grammar_cache_hits=2, grammar_cache_misses=1, grammar_compile_seconds=(0.2,)))
    metrics.record_step(StepStats(**base, grammar_cache_hits=5, grammar_cache_misses=1))
    body = generate_latest(metrics.registry).decode()
    assert 'loraplex_grammar_cache_total{result="hit"} 5.0' in body
    assert 'loraplex_grammar_cache_total{result="miss"} 1.0' in body
    assert "loraplex_grammar_compile_seconds_count 1.0" in body

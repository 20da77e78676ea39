"""Prefix caching in the block manager and the scheduler (pure Python): which blocks are shared,
what admission charges, eviction order, and that no block leaks."""

from loraplex_server.config import SchedulerConfig
from loraplex_server.engine.kv_blocks import BlockManager, chain_hash, chain_seed
from loraplex_server.engine.request import Request, SamplingParams
from loraplex_server.engine.scheduler import Scheduler

BS = 4


def req(rid, tokens, key=None, max_new=2):
    return Request(rid, list(tokens), SamplingParams(max_new_tokens=max_new), adapter_id=key, adapter_key=key)


def make(num_blocks=32, budget=64, caching=True):
    bm = BlockManager(num_blocks, BS, prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16), bm, max_loras=4), bm


def run(s, *requests):
    """Add ``requests`` and step until they are done (each samples token 7 up to max_new_tokens)."""
    for r in requests:
        s.add(r)
    steps = []
    while s.has_work:
        out = s.schedule()
        steps.append({x.request.request_id: x.num_new_tokens for x in out.scheduled})
        s.after_step(out)
        for x in out.scheduled:
            if x.samples:
                x.request.output_token_ids.append(7)
                if len(x.request.output_token_ids) >= x.request.sampling.max_new_tokens:
                    s.finish(x.request)
    return steps


def assert_no_leak(bm):
    """Every block is free (never cached, or cached and evictable); none is held."""
    assert bm.num_free_blocks == bm.num_blocks
    assert all(r == 0 for r in bm._refs)
    assert set(bm._free).isdisjoint(bm._evictable) and len(bm._free) + len(bm._evictable) == bm.num_blocks
    assert set(bm._hash_of) == set(bm._evictable)


PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks and one token


def test_hash_chain_depends_on_seed_parent_and_tokens():
    base, a1, a2 = chain_seed(None), chain_seed("a@1"), chain_seed("a@2")
    assert len({base, a1, a2}) == 3
    assert chain_hash(a1, [1, 2]) != chain_hash(a2, [1, 2]) != chain_hash(base, [1, 2])
    assert chain_hash(a1, [1, 2]) != chain_hash(a1, [2, 1])
    assert chain_hash(chain_hash(a1, [1]), [2]) != chain_hash(chain_hash(a1, [3]), [2])


def test_second_request_reuses_full_blocks_and_computes_only_the_rest():
    s, bm = make()
    run(s, req("a", PROMPT))
    steps = run(s, req("b", PROMPT[:9] + [1, 2, 3]))  # shares 2 full blocks
    assert steps[0] == {"b": 4}
    assert (bm.query_tokens, bm.hit_tokens) == (13 + 12, 8)
    assert_no_leak(bm)


def test_whole_prompt_cached_still_computes_its_last_token():
    s, bm = make()
    run(s, req("a", PROMPT[:12]))  # exactly 3 full blocks (and its outputs fill no block)
    steps = run(s, req("b", PROMPT[:12]))
    assert steps[0] == {"b": 4}  # only 2 blocks may be taken: the last token is recomputed
    steps = run(s, req("c", PROMPT))  # 13 tokens: a's 3 prompt blocks, one token computed
    assert steps[0] == {"c": 1}
    assert_no_leak(bm)


def test_adapters_and_base_never_share_blocks():
    s, bm = make()
    run(s, req("base", PROMPT))
    for i, key in enumerate(["a@1", "b@1", "a@2"]):
        r = req(f"r{i}", PROMPT, key)
        steps = run(s, r)
        assert steps[0] == {f"r{i}": 13}, key
    assert bm.hit_tokens == 0 and bm.num_cached_blocks == 4 * 3
    steps = run(s, req("again", PROMPT, "a@1"))
    assert steps[0] == {"again": 1} and bm.hit_tokens == 12
    assert_no_leak(bm)


def test_running_requests_share_blocks_with_reference_counts():
    s, bm = make()
    run(s, req("a", PROMPT))
    b, c = req("b", PROMPT, max_new=3), req("c", PROMPT, max_new=3)
    s.add(b)
    s.add(c)
    out = s.schedule()
    s.after_step(out)
    assert b.block_ids[:3] == c.block_ids[:3] and b.block_ids[3] != c.block_ids[3]
    assert [bm._refs[x] for x in b.block_ids[:3]] == [2, 2, 2]
    s.finish(b)
    assert [bm._refs[x] for x in c.block_ids[:3]] == [1, 1, 1]
    s.finish(c)
    assert_no_leak(bm)


def test_scheduler_charges_only_uncached_tokens_against_the_budget():
    s, bm = make(budget=6)
    run(s, req("warm", PROMPT))
    x, y = req("x", PROMPT), req("y", PROMPT[:8] + [9, 9, 9])  # 1 and 3 uncached tokens
    s.add(x)
    s.add(y)
    out = s.schedule()
    assert {o.request.request_id: o.num_new_tokens for o in out.scheduled} == {"x": 1, "y": 3}
    assert all(o.samples for o in out.scheduled)


def test_chunked_prefill_publishes_blocks_as_they_complete():
    s, bm = make(budget=5)
    a = req("a", PROMPT + [1, 2, 3])  # 16 tokens: chunks of 5 cross block boundaries
    s.add(a)
    out = s.schedule()
    s.after_step(out)
    assert bm.num_cached_blocks == 1  # tokens 0..4: one full block
    out = s.schedule()
    s.after_step(out)
    assert bm.num_cached_blocks == 2
    b = req("b", PROMPT)  # arrives mid-prefill: waits for budget, then takes all 3 published blocks
    s.add(b)
    out = s.schedule()
    assert {o.request.request_id: o.num_new_tokens for o in out.scheduled} == {"a": 5}  # budget spent
    s.after_step(out)
    out = s.schedule()
    assert b.num_computed_tokens == 12 and {o.request.request_id: o.num_new_tokens for o in out.scheduled} == {
        "a": 1, "b": 1}


def test_eviction_takes_never_cached_blocks_first_then_least_recently_used():
    s, bm = make(num_blocks=8)
    old = req("old", [1] * 8, max_new=1)
    run(s, old)
    old_head, old_tail = (bm._block_of[h] for h in old.block_hashes[:2])
    run(s, req("new", [2] * 8, max_new=1))
    assert bm.num_cached_blocks == 4 and len(bm._free) == 4
    run(s, req("fill", [3] * 15, max_new=1))  # 4 blocks: the never-cached ones, nothing evicted
    assert bm.num_cached_blocks == 7 and len(bm._free) == 1
    assert next(iter(bm._evictable)) == old_tail
    run(s, req("take", [4] * 7, max_new=1))  # 2 blocks: the last never-cached one, then the LRU cached one
    assert old_tail not in bm._hash_of and old_head in bm._hash_of
    assert run(s, req("new-again", [2] * 9, max_new=1))[0] == {"new-again": 1}  # still cached
    assert run(s, req("old-again", [1] * 9, max_new=1))[0] == {"old-again": 5}  # only its head is left
    assert_no_leak(bm)


def test_lru_order_follows_last_use_and_evicts_a_prompt_tail_before_its_head():
    s, bm = make(num_blocks=6)
    a = req("a", [1] * 12, max_new=1)
    run(s, a)
    head, mid, tail = (bm._block_of[h] for h in a.block_hashes[:3])
    assert list(bm._evictable)[:3] == [tail, mid, head]
    run(s, req("b", [5] * 4, max_new=1))  # one private block
    run(s, req("again", [1] * 5, max_new=1))  # touches the head block: most recent now
    order = list(bm._evictable)
    assert order.index(head) > order.index(tail)


def test_preempted_request_gets_its_own_published_blocks_back():
    s, bm = make(num_blocks=6, budget=64)
    a, b = req("a", [1] * 8, max_new=12), req("b", [2] * 8, max_new=12)
    s.add(a)
    s.add(b)
    while not s.num_preemptions:
        out = s.schedule()
        s.after_step(out)
        for x in out.scheduled:
            if x.samples:
                x.request.output_token_ids.append(7)
    assert b.block_ids == [] and b.num_computed_tokens == 0
    s.finish(a)
    hits = bm.hit_tokens
    out = s.schedule()
    assert out.scheduled[0].request is b
    assert bm.hit_tokens - hits == 8  # its prompt blocks; a's one more block evicted b's tail (LRU)
    s.finish(b)
    assert_no_leak(bm)


def test_dropping_a_version_forgets_only_its_blocks():
    s, bm = make()
    run(s, req("x", PROMPT, "a@1"), req("y", PROMPT, "b@1"))
    assert bm.num_cached_blocks == 6
    assert bm.drop_cached("a@1") == 3
    assert bm.num_cached_blocks == 3 and bm.lookup(req("z", PROMPT, "a@1")).num_tokens == 0
    assert bm.lookup(req("w", PROMPT, "b@1")).num_tokens == 12
    assert_no_leak(bm)


def test_caching_off_shares_nothing_and_counts_nothing():
    s, bm = make(caching=False)
    run(s, req("a", PROMPT))
    steps = run(s, req("b", PROMPT))
    assert steps[0] == {"b": 13}
    assert (bm.query_tokens, bm.hit_tokens, bm.num_cached_blocks) == (0, 0, 0)
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_caching_setting_from_flag_toml_and_env(tmp_path):
    import pytest

    from loraplex_server.cli import build_parser, flag_values
    from loraplex_server.config import load_config

    assert load_config(environ={}).engine.cache.prefix_caching is True  # default on
    toml = tmp_path / "c.toml"
    toml.write_text("[cache]\nprefix_caching = false\n")
    assert load_config(config_file=toml, environ={}).engine.cache.prefix_caching is False
    toml.write_text('[cache]\nprefix_caching = "on"\n')
    assert load_config(config_file=toml, environ={}).engine.cache.prefix_caching is True
    env = {"LORAPLEX_PREFIX_CACHING": "off"}
    assert load_config(config_file=toml, environ=env).engine.cache.prefix_caching is False
    flags = flag_values(build_parser().parse_args(["--prefix-caching", "on"]))
    assert load_config(flags, environ=env).engine.cache.prefix_caching is True
    with pytest.raises(ValueError, match="on or off"):
        load_config(environ={"LORAPLEX_PREFIX_CACHING": "sometimes"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prefix-caching", "maybe"])

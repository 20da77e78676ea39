"""The OpenAI-compatible HTTP API through the official ``openai`` SDK, against ONE real server on
port 0 (module scope, keys file with three tenants): same engine and answers as the gRPC path."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import openai
import pytest

from helpers import ASSETS, engine_config, fresh_loaded, key_entry
from loraplex import Client
from loraplex_server.api.server import LoraplexServer
from loraplex_server.config import Config, ServerConfig
from loraplex_server.engine.engine import LLMEngine

KEYS = {"admin": "admin-key-0123456789", "acme": "acme-key-0123456789", "beta": "beta-key-0123456789"}
BASE = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a fruit."}]


class Running:
    """LoraplexServer on its own asyncio loop thread."""

    def __init__(self, config: Config, factory):
        self.server = LoraplexServer(config, factory)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self) -> LLMEngine:
        return self.server.state.loop.engine

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.server.http_port}{path}"


@pytest.fixture(scope="module")
def srv(model_dir, tokenizer, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text("".join(key_entry(k, t, "admin" if t == "admin" else "tenant") for t, k in KEYS.items())
                    + "[tenants.beta]\nmax_concurrent = 1\n")
    engine = engine_config(max_loras=2, max_rank=16)
    engine = replace(engine, lora=replace(engine.lora, adapter_root=ASSETS / "adapters"))
    server = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, http_port=0, grace_period_s=1,
                          adapters=(("upper", "upper"), ("json", "json")), keys_file=keys)
    running = Running(Config(engine=engine, server=server),
                      lambda cfg: LLMEngine(cfg, loaded=fresh_loaded(model_dir, tokenizer)))
    running.run(running.server.start())
    running.run(running.server.wait_ready())
    yield running
    running.run(running.server.stop(0))
    running.loop.call_soon_threadsafe(running.loop.stop)


def sdk(srv, tenant="admin", key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url("/v1"), api_key=key or KEYS[tenant], max_retries=0, timeout=60)


def grpc_client(srv, tenant="admin") -> Client:
    return Client(f"127.0.0.1:{srv.server.port}", timeout=60, retries=0, api_key=KEYS[tenant])


def post(srv, path: str, body: dict, tenant: str) -> tuple[int, str]:
    request = urllib.request.Request(srv.url(path), data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {KEYS[tenant]}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_idle(engine, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while (engine.requests or engine.blocks.num_free_blocks != engine.blocks.num_blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.requests and engine.blocks.num_free_blocks == engine.blocks.num_blocks


# ---- answers equal the gRPC path -----------------------------------------------------------
@pytest.mark.parametrize("model", [BASE, "upper"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_completions_equal_grpc_token_for_token(srv, model, sampling):
    with grpc_client(srv) as g:
        ref = g.generate(PROMPT, adapter_id="" if model == BASE else model, max_new_tokens=6, logprobs=1,
                         **{k: v for k, v in sampling.items()})
    got = sdk(srv).completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=0, **sampling)
    choice = got.choices[0]
    assert choice.text == ref.text
    assert choice.logprobs.tokens == [srv.engine.loaded.tokenizer.decode([t]) for t in ref.token_ids]
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
    assert got.usage.completion_tokens == ref.usage.completion_tokens
    assert choice.finish_reason == ("length" if ref.usage.completion_tokens == 6 else "stop")
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens and got.model == model


def test_chat_streams_equal_grpc_with_usage_and_logprobs(srv):
    with grpc_client(srv) as g:
        ref = g.generate(messages=[("user", "Name a fruit.")], adapter_id="json", max_new_tokens=6, logprobs=2)
    stream = sdk(srv).chat.completions.create(model="json", messages=CHAT, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tops = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert text == ref.text and len(tops) == len(ref.token_ids)
    assert all(len(t.top_logprobs) == 2 for t in tops)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_async_sdk_two_adapters_at_once(srv):
    async def run():
        client = openai.AsyncOpenAI(base_url=srv.url("/v1"), api_key=KEYS["admin"], max_retries=0)
        whole = client.chat.completions.create(model="upper", messages=CHAT, max_tokens=5, temperature=0)
        streamed = await client.completions.create(model="json", prompt=PROMPT, max_tokens=5, temperature=0,
                                                   stream=True)
        parts = [c.choices[0].text async for c in streamed]
        return await whole, "".join(parts)
    whole, text = asyncio.run(run())
    with grpc_client(srv) as g:
        assert whole.choices[0].message.content == g.generate(messages=[("user", "Name a fruit.")],
                                                              adapter_id="upper", max_new_tokens=5).text
        assert text == g.generate(PROMPT, adapter_id="json", max_new_tokens=5).text


def test_n_choices_stop_strings_and_prompt_lists(srv):
    got = sdk(srv).completions.create(model=BASE, prompt=["Once upon a time", "My favourite animal is"],
                                      n=3, max_tokens=8, temperature=1.0, seed=3, stop=["."])
    assert [c.index for c in got.choices] == list(range(6))
    assert all("." not in c.text for c in got.choices)
    assert len({c.text for c in got.choices[:3]}) > 1  # seeded choices differ from each other
    again = sdk(srv).completions.create(model=BASE, prompt=["Once upon a time", "My favourite animal is"],
                                        n=3, max_tokens=8, temperature=1.0, seed=3, stop=["."])
    assert [c.text for c in again.choices] == [c.text for c in got.choices]
    assert 6 <= got.usage.completion_tokens <= 48 and got.usage.prompt_tokens > 2  # the prompt counted once per prompt
    chat = sdk(srv).chat.completions.create(model="upper", messages=CHAT, n=3, max_tokens=3, temperature=1,
                                            stream=True)
    indices = {c.choices[0].index for c in chat if c.choices}
    assert indices == {0, 1, 2}


def test_structured_output_response_format_and_guided_choice(srv):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    got = sdk(srv).chat.completions.create(
        model=BASE, messages=CHAT, max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert isinstance(json.loads(got.choices[0].message.content)["a"], int)
    choice = sdk(srv).completions.create(model=BASE, prompt="Yes or no?", max_tokens=4, temperature=0,
                                         extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")


# ---- models, tenancy, admin ----------------------------------------------------------------
def test_models_and_adapter_admin_per_tenant(srv):
    acme = sdk(srv, "acme")
    assert {m.id for m in sdk(srv).models.list()} == {BASE, "upper", "json"}
    admin_body = {"lora_name": "acme/mine", "lora_path": "upper"}
    assert post(srv, "/v1/load_lora_adapter", admin_body, "acme")[0] == 200
    models = {m.id: m for m in acme.models.list()}
    assert set(models) == {BASE, "upper", "json", "acme/mine"} and models["acme/mine"].parent == BASE
    assert {m.id for m in sdk(srv, "beta").models.list()} == {BASE, "upper", "json"}
    with pytest.raises(openai.NotFoundError) as exc:  # another tenant's adapter: not found, never 403
        sdk(srv, "beta").completions.create(model="acme/mine", prompt="hi", max_tokens=1)
    assert exc.value.code == "model_not_found"
    assert acme.completions.create(model="acme/mine", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    status, body = post(srv, "/v1/load_lora_adapter", admin_body, "beta")
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"
    assert post(srv, "/v1/unload_lora_adapter", {"lora_name": "acme/mine"}, "acme")[0] == 200
    assert "acme/mine" not in {m.id for m in acme.models.list()}


# ---- errors --------------------------------------------------------------------------------
def test_error_statuses_in_openai_shape(srv):
    admin = sdk(srv)
    with pytest.raises(openai.AuthenticationError):
        sdk(srv, key="not-a-key").models.list()
    with pytest.raises(openai.NotFoundError) as exc:
        admin.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    for kwargs, param in [(dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
                          (dict(top_p=5), "top_p"), (dict(max_tokens=0), "max_tokens"),
                          (dict(extra_body={"made_up": 1}), "made_up")]:
        with pytest.raises(openai.BadRequestError) as exc:
            admin.chat.completions.create(model=BASE, messages=CHAT, **{"max_tokens": 1, **kwargs})
        assert exc.value.param == param and param in exc.value.message
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError) as exc:
        admin.chat.completions.create(model=BASE, messages=image, max_tokens=1)
    assert exc.value.param == "messages[0].content[0].type"


def test_conflict_rate_limit_unavailable_and_internal(srv, monkeypatch):
    admin, beta = sdk(srv), sdk(srv, "beta")
    with admin.completions.create(model=BASE, prompt="Count:", max_tokens=200, stream=True, extra_body={
            "ignore_eos": True}, extra_headers={"X-Request-Id": "dup"}) as stream:
        next(iter(stream))
        with pytest.raises(openai.ConflictError):
            admin.completions.create(model=BASE, prompt="x", max_tokens=1, extra_headers={"X-Request-Id": "dup"})
    with beta.completions.create(model=BASE, prompt="Count:", max_tokens=200, stream=True,
                                 extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as exc:  # max_concurrent = 1
            beta.completions.create(model=BASE, prompt="x", max_tokens=1)
        assert int(exc.value.response.headers["retry-after"]) >= 1
    loop = srv.server.state.loop
    monkeypatch.setattr(loop, "submit", lambda *a, **k: 1 / 0)
    with pytest.raises(openai.InternalServerError) as exc:
        admin.completions.create(model=BASE, prompt="x", max_tokens=1, extra_headers={"X-Request-Id": "boom"})
    assert exc.value.status_code == 500 and "request id boom" in exc.value.message
    monkeypatch.undo()
    srv.server.state.draining = True
    try:
        with pytest.raises(openai.APIStatusError) as exc:
            admin.completions.create(model=BASE, prompt="x", max_tokens=1)
        assert exc.value.status_code == 503
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(srv.url("/ready"))
        assert ready.value.code == 503
    finally:
        srv.server.state.draining = False
    wait_idle(srv.engine)


def test_disconnect_mid_stream_frees_kv_and_metrics_carry_the_frontend(srv):
    admin = sdk(srv)
    for stream in (True, False):
        if stream:
            with admin.completions.create(model="upper", prompt="Count:", max_tokens=400, stream=True,
                                          extra_body={"ignore_eos": True}) as s:
                next(iter(s))
        else:
            with pytest.raises(openai.APITimeoutError):
                admin.with_options(timeout=0.5).completions.create(
                    model="upper", prompt="Count:", max_tokens=400, extra_body={"ignore_eos": True})
        wait_idle(srv.engine)
    registry = srv.server.state.metrics.registry
    ok = registry.get_sample_value("loraplex_requests_total", {"method": "Generate", "status": "OK",
                                                                "adapter": "upper", "frontend": "http"})
    cancelled = registry.get_sample_value("loraplex_requests_total", {
        "method": "GenerateStream", "status": "CANCELLED", "adapter": "upper", "frontend": "http"})
    assert ok >= 1 and cancelled >= 1
    assert urllib.request.urlopen(srv.url("/health")).status == 200
    assert urllib.request.urlopen(srv.url("/ready")).status == 200


def test_bench_openai_backend_drives_the_http_api(srv):
    from loraplex.bench import BenchConfig, run_bench

    config = dict(api_key=KEYS["admin"], concurrency=2, num_requests=4, warmup=0, adapters=["", "upper"],
                  prompt_len="fixed:8", output_len="fixed:3")
    http = run_bench(BenchConfig(target=f"127.0.0.1:{srv.server.http_port}", backend="openai", **config))
    grpc = run_bench(BenchConfig(target=f"127.0.0.1:{srv.server.port}", backend="grpc", **config))
    for result in (http, grpc):
        assert (result.completed, result.output_tokens, result.short_outputs) == (4, 12, 0)
        assert result.ttft.p50 is not None and result.ttft.p50 > 0

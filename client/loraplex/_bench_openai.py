"""``loraplex bench --backend openai``: the same requests over the OpenAI-compatible HTTP API.

Each request is a streamed ``POST /v1/completions`` (prompt = the planned token ids, greedy,
``ignore_eos``, ``stream_options.include_usage``) on one shared aiohttp session, as ``vllm bench
serve`` does. TTFT = first SSE chunk with a choice; output tokens from the usage chunk. aiohttp is
imported only here, when a run starts (the ``bench`` extra: ``pip install 'loraplex[bench]'``; the
gRPC backend does not need it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Self

HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def import_aiohttp() -> Any:
    """The aiohttp module, or an ImportError that says how to install it."""
    try:
        import aiohttp
    except ImportError as exc:
        raise ImportError("`loraplex bench --backend openai` needs aiohttp: "
                          "pip install 'loraplex[bench]' (or pip install aiohttp)") from exc
    return aiohttp


def base_url(target: str) -> str:
    """``host:port`` or a URL -> ``http://host:port`` (no trailing slash, no ``/v1``)."""
    url = target if "://" in target else f"http://{target}"
    return url.rstrip("/").removesuffix("/v1")


class OpenAISender:
    """Async context manager: ``await sender.send(plan, record)`` fills ``record`` in."""

    def __init__(self, target: str, api_key: str | None, timeout_s: float | None,
                 now: Callable[[], float] = time.perf_counter):
        self.url = base_url(target)
        self.now = now  # the bench's clock: chunk times are ``now() - t0``
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.session: Any = None
        self.base_model = ""

    async def __aenter__(self) -> Self:
        aiohttp = import_aiohttp()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self.session.get(f"{self.url}/v1/models", headers=self.headers) as resp:
                models = (await resp.json())["data"] if resp.status == 200 else []
        except Exception:  # noqa: BLE001 - every request will then fail and be counted
            models = []
        self.base_model = next((m["id"] for m in models if not m.get("parent")), "")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def send(self, plan, record, t0: float) -> None:
        body = {"model": plan.adapter_id or self.base_model, "prompt": list(plan.token_ids),
                "max_tokens": plan.max_new_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with self.session.post(f"{self.url}/v1/completions", json=body, headers=self.headers) as resp:
            if resp.status != 200:
                record.error = "HTTPError"
                record.error_code = HTTP_CODES.get(resp.status, f"HTTP_{resp.status}")
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                self._chunk(json.loads(data), record, t0)

    def _chunk(self, chunk: dict, record, t0: float) -> None:
        if "error" in chunk:
            record.error, record.error_code = "StreamError", chunk["error"].get("code", "").upper() or "INTERNAL"
            return
        if chunk.get("choices"):
            now = self.now() - t0
            if record.first_token_s is None:
                record.first_token_s = now
            record.chunk_times_s.append(now)
        if chunk.get("usage"):
            record.output_tokens = chunk["usage"]["completion_tokens"]

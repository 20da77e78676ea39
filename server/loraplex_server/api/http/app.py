"""The FastAPI app (routes) and ``HttpFrontEnd``: uvicorn serving it on the running asyncio loop.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (see
``routes_completions``), vLLM's ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``,
``GET /health`` (200 only while SERVING) and ``GET /ready``. Every route authenticates with
``Authorization: Bearer <key>`` against the same KeyStore as gRPC and calls the shared service layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ...errors import InvalidRequestError, LoraplexError
from ...lora.ids import AdapterId
from .. import convert
from ..calls import Call, ServingState, open_call
from ..service import LoraplexService
from .errors import error_response
from .routes_completions import generation_response
from .schemas import parse_json


def _metadata(request: Request) -> list[tuple[str, str]]:
    return [("authorization", value) for value in request.headers.getlist("authorization")]


def _authenticated(state: ServingState, request: Request, method: str, adapter_id: str = "") -> Call | Response:
    """A Call, or the 401 response for a missing or unknown key."""
    try:
        return open_call(method, state, _metadata(request), adapter_id, frontend="http")
    except LoraplexError as exc:
        status = 401
        return JSONResponse({"error": {"message": str(exc), "type": "authentication_error", "param": None,
                                       "code": "invalid_api_key"}}, status_code=status)


def _admin_body(raw: bytes, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    body = parse_json(raw)
    for name in body:
        if name not in required + optional:
            raise InvalidRequestError(name, "is not a supported field")
    for name in required:
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidRequestError(name, "is required (a string)")
    return body


def build_app(state: ServingState, serving: Callable[[], bool]) -> FastAPI:
    """``serving()`` is the gRPC health status (SERVING) that ``/health`` reports."""
    service = LoraplexService(state)
    app = FastAPI(title="Loraplex OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown route, wrong method
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": str(exc.status_code)}}, status_code=exc.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        call = _authenticated(state, request, "Generate")
        return call if isinstance(call, Response) else \
            await generation_response(request, service, call, await request.body(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        call = _authenticated(state, request, "Generate")
        return call if isinstance(call, Response) else \
            await generation_response(request, service, call, await request.body(), chat=True)

    _model_routes(app, state, service)
    _probe_routes(app, state, serving)
    return app


def _model_routes(app: FastAPI, state: ServingState, service: LoraplexService) -> None:
    """``/v1/models`` and vLLM's adapter admin routes."""
    started = int(time.time())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        call = _authenticated(state, request, "ListAdapters")
        if isinstance(call, Response):
            return call
        try:
            base = service.model_name()
            visible, _ = await service.list_adapters(call)
        except Exception as exc:  # noqa: BLE001
            return error_response(call.failure(exc))
        call.ok()
        data = [{"id": base, "object": "model", "created": started, "owned_by": "loraplex", "root": base,
                 "parent": None}]
        data += [{"id": i.meta.adapter_id, "object": "model", "created": started, "owned_by": i.owner or "loraplex",
                  "root": str(i.meta.source), "parent": base} for i in visible]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        return await _admin(state, service, request, "LoadAdapter", ("lora_name", "lora_path"), ("pin",))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        return await _admin(state, service, request, "UnloadAdapter", ("lora_name",), ("lora_int_id",))


async def _admin(state: ServingState, service: LoraplexService, request: Request, method: str,
                 required: tuple[str, ...], optional: tuple[str, ...]) -> Response:
    call = _authenticated(state, request, method)
    if isinstance(call, Response):
        return call
    try:
        body = _admin_body(await request.body(), required, optional)
        call.adapter_id = adapter_id = AdapterId(convert.check_id("lora_name", body["lora_name"]))
        if method == "LoadAdapter":
            await service.load_adapter(call, adapter_id, body["lora_path"], pin=body.get("pin") is True)
            message = f"Success: LoRA adapter '{adapter_id}' added successfully."
        else:
            await service.unload_adapter(call, adapter_id)
            message = f"Success: LoRA adapter '{adapter_id}' removed successfully."
    except Exception as exc:  # noqa: BLE001
        return error_response(call.failure(exc))
    call.ok()
    return PlainTextResponse(message)


def _probe_routes(app: FastAPI, state: ServingState, serving: Callable[[], bool]) -> None:
    @app.get("/health")
    async def health() -> Response:
        ok = serving()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready() -> Response:
        status = "draining" if state.draining else "loading" if state.loop is None else "ready"
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

"""Synchronous and asyncio clients for the Loraplex gRPC API.

    from loraplex import Client

    with Client("localhost:50051") as client:
        print(client.generate("Hello", adapter_id="upper", max_new_tokens=16).text)
        for chunk in client.generate_stream("Hello"):
            print(chunk.text, end="", flush=True)

Every gRPC failure is raised as a :class:`loraplex.errors.LoraplexError` subclass. Only the
idempotent calls (``list_adapters``, ``server_info``, ``health``, ``unload_adapter``) are retried,
and only on ``UNAVAILABLE``, with exponential backoff inside the call's overall deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex._convert import (
    adapter_info_from_proto,
    generate_result_from_proto,
    server_info_from_proto,
    serving_status_name,
    stream_chunk_from_proto,
)
from loraplex._request import MessageLike, build_generate_request
from loraplex._retry import RetryPolicy, deadline_after, remaining
from loraplex._version import __version__
from loraplex.errors import from_rpc_error
from loraplex.types import AdapterInfo, GenerateResult, ServerInfo, StreamChunk
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_TARGET", "AsyncClient", "Client"]

DEFAULT_TARGET = "localhost:50051"
Metadata = Mapping[str, str] | Sequence[tuple[str, str]]


def _call_metadata(metadata: Metadata | None, api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata sent with every call: the caller's pairs plus ``authorization: Bearer``.

    Keys are lowercased (gRPC requires it); values of ``-bin`` keys stay bytes.
    """
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    pairs = [(key, value if key.endswith("-bin") else str(value))
             for key, value in ((str(k).lower(), v) for k, v in items)]
    if api_key:
        if any(key == "authorization" for key, _ in pairs):
            raise ValueError("give api_key or an 'authorization' metadata entry, not both")
        pairs.append(("authorization", f"Bearer {api_key}"))
    return tuple(pairs)


class _Settings:
    """What the sync and async clients share: deadlines, retry policy, metadata, channel options."""

    def __init__(self, target: str, timeout: float | None, retries: int,
                 metadata: Metadata | None, api_key: str | None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.target = target
        self.timeout = timeout
        self.retry = RetryPolicy(retries=retries)
        self.metadata = _call_metadata(metadata, api_key)
        self.options = (("grpc.primary_user_agent", f"loraplex-python/{__version__}"),)

    def deadline(self, timeout: float | None) -> float | None:
        """The monotonic deadline of a call: its own ``timeout``, else the client default."""
        return deadline_after(self.timeout if timeout is None else timeout)


def _list_adapters(response: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [adapter_info_from_proto(item) for item in response.adapters]


class Client:
    """A blocking client.

    Args:
        target: ``host:port`` of the server.
        timeout: default deadline in seconds for every call (``None``: no deadline); a call's
            own ``timeout`` overrides it and bounds all of that call's retries together.
        retries: extra attempts for idempotent calls that fail with ``UNAVAILABLE``.
        metadata: extra gRPC metadata sent with every call (keys are lowercased).
        api_key: sent as ``authorization: Bearer <key>``.
        credentials: ``grpc.ChannelCredentials`` for TLS; ``None`` uses a plaintext channel.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 retries: int = 3, metadata: Metadata | None = None, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._settings = _Settings(target, timeout, retries, metadata, api_key)
        options = self._settings.options
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.LoraplexServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._settings.target

    def _call(self, method: Callable[..., Any], request: Any, *, idempotent: bool,
              timeout: float | None) -> Any:
        """Run a unary call, retrying idempotent ones on UNAVAILABLE; map every RpcError."""
        deadline = self._settings.deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=remaining(deadline), metadata=self._settings.metadata)
            except grpc.RpcError as err:
                delay = self._settings.retry.next_delay(err, attempt, idempotent, deadline)
                if delay is None:
                    raise from_rpc_error(err) from err
            time.sleep(delay)
            attempt += 1

    def generate(
        self, prompt: str | None = None, *, messages: Iterable[MessageLike] | None = None,
        token_ids: Sequence[int] | None = None, adapter_id: str = "",
        max_new_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None,
        repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
        ignore_eos: bool = False, logprobs: int = 0, request_id: str = "",
        json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
        choice: Sequence[str] | None = None, grammar: str | None = None, json_object: bool = False,
        timeout: float | None = None,
    ) -> GenerateResult:
        """Generate a completion and return it whole.

        Give exactly one of ``prompt``, ``messages`` (``ChatMessage``, ``(role, content)`` pairs
        or ``{"role", "content"}`` dicts, rendered with the model's chat template) or
        ``token_ids``; otherwise ``ValueError``. ``adapter_id=""`` is the base model. Sampling
        arguments left as ``None`` take the server's defaults. Never retried.

        Structured output (at most one): ``json_schema`` (a JSON Schema as text or a dict),
        ``regex`` (the whole output matches it), ``choice`` (exactly one of these strings),
        ``grammar`` (EBNF with a ``root`` rule) or ``json_object=True`` (any JSON object). A
        constraint the server cannot compile raises ``InvalidArgumentError``; if
        ``max_new_tokens`` runs out first, ``finish_reason`` is ``length`` and the text is a prefix.
        """
        request = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter_id=adapter_id,
            request_id=request_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
            stop_token_ids=stop_token_ids, seed=seed, ignore_eos=ignore_eos, logprobs=logprobs,
            json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, json_object=json_object)
        response = self._call(self._stub.Generate, request, idempotent=False, timeout=timeout)
        return generate_result_from_proto(response)

    def generate_stream(
        self, prompt: str | None = None, *, messages: Iterable[MessageLike] | None = None,
        token_ids: Sequence[int] | None = None, adapter_id: str = "",
        max_new_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None,
        repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
        ignore_eos: bool = False, logprobs: int = 0, request_id: str = "",
        json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
        choice: Sequence[str] | None = None, grammar: str | None = None, json_object: bool = False,
        timeout: float | None = None,
    ) -> Iterator[StreamChunk]:
        """Generate a completion as a stream of deltas (arguments as :meth:`generate`).

        Arguments are checked now; the RPC starts on the first ``next()``. The last chunk carries
        ``finish_reason`` and ``usage``. Closing the iterator early (``close()``, or dropping it
        after ``break``) cancels the RPC, which aborts the request on the server.
        """
        request = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter_id=adapter_id,
            request_id=request_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
            stop_token_ids=stop_token_ids, seed=seed, ignore_eos=ignore_eos, logprobs=logprobs,
            json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, json_object=json_object)
        return self._stream(request, timeout)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        call = self._stub.GenerateStream(request, timeout=remaining(self._settings.deadline(timeout)),
                                         metadata=self._settings.metadata)
        try:
            for response in call:
                yield stream_chunk_from_proto(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # a no-op once the stream has ended

    def load_adapter(self, adapter_id: str, source: str, pin: bool = False, *,
                     timeout: float | None = None) -> AdapterInfo:
        """Register (or replace) ``adapter_id`` from ``source``, a directory under the server's
        adapter root; ``pin`` keeps it in a device slot. Not retried."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=source, pin=pin)
        response = self._call(self._stub.LoadAdapter, request, idempotent=False, timeout=timeout)
        return adapter_info_from_proto(response.adapter)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        """Unregister ``adapter_id``: running requests finish, new ones get ``NotFoundError``."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        self._call(self._stub.UnloadAdapter, request, idempotent=True, timeout=timeout)

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every registered adapter."""
        response = self._call(self._stub.ListAdapters, pb.ListAdaptersRequest(), idempotent=True,
                              timeout=timeout)
        return _list_adapters(response)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served model and the server's limits."""
        response = self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(),
                              idempotent=True, timeout=timeout)
        return server_info_from_proto(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status of ``service`` (``""``: the whole server), e.g.
        ``"SERVING"`` or ``"NOT_SERVING"``; an unknown service raises ``NotFoundError``."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, idempotent=True, timeout=timeout)
        return serving_status_name(response.status)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self._settings.target!r})"


class AsyncClient:
    """The asyncio twin of :class:`Client` (same arguments, methods are coroutines).

    Create it inside a running event loop; ``generate_stream`` returns an async iterator.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 retries: int = 3, metadata: Metadata | None = None, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._settings = _Settings(target, timeout, retries, metadata, api_key)
        options = self._settings.options
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.LoraplexServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._settings.target

    async def _call(self, method: Callable[..., Any], request: Any, *, idempotent: bool,
                    timeout: float | None) -> Any:
        """Run a unary call, retrying idempotent ones on UNAVAILABLE; map every RpcError."""
        deadline = self._settings.deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=remaining(deadline),
                                    metadata=self._settings.metadata)
            except grpc.RpcError as err:  # grpc.aio.AioRpcError is one
                delay = self._settings.retry.next_delay(err, attempt, idempotent, deadline)
                if delay is None:
                    raise from_rpc_error(err) from err
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(
        self, prompt: str | None = None, *, messages: Iterable[MessageLike] | None = None,
        token_ids: Sequence[int] | None = None, adapter_id: str = "",
        max_new_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None,
        repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
        ignore_eos: bool = False, logprobs: int = 0, request_id: str = "",
        json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
        choice: Sequence[str] | None = None, grammar: str | None = None, json_object: bool = False,
        timeout: float | None = None,
    ) -> GenerateResult:
        """See :meth:`Client.generate`."""
        request = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter_id=adapter_id,
            request_id=request_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
            stop_token_ids=stop_token_ids, seed=seed, ignore_eos=ignore_eos, logprobs=logprobs,
            json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, json_object=json_object)
        response = await self._call(self._stub.Generate, request, idempotent=False, timeout=timeout)
        return generate_result_from_proto(response)

    def generate_stream(
        self, prompt: str | None = None, *, messages: Iterable[MessageLike] | None = None,
        token_ids: Sequence[int] | None = None, adapter_id: str = "",
        max_new_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None,
        repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
        ignore_eos: bool = False, logprobs: int = 0, request_id: str = "",
        json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
        choice: Sequence[str] | None = None, grammar: str | None = None, json_object: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """See :meth:`Client.generate_stream`; use ``async for``. ``aclose()`` (or cancelling the
        consuming task) cancels the RPC."""
        request = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter_id=adapter_id,
            request_id=request_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
            stop_token_ids=stop_token_ids, seed=seed, ignore_eos=ignore_eos, logprobs=logprobs,
            json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, json_object=json_object)
        return self._stream(request, timeout)

    async def _stream(self, request: pb.GenerateRequest,
                      timeout: float | None) -> AsyncIterator[StreamChunk]:
        call = self._stub.GenerateStream(request, timeout=remaining(self._settings.deadline(timeout)),
                                         metadata=self._settings.metadata)
        try:
            async for response in call:
                yield stream_chunk_from_proto(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def load_adapter(self, adapter_id: str, source: str, pin: bool = False, *,
                           timeout: float | None = None) -> AdapterInfo:
        """See :meth:`Client.load_adapter`."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=source, pin=pin)
        response = await self._call(self._stub.LoadAdapter, request, idempotent=False,
                                    timeout=timeout)
        return adapter_info_from_proto(response.adapter)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        """See :meth:`Client.unload_adapter`."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        await self._call(self._stub.UnloadAdapter, request, idempotent=True, timeout=timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """See :meth:`Client.list_adapters`."""
        response = await self._call(self._stub.ListAdapters, pb.ListAdaptersRequest(),
                                    idempotent=True, timeout=timeout)
        return _list_adapters(response)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """See :meth:`Client.server_info`."""
        response = await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(),
                                    idempotent=True, timeout=timeout)
        return server_info_from_proto(response)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """See :meth:`Client.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request, idempotent=True, timeout=timeout)
        return serving_status_name(response.status)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self._settings.target!r})"

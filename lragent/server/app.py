"""The FastAPI app: OpenAI endpoints, vLLM-style adapter management, health and Prometheus metrics."""

from __future__ import annotations

import copy
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from lragent.engine.llm_engine import LLMEngine
from lragent.lora.adapter import AdapterError
from lragent.server.engine_loop import AsyncEngine
from lragent.server.errors import APIError, bad_request, install_handlers
from lragent.server.metrics import CONTENT_TYPE, ServerMetrics
from lragent.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRARequest,
    UnloadLoRARequest,
    parse_body,
)
from lragent.server.serving import OpenAIServing

DRAIN_FACTOR = 4  # an oversize body is read (and dropped) up to this many times the limit, so the client sees the 413


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str | None = None  # default: the engine's model argument
    api_key: str | None = None  # bearer token required on /v1/* when set
    max_body_bytes: int = 16 << 20
    max_choices: int = 64  # prompts x n per request
    allow_runtime_lora: bool = True  # /v1/load_lora_adapter and /v1/unload_lora_adapter


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes (413) and malformed JSON (400)."""
    declared = request.headers.get("content-length")
    oversize = declared is not None and declared.isdigit() and int(declared) > limit
    body, seen = bytearray(), 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            oversize = oversize or seen > limit
            if not oversize:
                body += chunk
            elif seen > DRAIN_FACTOR * limit:
                break
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request body") from None
    if oversize:
        raise APIError(
            413, f"the request body is larger than the server's limit of {limit} bytes", None, "request_too_large"
        )
    if not body:
        raise bad_request("the request body is empty: expected a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"malformed JSON in the request body: {exc}") from None


def _tokenizer_copy(tokenizer):
    """The HTTP side gets its own tokenizer: the engine thread uses the engine's concurrently."""
    return None if tokenizer is None else copy.deepcopy(tokenizer)


def create_app(engine: LLMEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    name = settings.served_model_name or engine.config.model
    metrics = ServerMetrics(name, engine.scheme.mode.value, engine.config.block_size)
    loop = AsyncEngine(engine, metrics)
    serving = OpenAIServing(loop, _tokenizer_copy(engine.tokenizer), name, {engine.config.model}, settings.max_choices)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="lragent", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine_loop, app.state.metrics, app.state.settings = loop, metrics, settings
    install_handlers(app, on_error=lambda status: metrics.http_errors.labels(str(status)).inc())

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    async def body_of(request: Request, model):
        return parse_body(model, await read_json(request, settings.max_body_bytes))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(await body_of(request, ChatCompletionRequest), request)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await serving.completion(await body_of(request, CompletionRequest), request)

    @v1.get("/models")
    async def models() -> JSONResponse:
        card = {"object": "model", "created": created, "owned_by": "lragent", "max_model_len": loop.max_model_len}
        data = [{"id": name, "root": engine.config.model, "parent": None, **card}]
        data += [{"id": a, "root": path, "parent": name, **card} for a, path in sorted(loop.adapter_paths.items())]
        return JSONResponse({"object": "list", "data": data})

    def runtime_lora() -> None:
        if not settings.allow_runtime_lora:
            raise APIError(403, "loading and unloading adapters at runtime is disabled on this server")

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        runtime_lora()
        body = await body_of(request, LoadLoRARequest)
        if body.lora_name in serving.aliases:
            raise bad_request(f"{body.lora_name!r} is the base model's name", "lora_name")
        try:
            await loop.load_adapter(body.lora_name, body.lora_path)
        except (AdapterError, ValueError, KeyError, OSError) as exc:
            raise bad_request(f"cannot load adapter {body.lora_name!r}: {exc}", "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        runtime_lora()
        body = await body_of(request, UnloadLoRARequest)
        if body.lora_name not in loop.adapter_paths:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name", "model_not_found")
        try:
            await loop.unload_adapter(body.lora_name)
        except AdapterError as exc:
            raise APIError(409, str(exc), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not loop.alive:
            raise APIError(503, "the engine loop is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if loop.alive:
            metrics.update_engine(await loop.stats(), len(loop.adapter_paths))
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app

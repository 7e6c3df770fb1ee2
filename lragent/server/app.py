"""The FastAPI app: OpenAI endpoints, vLLM-style adapter management, health and Prometheus metrics."""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from lragent.engine.llm_engine import LLMEngine
from lragent.lora.adapter import AdapterError
from lragent.server.engine_loop import AsyncEngine
from lragent.server.errors import APIError, bad_request, install_handlers
from lragent.server.guard import check_adapter_name, decode_json, resolve_inside, scrub_paths, shown
from lragent.server.metrics import CONTENT_TYPE, ServerMetrics
from lragent.server.protocol import (
    SESSION_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRARequest,
    UnloadLoRARequest,
    parse_body,
    session_of,
)
from lragent.server.responses_api import ResponsesRequest, create_response
from lragent.server.serving import OpenAIServing
from lragent.server.shutdown import Admission, AdmissionMiddleware
from lragent.server.tools import PARSERS

log = logging.getLogger("lragent.server")
DRAIN_FACTOR = 4  # an oversize body is read (and dropped) up to this many times the limit, so the client sees the 413


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str | None = None  # default: the engine's model argument
    api_key: str | None = None  # one bearer token (the single-tenant spelling); merged into `keys`
    api_keys: tuple[str, ...] = ()  # several tenants' tokens: any one is accepted on /v1/*, /metrics, /openapi.json
    max_body_bytes: int = 16 << 20
    max_choices: int = 64  # prompts x n per request
    allow_runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter (off, as in vLLM)
    lora_roots: tuple[str, ...] = ()  # runtime loads must resolve (symlinks followed) inside one of these folders
    tenant_isolation: bool = False  # derive each request's cache salt from its API key: tenants share no cache
    tool_call_parser: str = "hermes"  # how tool calls are written and parsed: hermes, llama3_json or mistral
    max_sessions: int = 1000  # session ids with /metrics series of their own; older ones are folded into _other

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "lora_roots", tuple(str(r) for r in self.lora_roots))
        if self.tenant_isolation and not self.keys:
            raise ValueError("tenant isolation needs at least one API key: tenants are told apart by their keys")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")
        if self.tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {self.tool_call_parser!r} (choose from {', '.join(PARSERS)})")
        if self.allow_runtime_lora and not self.lora_roots:
            raise ValueError(
                "runtime adapter loading needs at least one adapter root (--lora-root DIR): "
                "without one, a client could load any file the server can read"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key (empty: no authentication)."""
        first = (self.api_key,) if self.api_key else ()
        return tuple(dict.fromkeys(first + self.api_keys))


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes (413) and malformed JSON (400)."""
    declared = request.headers.get("content-length")
    # a 19+ digit length is oversize without int() (which refuses over 4300 digits with a ValueError)
    oversize = declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit)
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
    return decode_json(bytes(body))


def _tokenizer_copy(tokenizer):
    """The HTTP side gets its own tokenizer: the engine thread uses the engine's concurrently."""
    return None if tokenizer is None else copy.deepcopy(tokenizer)


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")  # a key from argv may hold undecodable bytes


def tenant_salt(key: str) -> str:
    """A tenant's cache namespace: a digest of its key (the key itself never reaches the engine or a log)."""
    return hashlib.sha256(b"lragent-tenant\0" + _key_bytes(key)).hexdigest()[:32]


def _model_root(engine: LLMEngine, name: str) -> str:
    """`root` of the base model in /v1/models: the model argument, unless it is a local path (not for clients)."""
    model = engine.config.model
    return name if Path(model).expanduser().exists() else model


def create_app(engine: LLMEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The app over one engine: the /v1 generation and adapter routes (behind the API key), health and metrics."""
    return _App(engine, settings or ServerSettings()).build()


class _App:
    """What the routes share (settings, engine loop, serving, metrics) and one method per group of routes."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.name = settings.served_model_name or engine.config.model
        self.metrics = ServerMetrics(
            self.name, engine.scheme.mode.value, engine.config.block_size, settings.max_sessions
        )
        self.loop = AsyncEngine(engine, self.metrics)
        self.serving = OpenAIServing(
            self.loop,
            _tokenizer_copy(engine.tokenizer),
            self.name,
            {engine.config.model},
            settings.max_choices,
            engine.model_config.vocab_size,
            settings.tool_call_parser,
        )
        self.created = int(time.time())
        self.keys = [(key, _key_bytes(key)) for key in settings.keys]

    def build(self) -> FastAPI:
        loop = self.loop

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            loop.start()
            try:
                yield
            finally:
                loop.stop()

        # /openapi.json is served below, behind the key; /docs and /redoc are off
        app = FastAPI(
            title="lragent", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
        )
        admission = Admission()
        app.add_middleware(AdmissionMiddleware, admission=admission)
        app.state.engine_loop, app.state.metrics, app.state.settings = loop, self.metrics, self.settings
        app.state.admission = admission
        install_handlers(app, on_error=lambda status: self.metrics.http_errors.labels(str(status)).inc())
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self.check_key)])
        self._generation_routes(v1)
        self._adapter_routes(v1)
        app.include_router(v1)
        self._service_routes(app)
        return app

    async def check_key(self, request: Request) -> None:
        """Any configured key is accepted; the matching one is kept on the request (for tenant isolation)."""
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # the header's raw bytes
        match = None
        for key, raw in self.keys:  # every key is compared: the time taken does not depend on which one matched
            if hmac.compare_digest(given, raw):
                match = key
        if scheme.lower() != "bearer" or match is None:
            raise APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
            )
        request.state.api_key = match

    def cache_salt(self, request: Request, client_salt: str | None) -> str | None:
        """The engine's cache salt: the client's `cache_salt`, within its tenant's namespace under isolation."""
        if not self.settings.tenant_isolation:
            return client_salt
        tenant = tenant_salt(request.state.api_key)
        return tenant if client_salt is None else f"{tenant}:{client_salt}"

    async def body_of(self, request: Request, model):
        return parse_body(model, await read_json(request, self.settings.max_body_bytes))

    @staticmethod
    def session(request: Request, body) -> str | None:
        """The optional trajectory id (header first, then `session_id`): per-session metrics only."""
        return session_of(request.headers.get(SESSION_HEADER), body.session_id)

    def _generation_routes(self, v1: APIRouter) -> None:
        serving = self.serving

        @v1.post("/chat/completions")
        async def chat_completions(request: Request) -> Response:
            body = await self.body_of(request, ChatCompletionRequest)
            sid = self.session(request, body)
            return await serving.chat(body, request, self.cache_salt(request, body.cache_salt), sid)

        @v1.post("/completions")
        async def completions(request: Request) -> Response:
            body = await self.body_of(request, CompletionRequest)
            sid = self.session(request, body)
            return await serving.completion(body, request, self.cache_salt(request, body.cache_salt), sid)

        @v1.post("/responses")
        async def responses(request: Request) -> Response:
            body = await self.body_of(request, ResponsesRequest)
            sid = self.session(request, body)
            return await create_response(serving, body, request, self.cache_salt(request, body.cache_salt), sid)

        @v1.get("/models")
        async def models() -> JSONResponse:
            loop, name = self.loop, self.name
            card = {
                "object": "model",
                "created": self.created,
                "owned_by": "lragent",
                "max_model_len": loop.max_model_len,
            }
            data = [{"id": name, "root": _model_root(self.engine, name), "parent": None, **card}]
            data += [{"id": a, "root": a, "parent": name, **card} for a in sorted(loop.adapter_paths)]  # no paths
            return JSONResponse({"object": "list", "data": data})

    def _runtime_lora(self) -> None:
        if not self.settings.allow_runtime_lora:
            raise APIError(
                403, "loading and unloading adapters at runtime is disabled on this server (--enable-runtime-lora)"
            )

    def _adapter_routes(self, v1: APIRouter) -> None:
        @v1.post("/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> PlainTextResponse:
            self._runtime_lora()
            body = await self.body_of(request, LoadLoRARequest)
            check_adapter_name(body.lora_name)
            if body.lora_name in self.serving.aliases:
                raise bad_request(f"{shown(body.lora_name)} is the base model's name", "lora_name")
            real = resolve_inside(body.lora_path, self.settings.lora_roots)
            await self._load(body.lora_name, body.lora_path, real)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @v1.post("/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> PlainTextResponse:
            self._runtime_lora()
            body = await self.body_of(request, UnloadLoRARequest)
            if body.lora_name not in self.loop.adapter_paths:
                message = f"The lora adapter {shown(body.lora_name)} cannot be found."
                raise APIError(404, message, "lora_name", "model_not_found")
            try:
                await self.loop.unload_adapter(body.lora_name)
            except AdapterError as exc:
                raise APIError(409, str(exc), "lora_name") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _load(self, lora_name: str, given: str, real: Path) -> None:
        """Load; a failure names the adapter and the reason, with no server path in it."""
        try:
            await self.loop.load_adapter(lora_name, str(real))
        except (AdapterError, ValueError, KeyError, OSError) as exc:
            reason = scrub_paths(str(exc), real, given)
            raise bad_request(f"cannot load adapter {shown(lora_name)}: {reason}", "lora_path") from None
        except Exception:  # a parser deep down choked on the files: the client learns that, the log learns why
            log.exception("loading adapter %r failed", lora_name)
            raise bad_request(
                f"cannot load adapter {shown(lora_name)}: its files could not be read as a PEFT LoRA adapter",
                "lora_path",
            ) from None

    def _service_routes(self, app: FastAPI) -> None:
        loop, metrics = self.loop, self.metrics

        @app.get("/health")
        async def health() -> JSONResponse:
            if not loop.alive:
                raise APIError(503, "the engine loop is not running")
            return JSONResponse({"status": "ok"})

        @app.get("/metrics", dependencies=[Depends(self.check_key)])
        async def prometheus() -> Response:
            if loop.alive:
                metrics.update_engine(await loop.stats(), len(loop.adapter_paths))
            return Response(metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/openapi.json", dependencies=[Depends(self.check_key)], include_in_schema=False)
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

"""`AsyncLLM`: the asyncio API for streaming in-process, vLLM's `AsyncLLM` shape.

    engine = AsyncLLM(model=..., adapters={"plan": "adapters/plan"})
    async for out in engine.generate("Question: ...", SamplingParams(max_tokens=32), "req-1", adapter="plan"):
        print(out.outputs[0].text)  # the text so far; out.new_token_ids: this step's tokens
    engine.close()

One background thread runs the engine's step loop: the server's `AsyncEngine` (lragent/server/engine_loop.py), so
requests of all coroutines (and threads) meet in one continuous batch, exactly as the server's clients do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine, RequestOutput
from lragent.llm import LLM, Prompt, ensure_lora
from lragent.lora.request import LoRARequest
from lragent.sampling import SamplingParams
from lragent.server.engine_loop import AsyncEngine, EngineRequest, StreamItem

_ABORTED = object()  # put on a stream's queue by `abort`: the generator ends


class AsyncLLM:
    """Streaming generation from asyncio code; the engine steps in a background thread (started here)."""

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        adapters: dict[str, str] | None = None,
        sharing: str = "auto",
        device: str = "cpu",
        dtype: str = "auto",
        **engine_kwargs: Any,
    ):
        config = EngineConfig(
            model=model, adapters=dict(adapters or {}), sharing=sharing, device=device, dtype=dtype, **engine_kwargs
        )
        self._start(LLMEngine(config))

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls.from_engine(LLMEngine(config))

    @classmethod
    def from_engine(cls, engine: LLMEngine | LLM) -> AsyncLLM:
        """Stream from an existing engine (or an `LLM`'s); this object's loop thread owns it until `close`."""
        self = cls.__new__(cls)
        self._start(engine.engine if isinstance(engine, LLM) else engine)
        return self

    def _start(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._loop = AsyncEngine(engine)
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
        *,
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that produced tokens, the last with `finished`.

        The stream ends early, without a finished output, when `abort(request_id)` is called; leaving the loop
        (break, cancellation) aborts the request. One sample per request (`n` must be 1). A request the engine
        fails ends with `finish_reason == "error"`; an engine shut down under it raises RuntimeError.
        """
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if params.samples != 1:
            raise ValueError("AsyncLLM.generate streams one sample: use n=1 without best_of (one request per sample)")
        request_id = request_id or f"async-{uuid.uuid4().hex}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_request is not None:
            if adapter is not None:
                raise ValueError("give either adapter or lora_request, not both")
            adapter = await self._loop.call(lambda engine: self._ensure_lora(engine, lora_request))
        ids = await self._loop.call(lambda engine: engine.encode(prompt))
        request = EngineRequest(ids, params, adapter, request_id, 0, cache_salt=cache_salt)
        queue = await self._loop.submit([request])
        self._streams[request_id] = queue
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _ABORTED:
                    finished = True  # already aborted
                    return
                assert isinstance(item, StreamItem)
                if item.output is None:
                    finished = True
                    raise RuntimeError(item.error or "the engine stopped")
                finished = item.output.finished
                yield item.output
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the caller left the loop early
                self._loop.abort_nowait([request_id])

    def _ensure_lora(self, engine: LLMEngine, request: LoRARequest) -> str:
        name = ensure_lora(engine, request)
        self._loop.adapter_paths = {n: a.path for n, a in engine.registry.adapters.items()}
        return name

    async def abort(self, request_id: str) -> None:
        """Stop a request: its cache blocks are freed and its `generate` stream ends. Unknown ids are ignored."""
        self._loop.abort_nowait([request_id])
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(_ABORTED)

    async def load_adapter(self, name: str, path: str) -> None:
        await self._loop.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._loop.unload_adapter(name)

    async def cache_stats(self) -> dict:
        return await self._loop.stats()

    def close(self) -> None:
        """Stop the loop thread (requests in flight end with RuntimeError) and free the engine. Idempotent."""
        if self._loop.alive:
            self._loop.stop()
        self.engine.close()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

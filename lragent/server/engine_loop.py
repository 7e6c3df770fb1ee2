"""One engine, one thread: every engine call (add, abort, adapter loads, stats) is a command run between steps.

`LLMEngine` is not thread-safe. The loop thread owns it: it drains the command queue, runs `step()` while there is
work, and hands each request's outputs to the asyncio queue of the HTTP request that asked for it. Requests of all
clients therefore meet in the engine's continuous batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lragent.engine.llm_engine import LLMEngine, RequestOutput
from lragent.engine.sequence import RequestMetrics
from lragent.sampling import SamplingParams
from lragent.server.metrics import ServerMetrics

log = logging.getLogger("lragent.server")
T = TypeVar("T")


@dataclass
class StreamItem:
    """What the loop hands to a request: a new output, or the error that ended it."""

    index: int  # the choice this output belongs to
    output: RequestOutput | None
    time: float  # perf_counter when the step produced it
    error: str | None = None
    status: int = 500  # the HTTP status of `error`: 500 for an engine failure, 503 when the server shuts down


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    request_id: str
    index: int  # choice index in the HTTP response
    cache_salt: str | None = None  # requests with different salts share no cached block (tenant isolation)
    follows: str | None = None  # the first choice of the same prompt: this one reuses its computed prompt
    session: str | None = None  # the client's session (trajectory) id: labels per-session metrics, nothing else


class EngineUnavailable(RuntimeError):
    """The loop is not running or the server is shutting down: the client should see a 503."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    adapter: str
    last_time: float | None = None
    metrics: RequestMetrics | None = field(default=None, repr=False)
    session: str | None = None

    def put(self, item: StreamItem) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_model_len = engine.max_model_len
        self.adapter_paths: dict[str, str] = {n: a.path for n, a in engine.registry.adapters.items()}
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future | None]] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # owned by the loop thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.closing = False  # set by fail_all_nowait at shutdown: nothing new is admitted

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="lragent-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._commands.put((lambda engine: None, None))  # wake the loop
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the API used by request handlers (event-loop side) ------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the loop thread between two steps; its exception is raised here."""
        if not self.alive:
            raise EngineUnavailable("the engine loop is not running")
        future: Future = Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    async def submit(self, requests: list[EngineRequest]) -> asyncio.Queue:
        """Add all requests atomically (a validation error adds none); their outputs arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[StreamItem] = asyncio.Queue()

        def add(engine: LLMEngine) -> None:
            if self.closing:
                raise EngineUnavailable("the server is shutting down")
            added: list[str] = []
            try:
                for r in requests:
                    extra = {k: v for k, v in (("cache_salt", r.cache_salt), ("follows", r.follows)) if v is not None}
                    engine.add_request(r.prompt_ids, r.params, r.adapter, r.request_id, **extra)
                    added.append(r.request_id)
                    self._sinks[r.request_id] = _Sink(loop, out, r.index, r.adapter or "", session=r.session)
            except BaseException:
                for rid in added:
                    engine.abort(rid)
                    self._sinks.pop(rid, None)
                raise

        await self.call(add)
        return out

    def abort_nowait(self, request_ids: list[str]) -> None:
        """Abort requests (frees their sequences and cache blocks); safe to call from a cancelled task."""
        if request_ids:
            self._commands.put((lambda engine: self._abort(engine, request_ids), None))

    def fail_all_nowait(self, message: str, status: int = 503) -> None:
        """End every request in flight with `message` (shutdown past its grace period) and admit no new one."""
        self.closing = True
        self._commands.put((lambda engine: self._fail_all(message, status), None))

    async def load_adapter(self, name: str, path: str) -> None:
        def load(engine: LLMEngine) -> None:
            engine.load_adapter(name, path)
            self.adapter_paths = {**self.adapter_paths, name: engine.registry.adapters[name].path}

        await self.call(load)

    async def unload_adapter(self, name: str) -> None:
        def unload(engine: LLMEngine) -> None:
            engine.unload_adapter(name)
            self.adapter_paths = {k: v for k, v in self.adapter_paths.items() if k != name}
            if self.metrics is not None:
                self.metrics.remove_adapter(name)

        await self.call(unload)

    async def stats(self) -> dict:
        return await self.call(lambda engine: engine.cache_stats())

    # ---- the loop thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                try:
                    self._execute(*self._commands.get(timeout=0.5))
                except queue.Empty:
                    continue
            self._drain()
            if self.engine.has_unfinished() and not self._stop.is_set():
                self._step()
        self._fail_all("the server is shutting down", 503)

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._execute(*command)

    def _execute(self, fn: Callable[[LLMEngine], Any], future: Future | None) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(self.engine)
        except BaseException as exc:  # handed to the caller; the loop keeps going
            if future is None:
                log.exception("engine command failed")
            else:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the engine contains per-request failures; this is a bug: the text stays in the log
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(f"engine error ({type(exc).__name__})")
            return
        now = time.perf_counter()
        for out in outputs:
            self._deliver(out, now)
        if not outputs and now - start < 1e-3:
            time.sleep(1e-3)  # nothing could be scheduled: do not spin

    def _deliver(self, out: RequestOutput, now: float) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        sink.metrics = out.metrics
        if self.metrics is not None:
            gap = None if sink.last_time is None else now - sink.last_time
            for _ in out.new_token_ids:
                self.metrics.token(sink.adapter, out.metrics, gap)
            if out.finished:
                self._finished(sink, out.metrics, out.finish_reason or "stop")
        sink.last_time = now
        if out.finished:
            del self._sinks[out.request_id]
        error = None
        if out.finished and out.finish_reason == "error":  # this request alone failed in the engine
            error = getattr(out, "error", None) or "the engine failed on this request"
        sink.put(StreamItem(sink.index, out, now, error=error))

    def _finished(self, sink: _Sink, metrics: RequestMetrics | None, reason: str) -> None:
        if self.metrics is None:
            return
        self.metrics.finished(sink.adapter, metrics, reason)
        if sink.session is not None:
            self.metrics.session_finished(sink.session, metrics)

    def _abort(self, engine: LLMEngine, request_ids: list[str]) -> None:
        for rid in request_ids:
            sink = self._sinks.pop(rid, None)
            engine.abort(rid)
            if sink is not None:
                self._finished(sink, sink.metrics, "abort")

    def _fail_all(self, message: str, status: int = 500) -> None:
        now = time.perf_counter()
        for rid, sink in list(self._sinks.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            self._finished(sink, sink.metrics, "error")
            sink.put(StreamItem(sink.index, None, now, error=message, status=status))
        self._sinks.clear()

"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process).

Token counters are per adapter (the base model is labelled with its served name). The share of prompt tokens
served from the cache is `rate(lragent_prompt_tokens_reused_total) / rate(lragent_prompt_tokens_total)`.

Requests that carry a session (trajectory) id (`X-Session-ID` header or `session_id` field) are also counted per
session (`lragent_session_*`), so that one agent trajectory's cache reuse can be watched. The label set is bounded:
the `max_sessions` most recently finished sessions keep their own series; an older one is folded into the
`_other` series (its counts added there, its own series removed), so a client cannot grow /metrics without bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from lragent.engine.sequence import RequestMetrics

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISH_REASONS = ("stop", "length", "abort", "error")
OTHER_SESSIONS = "_other"  # the label of sessions folded out of the tracked set (a reserved session id)
MAX_SESSIONS = 1000


class ServerMetrics:
    def __init__(self, model_name: str, sharing: str, block_size: int = 16, max_sessions: int = MAX_SESSIONS):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.base_label = model_name
        self.max_sessions = max_sessions
        # session -> [requests, prompt, reused, base_reused] of its live series, least recently finished first
        self._sessions: OrderedDict[str, list[int]] = OrderedDict()
        self._session_lock = threading.Lock()
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. (Linux)
        self._add_request_metrics(r)
        self._add_cache_metrics(r)
        self._add_session_metrics(r)
        self.info = Gauge(
            "lragent_info",
            "Served model, sharing scheme and cache block size",
            ["model", "sharing", "block_size"],
            registry=r,
        )
        self.info.labels(model_name, sharing, str(block_size)).set(1)

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Per-adapter counts of finished requests, tokens and latencies, and HTTP errors."""
        by_adapter = ["adapter"]
        self.requests = Counter(
            "lragent_requests", "Finished engine requests (one per choice)", ["adapter", "finish_reason"], registry=r
        )
        self.http_errors = Counter(
            "lragent_http_errors", "Requests answered with an error object", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "lragent_prompt_tokens", "Prompt tokens of finished requests", by_adapter, registry=r
        )
        self.computed_tokens = Counter(
            "lragent_prompt_tokens_computed",
            "Prompt tokens run through the model (LR prefill included)",
            by_adapter,
            registry=r,
        )
        self.reused_tokens = Counter(
            "lragent_prompt_tokens_reused",
            "Prompt tokens served entirely from the cache (no forward pass)",
            by_adapter,
            registry=r,
        )
        self.base_reused_tokens = Counter(
            "lragent_prompt_tokens_base_reused",
            "Prompt tokens whose keys and base values came from the cache",
            by_adapter,
            registry=r,
        )
        self.generation_tokens = Counter("lragent_generation_tokens", "Generated tokens", by_adapter, registry=r)
        self.ttft = Histogram(
            "lragent_time_to_first_token_seconds",
            "Arrival to first token",
            by_adapter,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lragent_inter_token_latency_seconds",
            "Time between tokens of one request",
            by_adapter,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lragent_e2e_request_latency_seconds", "Arrival to last token", by_adapter, buckets=E2E_BUCKETS, registry=r
        )

    def _add_cache_metrics(self, r: CollectorRegistry) -> None:
        """The KV cache, the prefix cache's hit rate, the engine's queues and the adapters loaded."""
        self.cache_bytes = Gauge(
            "lragent_cache_bytes", "KV cache bytes per pool (allocated or used)", ["pool", "state"], registry=r
        )
        self.cache_blocks = Gauge("lragent_cache_blocks", "KV cache blocks per pool", ["pool", "state"], registry=r)
        self.hit_rate = Gauge(
            "lragent_prefix_cache_hit_rate",
            "Prompt blocks found in the shared key/base-value prefix cache / looked up",
            registry=r,
        )
        self.running = Gauge("lragent_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("lragent_num_requests_waiting", "Sequences queued in the engine (queue depth)", registry=r)
        self.adapters = Gauge("lragent_adapters_loaded", "LoRA adapters loaded", registry=r)

    def _add_session_metrics(self, r: CollectorRegistry) -> None:
        """Per-session-id counts, for the ``max_sessions`` most recently finished sessions."""
        by_session = ["session"]
        self.session_requests = Counter(
            "lragent_session_requests", "Finished engine requests per session id", by_session, registry=r
        )
        self.session_prompt_tokens = Counter(
            "lragent_session_prompt_tokens", "Prompt tokens of finished requests per session id", by_session, registry=r
        )
        self.session_reused_tokens = Counter(
            "lragent_session_prompt_tokens_reused",
            "Prompt tokens served entirely from the cache per session id (usage cached_tokens)",
            by_session,
            registry=r,
        )
        self.session_base_reused_tokens = Counter(
            "lragent_session_prompt_tokens_base_reused",
            "Prompt tokens whose keys and base values came from the cache per session id",
            by_session,
            registry=r,
        )
        self.sessions_tracked = Gauge(
            "lragent_sessions_tracked", "Session ids with series of their own (the rest are in _other)", registry=r
        )

    def label(self, adapter: str | None) -> str:
        return adapter or self.base_label

    def remove_adapter(self, adapter: str) -> None:
        """Drop an unloaded adapter's series: load/unload cycles under fresh names must not grow /metrics forever."""
        per_adapter = (self.prompt_tokens, self.computed_tokens, self.reused_tokens, self.base_reused_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e)  # fmt: skip
        series = [(m, (adapter,)) for m in per_adapter]
        series += [(self.requests, (adapter, reason)) for reason in FINISH_REASONS]
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:  # prometheus-client < 0.22 raises for a series that never existed
                pass

    # ---- called from the engine thread (prometheus-client is thread-safe) ----------------------------------
    def token(self, adapter: str, metrics: RequestMetrics, gap_s: float | None) -> None:
        """One new token; `gap_s` is the time since the request's previous token (None for the first)."""
        label = self.label(adapter)
        if gap_s is None:
            if metrics.ttft_s is not None:
                self.ttft.labels(label).observe(metrics.ttft_s)
        else:
            self.itl.labels(label).observe(gap_s)

    def finished(self, adapter: str, metrics: RequestMetrics | None, reason: str) -> None:
        """A request ended (`reason`: stop, length, abort or error); `metrics` is None if it never ran."""
        label = self.label(adapter)
        self.requests.labels(label, reason).inc()
        if metrics is None:
            return
        self.prompt_tokens.labels(label).inc(metrics.prompt_tokens)
        self.computed_tokens.labels(label).inc(metrics.computed_tokens)
        self.reused_tokens.labels(label).inc(metrics.reused_tokens)
        self.base_reused_tokens.labels(label).inc(metrics.base_reused_tokens)
        self.generation_tokens.labels(label).inc(metrics.generated_tokens)
        if metrics.latency_s is not None:
            self.e2e.labels(label).observe(metrics.latency_s)

    def _session_series(self) -> tuple[Counter, ...]:
        return (self.session_requests, self.session_prompt_tokens, self.session_reused_tokens,
                self.session_base_reused_tokens)  # fmt: skip

    def session_finished(self, session: str, metrics: RequestMetrics | None) -> None:
        """A request of `session` ended: count it, and fold the least recent session into _other past the cap."""
        counts = [1, 0, 0, 0]
        if metrics is not None:
            counts[1:] = [metrics.prompt_tokens, metrics.reused_tokens, metrics.base_reused_tokens]
        with self._session_lock:
            if session != OTHER_SESSIONS:  # refused as a client's id (reserved); counted, never tracked
                totals = self._sessions.pop(session, None) or [0, 0, 0, 0]
                self._sessions[session] = [a + b for a, b in zip(totals, counts)]  # now the most recent
            for counter, n in zip(self._session_series(), counts):
                counter.labels(session).inc(n)
            while len(self._sessions) > self.max_sessions:
                old, old_totals = self._sessions.popitem(last=False)
                for counter, n in zip(self._session_series(), old_totals):
                    counter.labels(OTHER_SESSIONS).inc(n)
                    try:
                        counter.remove(old)
                    except KeyError:
                        pass
            self.sessions_tracked.set(len(self._sessions))

    # ---- called before each scrape -------------------------------------------------------------------------
    def update_engine(self, stats: dict, num_adapters: int) -> None:
        for pool, p in stats["pools"].items():
            self.cache_bytes.labels(pool, "allocated").set(p["bytes_allocated"])
            self.cache_bytes.labels(pool, "used").set(p["bytes_used"])
            for state in ("total", "in_use", "cached"):
                self.cache_blocks.labels(pool, state).set(p.get(f"blocks_{state}", 0))
        self.hit_rate.set(stats["hit_rate"])
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.adapters.set(num_adapters)

    def render(self) -> bytes:
        return generate_latest(self.registry)

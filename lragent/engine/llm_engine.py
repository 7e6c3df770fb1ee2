"""The engine: owns the model, adapters, cache and scheduler; `step()` is the only place they meet."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from lragent.cache.kv_cache import CacheLayout, KVCache
from lragent.cache.sharing import PoolKind, default_critical_layers, get_scheme
from lragent.config import EngineConfig
from lragent.distributed.tensor_parallel import Shard, load_model_shard
from lragent.engine.block_manager import BlockManager
from lragent.engine.model_runner import LaunchedStep, ModelRunner, StepResult
from lragent.engine.scheduler import ScheduledBatch, Scheduler
from lragent.engine.sequence import PromptLogprob, RequestMetrics, Sequence
from lragent.engine.stats import StepStats
from lragent.engine.structured import GrammarBackend
from lragent.engine.tp_group import TPGroup
from lragent.engine.warmup import warm_up
from lragent.kernels import make_backend
from lragent.lora.adapter import AdapterError, LoRAAdapter, default_sharing, load_peft_adapter
from lragent.lora.registry import AdapterRegistry
from lragent.models.llama import Runtime
from lragent.quant import quantize_model
from lragent.sampling import SamplingParams

logger = logging.getLogger(__name__)

CPU_DEFAULT_CACHE_BYTES = 1 << 30
GRAPH_RESERVE_BYTES = 256 << 20  # the decode graphs' memory pool (one step's activations at the largest size)
DECODE_PUBLISH_BLOCKS = 8  # CUDA: a decoding sequence's full blocks are checked and published this many at a time


@dataclass
class RequestOutput:
    request_id: str
    adapter: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    new_token_ids: list[int]  # generated in the last step (for streaming)
    text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token (params.top_logprobs)
    # per prompt position with params.prompt_logprobs (None before prompt_logprobs_start, and at position 0)
    prompt_logprobs: list[PromptLogprob | None] | None = None
    error: str | None = None  # set with finish_reason "error": why the engine failed this request (and no other)

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's shape, `out.outputs[0].text`: one view of this sample (each of n samples is its own RequestOutput)."""
        cumulative = sum(self.logprobs) if self.logprobs else None
        return [CompletionOutput(0, self.text, self.token_ids, cumulative, self.logprobs, self.finish_reason)]


@dataclass
class CompletionOutput:
    """One sample as vLLM's `CompletionOutput` names it (`logprobs`: the chosen tokens' logprobs, one per token)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[float]
    finish_reason: str | None


class Sampled(NamedTuple):
    """One sequence's draw of a step."""

    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


class LLMEngine:
    def __init__(self, config: EngineConfig, tp_rank: int = 0):
        """`tp_rank`: this engine's rank in a tensor-parallel group (`config.tensor_parallel_size` > 1); rank 0, the
        user's engine, starts the other ranks' processes and forwards its state-changing calls to them."""
        self.shard = Shard(tp_rank, config.tensor_parallel_size)
        self.workers: TPGroup | None = None  # set once built: from then on, calls that change state are forwarded
        group = TPGroup(config, self.shard.device(config.device)) if tp_rank == 0 and self.shard.size > 1 else None
        try:
            self._start(config)
        except BaseException:
            if group is not None:
                group.close()
            raise
        if group is not None:
            group.wait_ready()
            self.workers = group

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        self.device = self.shard.device(config.device)
        self.dtype = config.torch_dtype
        loaded = load_model_shard(config.model, self.dtype, self.device, config.max_model_len, self.shard)
        # base_config: the architecture (adapters are checked against it); model_config: this rank's share of it
        self.model, self.base_config = loaded.model, loaded.config
        self.model_config = self.shard.config(loaded.config)
        self.tokenizer = self._load_tokenizer(config.tokenizer or loaded.tokenizer_dir)
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        adapters = [load_peft_adapter(n, p, self.base_config) for n, p in config.adapters.items()]
        if config.sharing == "auto":  # one rule for every entry point: lragent.lora.adapter.default_sharing
            mode, why = default_sharing(adapters, self.model_config.num_layers, config.allow_unshared_a)
            logger.info("sharing scheme %s (auto: %s)", mode, why)
            self.config = config = config.with_sharing(mode)
        critical = config.critical_layers
        if critical is None:
            critical = default_critical_layers(self.base_config)
        self.scheme = get_scheme(config.sharing).with_critical_layers(critical, self.model_config.num_layers)
        if self.scheme.key_lr and not (config.key_lora or any("k_proj" in a.targets for a in adapters)):
            # no key adapter to serve: LR rows stay r wide (X A_v), as without key LR; k_proj adapters are refused
            self.scheme = dataclasses.replace(self.scheme, key_lr=False, allows_key_adapter=False)
        max_loras = config.max_loras or len(adapters) + 4
        max_rank = config.max_lora_rank or max([a.rank for a in adapters] or [16])
        self.registry = AdapterRegistry(self.scheme, self.model_config.num_layers, max_loras, config.allow_unshared_a)
        self.backend = backend = make_backend(config.attention_backend, self.device)
        if self.scheme.splits_layers and not backend.supports_layer_pools:
            if config.attention_backend != "auto":
                raise ValueError(
                    f"{self.scheme.mode.value} keeps its critical layers in a pool of their own, which the "
                    f"{backend.name} attention backend does not support; use attention_backend='torch'"
                )
            logger.info("%s: the torch attention backend (critical layers need it)", self.scheme.mode.value)
            self.backend = backend = make_backend("torch", self.device)
        cascade = config.cascade_decode if config.cascade_decode is not None else self.device.type == "cuda"
        if cascade and not backend.enable_cascade(config.block_size) and config.cascade_decode:
            logger.info("cascade_decode: the %s attention backend has no cascade decode (plain decode)", backend.name)
        self.fused_layers = backend.layer_ops is not None  # the backend provides the fused form of the layers
        if self.fused_layers:
            self.model.fuse_projections()
        if config.quantization is not None:  # after fusing: a fused weight is quantised as one
            quantize_model(self.model, config.quantization)
        self.bank = backend.lora_bank_class(
            self.model_config,
            max_loras,
            max_rank,
            self.dtype,
            self.device,
            stack_values=self.scheme.stacks_lr,
            key_lr=self.scheme.key_lr,
        )
        for adapter in adapters:
            self._install(adapter)
        budget = self.shard.agree_min(self._cache_budget(max_rank, bool(adapters)), self.device)
        lr_width = self.scheme.lr_width(max_rank, max_loras)
        layout = CacheLayout.for_budget(
            self.model_config, self.scheme, budget, config.block_size, lr_width, max_loras, self.dtype
        )
        self.cache = KVCache(self.model_config, layout, self.dtype, self.device)
        self.model.bind(Runtime(self.cache, self.bank, backend))
        self.block_manager = BlockManager(self.scheme, layout)
        self.block_manager.on_free = self.cache.clear_flags
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache, self.scheme, backend, self.bank, self.device)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings, self.block_manager.capacity_tokens
        )
        if self.device.type == "cuda" and backend.supports_cuda_graphs and not config.enforce_eager:
            self.runner.enable_cuda_graphs(
                min(config.cuda_graph_max_batch, config.max_num_seqs),
                self.max_model_len,
                min(config.cuda_graph_prefill_tokens, config.max_num_batched_tokens),
            )
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._grammars: GrammarBackend | None = None  # built on the first structured-output request
        on = config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        self.async_scheduling = on and self.shard.size == 1  # (ranks in lockstep would each need the same ahead)
        self._inflight: LaunchedStep | None = None  # async scheduling: the decode step queued ahead of the host
        self._undelivered: list[RequestOutput] = []  # outputs of a step collected outside `step` (`_drain`)
        self.warmup_s = 0.0
        if config.warmup if config.warmup is not None else self.device.type == "cuda":
            self.warmup_s = warm_up(self)

    # ---- setup ---------------------------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(folder):
        if folder is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    def _cache_budget(self, max_rank: int, with_adapter: bool) -> int:
        """Explicit bytes; 1 GiB on CPU; on CUDA what `gpu_memory_utilization` leaves after a measured warm-up.

        The warm-up runs the largest step the scheduler may issue (max_num_batched_tokens of prefill, logits for
        max_num_seqs rows) against a throwaway one-block cache and records the peak it allocates on top of the
        weights: that, everything else already on the card, and a small reserve for decode graphs come off
        the budget.
        """
        self.activation_peak_bytes = 0
        if self.config.kv_cache_bytes is not None:
            return self.config.kv_cache_bytes
        if self.device.type == "cpu":
            return CPU_DEFAULT_CACHE_BYTES
        self.activation_peak_bytes = self._profile_peak(max_rank, with_adapter)
        from lragent.engine.memory import device_memory_in_use

        # weights, adapters, CUDA context, other processes; an earlier engine's cached memory is handed back first
        in_use, total = device_memory_in_use(self.device)
        graph_reserve = 0 if self.config.enforce_eager else GRAPH_RESERVE_BYTES
        budget = int(self.config.gpu_memory_utilization * total - in_use - self.activation_peak_bytes - graph_reserve)
        logger.info(
            "KV cache budget %.2f GiB: %.0f%% of %.1f GiB, minus %.2f GiB in use and a measured %.2f GiB step peak",
            budget / 2**30,
            100 * self.config.gpu_memory_utilization,
            total / 2**30,
            in_use / 2**30,
            self.activation_peak_bytes / 2**30,
        )
        return budget

    @torch.inference_mode()
    def _profile_peak(self, max_rank: int, with_adapter: bool) -> int:
        cfg = self.config
        lr_width = self.bank.value_width
        layout = CacheLayout(
            cfg.block_size, {p.name: 1 for p in self.scheme.pools}, lr_width, self.scheme.critical_layers
        )
        scratch = KVCache(self.model_config, layout, self.dtype, self.device)
        self.model.bind(Runtime(scratch, self.bank, self.backend))
        runner = ModelRunner(self.model, scratch, self.scheme, self.backend, self.bank, self.device)
        longest = max(1, (cfg.max_model_len or self.model_config.max_position_embeddings) - 1)
        total, seqs = cfg.max_num_batched_tokens, list[Sequence]()
        while total > 0 and len(seqs) < cfg.max_num_seqs:
            n = min(total, longest)
            seq = Sequence(f"profile-{len(seqs)}", [0] * n, SamplingParams(), "", 1 if with_adapter else 0)
            for pool in self.scheme.pools:  # every row lands in the one scratch block of each pool
                seq.table(pool.name).blocks = [0] * (-(-n // cfg.block_size))
            seqs.append(seq)
            total -= n
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids, ctx, _ = runner.prepare(ScheduledBatch(seqs, [len(s) for s in seqs], True))
        self.model(ids, ctx)
        hidden = torch.zeros(cfg.max_num_seqs, self.model_config.hidden_size, dtype=self.dtype, device=self.device)
        torch.log_softmax(self.model.logits(hidden), dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch, runner, ids, ctx, hidden
        torch.cuda.empty_cache()
        return peak

    # ---- release -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Hand the engine's memory back, so another engine in this process can have it; idempotent.

        Dropping the last reference is not enough on CUDA: the caching allocator keeps freed pools reserved (40-50
        GiB on an H200), and a second engine sized by `gpu_memory_utilization` saw too little free memory. So abort
        the requests in flight, drop the model, cache pools, LoRA bank, decode graphs (they hold private memory
        pools), runner, scheduler and block manager, and return the cached memory to the driver. Afterwards
        `step()`, `add_request()` and any other use of a dropped component raise RuntimeError("the engine is
        closed").
        """
        from lragent.engine.memory import release_attributes, release_cached_memory

        if getattr(self, "_closed", False):
            return
        self._drain()
        self._closed = True
        if self.workers is not None:
            self.workers.close()
        try:
            for request_id in list(self._seqs):
                self.abort(request_id)
        finally:
            if getattr(self, "runner", None) is not None:  # no local: it would pin the cache past the release
                self.runner.clear_graphs()
            self.model.runtime = None  # a model the caller still holds no longer pins the cache pools and bank
            self._seqs.clear()
            self._listeners.clear()  # listeners are often bound methods of objects that hold this engine
            release_attributes(
                self,
                ("model", "cache", "bank", "backend", "runner", "scheduler", "block_manager", "registry", "tokenizer"),
            )
            release_cached_memory(self.device)

    def _forward(self, method: str, *args: object, **kwargs: object) -> None:
        """Tensor parallelism: have the other ranks make the same call, in the same order (lockstep)."""
        if self.workers is not None:
            self.workers.call(method, *args, **kwargs)

    # ---- adapters ------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        self._install(load_peft_adapter(name, path, self.base_config))
        self._adapters_changed()
        self._forward("load_adapter", name, path)

    def _install(self, adapter: LoRAAdapter) -> None:
        """Registry slot + device weights, or neither: a failed load leaves no name, slot or weights behind."""
        self.bank.check(adapter)
        slot = self.registry.add(adapter)
        try:
            self.bank.load(slot, self.shard.adapter(adapter))  # this rank's part of its B (or A)
        except BaseException:
            self.bank.unload(slot)
            self.registry.remove(adapter.name)
            raise

    def unload_adapter(self, name: str) -> None:
        busy = [s.request_id for s in self._seqs.values() if s.adapter == name]
        if busy:
            raise AdapterError(f"adapter {name!r} is in use by {len(busy)} running request(s)")
        self.bank.unload(self.registry.remove(name))
        self._adapters_changed()
        self._forward("unload_adapter", name)

    def _adapters_changed(self) -> None:
        """Captured decode graphs hold the adapter stacks that existed at capture: recapture on next use. Pools keyed
        by the adapter set (STACKED_LR's stack of every v_proj A) get the new key for every request in flight."""
        self._drain()  # the step queued ahead replays a graph about to be dropped
        self.runner.clear_graphs()
        for seq in self._seqs.values():
            self.block_manager.rekey(seq, self._namespaces(seq.adapter, seq.cache_salt))

    def _namespaces(self, adapter: str | None, cache_salt: str) -> dict[str, str]:
        keys = self.registry.cache_keys(adapter)
        return self.scheme.namespaces(*keys, cache_salt, stack_key=self.registry.stack_key)

    # ---- requests ------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy weights): pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise TypeError("a prompt must be a string or a list of integer token ids")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        follows: str | None = None,
    ) -> str:
        """Queue one request. Requests with different `cache_salt` share no cached block (tenant isolation).

        `follows`: the id of a queued request with the same prompt (another of its n samples): this one is admitted
        once that one has computed the prompt, and reuses its blocks instead of computing them too."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError("cache_salt must be a string or None")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context length is {self.max_model_len} "
                "(at least one token must be generated)"
            )
        vocab = self.model_config.vocab_size
        unknown = [t for t in [*params.logit_bias, *params.stop_token_ids] if t >= vocab]
        if unknown:
            raise ValueError(f"logit_bias / stop_token_ids: token ids out of range [0, {vocab}): {unknown[:5]}")
        slot = self.registry.slot_of(adapter)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, adapter or "", slot)
        seq.grammar = self._grammar_state(params)
        seq.leader = self._seqs.get(follows) if follows is not None else None
        seq.cache_salt = cache_salt or ""
        seq.namespaces = self._namespaces(adapter, seq.cache_salt)
        seq.seed = params.seed if params.seed is not None else self._rng.randrange(-(1 << 63), 1 << 63)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        # the other ranks queue the same request: same id, same resolved seed (their `_rng` never draws)
        self._forward("add_request", ids, replace(params, seed=seq.seed), adapter, request_id, cache_salt, follows)
        return request_id

    def _grammar_state(self, params: SamplingParams):
        """The output constraint's matcher, compiled now so a bad schema / regex / grammar fails before queuing."""
        if not params.constrained:
            return None
        if self.tokenizer is None:
            field = next(n for n in ("json_schema", "json_object", "regex", "grammar", "choice") if getattr(params, n))
            raise ValueError(f"{field}: structured output needs a model with a tokenizer")
        if self._grammars is None:
            stops = sorted(self.eos_ids)
            self._grammars = GrammarBackend(self.tokenizer, self.model_config.vocab_size, stop_token_ids=stops)
        return self._grammars.state(params)

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._forward("abort", request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._undelivered)

    # ---- the step ------------------------------------------------------------------------------------------
    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call `listener(StepStats)` after every step that ran the model (benchmarks, profilers, analyses)."""
        self._listeners.append(listener)

    def remove_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.remove(listener)

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, post-process. Returns an output for every sequence that got a token or
        failed. A failure is contained to the requests it concerns: the rest of the batch goes on.

        With async scheduling a steady decode step is launched, then the next one is queued behind it (its input ids
        read from the first one's draws on the device), and only then does the host wait for the first one's tokens:
        the host's bookkeeping runs while the device computes, instead of between steps."""
        start = time.perf_counter()
        self._forward("step")  # before this rank's step: the model's collectives need every rank in it
        outputs, self._undelivered = self._undelivered, []
        launched, self._inflight = self._inflight, None
        if launched is not None and all(s.is_finished for s in launched.batch.seqs):
            launched = None  # a step queued for sequences that all finished since: nothing to wait for
        if launched is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return outputs
            launched = self._launch(batch) if self._runs_ahead(batch) else None
            if launched is None:
                outputs += self._step(batch)
                self._notify(batch, len(outputs), start)
                return outputs
        self._inflight = self._launch_ahead(launched)
        outputs += self._collect(launched)
        self._notify(launched.batch, len(outputs), start, launched)
        return outputs

    def _notify(
        self, batch: ScheduledBatch, num_outputs: int, start: float, launched: LaunchedStep | None = None
    ) -> None:
        """Step listeners get this step's stats (a launched step's own timings: the runner has launched the next)."""
        if not self._listeners:
            return
        timed = self.runner if launched is None else launched
        stats = StepStats(
            batch.is_prefill,
            len(batch.seqs),
            batch.total_tokens,
            num_outputs,
            timed.prepare_s,
            timed.forward_s,
            time.perf_counter() - start,
            timed.graphed,
            batch.ahead > 0,
        )
        for listener in self._listeners:
            listener(stats)

    def _step(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Run the batch and wait for it."""
        return self._finish(batch, *self._run(batch))

    # ---- async scheduling: one decode step queued ahead of the host ---------------------------------------
    def _runs_ahead(self, batch: ScheduledBatch) -> bool:
        """A decode batch every sequence of which may have a step queued before its next token is on the host."""
        return self.async_scheduling and not batch.is_prefill and all(self._continues_ahead(s) for s in batch.seqs)

    def _continues_ahead(self, seq: Sequence) -> bool:
        """Whether the step after the one in flight can be queued now: no rule reads the in-flight token on the host
        first (an output constraint's mask; penalties read a history the draws keep on the device), and no length
        limit ends the sequence with the in-flight token (an end-of-sequence token or stop string may: that step's
        work is then dropped)."""
        p = seq.params
        return seq.grammar is None and len(seq.output_ids) + 2 <= p.max_tokens and len(seq) + 2 <= self.max_model_len

    def _launch(self, batch: ScheduledBatch, after: LaunchedStep | None = None) -> LaunchedStep | None:
        """Queue the batch on the device; None if that failed (the caller runs it the synchronous way, or not
        ahead)."""
        try:
            return self.runner.launch(batch, after)
        except Exception:
            self.runner.history.forget(batch.seqs)  # (its draws may have been recorded)
            logger.exception(
                "launching a decode step over %d sequences failed; running it synchronously", len(batch.seqs)
            )
            return None

    def _launch_ahead(self, launched: LaunchedStep) -> LaunchedStep | None:
        """Queue the decode step after `launched` when it is the step the scheduler would give next."""
        prev = launched.batch
        if prev.is_prefill or not all(prev.samples):
            return None
        seqs = [s for s in prev.seqs if not s.is_finished]
        if not seqs or not all(self._continues_ahead(s) for s in seqs):
            return None
        batch = self.scheduler.schedule_ahead(seqs)
        return None if batch is None else self._launch(batch, launched)

    def _collect(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's draws and post-process them as `_step` does. Sequences that finished or were
        aborted after it was queued are left out. If the step failed, its sequences run again one by one (a re-run
        writes the same cache slots with the same values)."""
        live = [s for s in launched.batch.seqs if not s.is_finished]
        if not live:
            return []
        try:
            sampled = self._sampled(launched.batch, launched.result())
        except Exception:
            logger.exception("a decode step over %d sequences failed; retrying them one by one", len(live))
            self._inflight = None  # the step queued behind it read its draws: dropped, it runs again after
            self.runner.history.forget(launched.batch.seqs)  # (the failed draws may have been recorded)
            batch = ScheduledBatch(live, [1] * len(live), is_prefill=False)  # (its in-flight token is on the host now)
            return self._finish(batch, *self._run_one_by_one(batch))
        return self._finish(launched.batch, sampled, {})

    def _drain(self) -> None:
        """Collect the step queued ahead now (before its graphs are dropped or the engine closes); its outputs go out
        with the next `step`."""
        launched, self._inflight = getattr(self, "_inflight", None), None
        if launched is not None:
            self._undelivered += self._collect(launched)

    def _finish(
        self, batch: ScheduledBatch, sampled: dict[Sequence, Sampled], failed: dict[Sequence, str]
    ) -> list[RequestOutput]:
        """Post-process a step that ran: progress, publishing, the drawn tokens and the failures."""
        outputs = [self._fail(seq, why) for seq, why in failed.items()]
        done = [(s, n) for s, n in zip(batch.seqs, batch.num_tokens) if s not in failed and not s.is_finished]
        for seq, n in done:
            self.block_manager.on_computed(seq, n)
            if batch.is_prefill:
                seq.metrics.computed_tokens += n
        on_gpu = self.device.type == "cuda"
        if any(batch.samples) or not on_gpu:
            # The finiteness check syncs with the device. On CUDA it runs only after a step whose sampling already
            # synced, so a long prompt's chunks keep the host preparing the next chunk while the GPU runs (they are
            # checked and published with the step that samples), and decoding sequences publish in batches of
            # blocks, the rest when they finish.
            batched = on_gpu and not batch.is_prefill
            outputs += self._publish([s for s, _ in done], DECODE_PUBLISH_BLOCKS if batched else 1)
        for seq, _ in done:
            if seq in sampled and not seq.is_finished:
                outputs.append(self._emit(seq, sampled[seq]))
        return outputs

    def _run(self, batch: ScheduledBatch) -> tuple[dict[Sequence, Sampled], dict[Sequence, str]]:
        """Run the batch; if it raises, run its sequences one by one so only the ones that fail alone fail.

        Re-running is safe: a sequence's step writes the same cache slots with the same values."""
        try:
            return self._sampled(batch, self.runner.run(batch)), {}
        except Exception:
            logger.exception("engine step over %d sequences failed; retrying them one by one", len(batch.seqs))
        self.runner.history.forget(batch.seqs)  # (the failed draws may have been recorded)
        return self._run_one_by_one(batch)

    def _run_one_by_one(self, batch: ScheduledBatch) -> tuple[dict[Sequence, Sampled], dict[Sequence, str]]:
        sampled, failed = {}, {}
        for seq, n in zip(batch.seqs, batch.num_tokens):
            single = ScheduledBatch([seq], [n], batch.is_prefill)
            try:
                sampled.update(self._sampled(single, self.runner.run(single)))
            except Exception as exc:
                logger.exception("request %s failed in the engine", seq.request_id)
                failed[seq] = f"the engine failed on this request ({type(exc).__name__})"
        return sampled, failed

    @staticmethod
    def _sampled(batch: ScheduledBatch, result: StepResult) -> dict[Sequence, Sampled]:
        """Map the runner's tokens to the sequences the batch marks as sampling (and its prompt log-probs to the
        sequences that asked for them)."""
        for index, position, scored in result.prompt:
            batch.seqs[index].record_prompt_logprob(position, scored)
        drawn = result.sampled
        rows = zip(batch.sampling_seqs, drawn.tokens, drawn.logprobs, drawn.top_logprobs)
        return {seq: Sampled(token, lp, top) for seq, token, lp, top in rows}

    def _publish(self, seqs: list[Sequence], min_blocks: int = 1) -> list[RequestOutput]:
        """Index the blocks these sequences filled (those with at least `min_blocks` waiting), after one check that
        none holds a NaN or inf: a poisoned block would break every agent and the base model on that prefix, so its
        request fails instead."""
        plans = {}
        for seq in seqs:
            plan = self.block_manager.unpublished(seq)
            if plan and max(map(len, plan.values())) >= min_blocks:
                plans[seq] = plan
        if not plans:
            return []
        wanted: dict[str, list[int]] = {}
        for plan in plans.values():
            for pool, ids in plan.items():
                wanted.setdefault(pool, []).extend(ids)
        bad = self.cache.nonfinite_blocks(wanted)
        failed = []
        for seq, plan in plans.items():
            if any(bad.get(pool, set()).intersection(ids) for pool, ids in plan.items()):
                failed.append(self._fail(seq, "the model produced non-finite values (NaN/inf) for this request"))
            else:
                self.block_manager.publish(seq)
        return failed

    def _emit(self, seq: Sequence, drawn: Sampled) -> RequestOutput:
        if not math.isfinite(drawn.logprob):
            return self._fail(seq, "the model produced non-finite logits (NaN/inf) for this request")
        if seq.grammar is not None and not seq.grammar.accept(drawn.token):
            return self._fail(seq, "the sampled token breaks the request's output constraint")
        try:
            self._append_token(seq, drawn)
        except Exception as exc:  # stop handling of this request alone
            logger.exception("post-processing of request %s failed", seq.request_id)
            return self._fail(seq, f"the engine failed on this request ({type(exc).__name__})")
        return self._output(seq, [drawn.token])

    def _fail(self, seq: Sequence, why: str) -> RequestOutput:
        """Finish one request with an error; its blocks are released (unpublished ones are simply reused)."""
        seq.error = why
        self.scheduler.finish(seq, "error")
        seq.metrics.finish_time = time.perf_counter()
        self._seqs.pop(seq.request_id, None)
        return self._output(seq, [])

    def _append_token(self, seq: Sequence, drawn: Sampled) -> None:
        token = drawn.token
        seq.token_ids.append(token)
        seq.logprobs.append(drawn.logprob)
        if seq.params.top_logprobs:
            seq.top_logprobs.append(drawn.top_logprobs)
        m = seq.metrics
        m.generated_tokens += 1
        if m.first_token_time is None:
            m.first_token_time = time.perf_counter()
        reason = self._finish_reason(seq, token)
        if reason is not None and not self._publish([seq]):  # (a failed check has finished it with an error)
            self.scheduler.finish(seq, reason)
            m.finish_time = time.perf_counter()
            self._seqs.pop(seq.request_id, None)
            if self.tokenizer is not None and seq.stop_text_len is None:
                seq.text = self.detokenize(seq)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.grammar is not None and seq.grammar.is_terminated():
            return "stop"  # the constrained output is complete (its EOS, if sampled, is a stop token too)
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None and self._hit_stop_string(seq):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        text = self.detokenize(seq)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not hits:
            return False
        at, stop = min(hits)
        seq.stop_text_len = at + (len(stop) if seq.params.include_stop_str_in_output else 0)
        seq.text = text[: seq.stop_text_len]
        return True

    def detokenize(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            adapter=seq.adapter,
            prompt_token_ids=seq.prompt_ids,
            token_ids=seq.output_ids,
            new_token_ids=new,
            text=seq.text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            metrics=seq.metrics,
            logprobs=list(seq.logprobs),
            top_logprobs=list(seq.top_logprobs),
            prompt_logprobs=seq.prompt_logprobs,  # complete once the first token is out; not written after that
            error=seq.error,
        )

    def reset_prefix_cache(self) -> None:
        """Start cold: forget every cached block no request holds (for benchmarks and experiments)."""
        if self.has_unfinished():
            raise RuntimeError("cannot reset the prefix cache while requests are in flight")
        self.block_manager.drop_cached()
        self._forward("reset_prefix_cache")

    # ---- introspection -------------------------------------------------------------------------------------
    def cache_stats(self) -> dict:
        """Bytes and blocks per pool (key, base_value, lr; under droidspeak also critical_key, critical_value and
        hidden, the hidden states its recomputation reads) and prefix-cache hit counts."""
        layout, cfg = self.cache.layout, self.model_config
        empty = {"bytes_allocated": 0, "bytes_used": 0, "blocks_total": 0, "blocks_in_use": 0}
        pools: dict[str, dict] = {"key": dict(empty), "base_value": dict(empty), "lr": dict(empty)}
        split = {PoolKind.KV: ("key", "base_value"), PoolKind.CRITICAL_KV: ("critical_key", "critical_value")}
        for spec in self.scheme.pools:
            usage = self.block_manager.pools[spec.name].usage()
            block_bytes = spec.bytes_per_block(
                cfg, layout.block_size, layout.lr_rank, self.dtype, layout.critical_layers
            )
            names = split.get(spec.kind, (spec.name,))
            block_bytes //= len(names)  # the KV pool's key and base-value tensors share its block ids
            held = usage["blocks_in_use"] + usage["blocks_cached"]
            for name in names:
                pools[name] = {
                    "bytes_allocated": usage["blocks_total"] * block_bytes,
                    "bytes_used": held * block_bytes,
                    **usage,
                }
        base = self.block_manager.base.stats
        return {
            "sharing": self.scheme.mode.value,
            **({"critical_layers": list(self.scheme.critical_layers)} if self.scheme.critical_layers else {}),
            "block_size": layout.block_size,
            "pools": pools,
            "bytes_used": sum(p["bytes_used"] for p in pools.values()),
            "bytes_allocated": sum(p["bytes_allocated"] for p in pools.values()),
            "hit_rate": base.hit_blocks / base.queried_blocks if base.queried_blocks else 0.0,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }

"""`lragent bench trace`: the paper's multi-agent trace benchmark (LRAgent appendix C.6), our engine under the four
sharing schemes side by side with HF transformers + PEFT, with a roofline floor and plots.

The trace is one growing trajectory that three LoRA agents (plan / action / reflect, rank-8 q/v adapters) take
turns on. Each step appends `prefill` tokens (random ids, or ids from a JSON trace) and the step's agent generates
`generate` tokens (EOS ignored; greedy unless `--temperature` / `--top-p` / `--top-k` ask for sampling, each step's
request then seeded from `--seed`, its trajectory and its step, the same on every system; `--json-schema FILE`
constrains every step's output, engine systems only, and a step then ends when its schema is complete, so throughput
counts the tokens generated). The prompt of every step is the whole trajectory so far as token ids, so what an agent
can reuse is decided by the engine's prefix cache under the sharing scheme alone.

Metrics per system and length: throughput (trajectory tokens / end-to-end time), TTFT (sum of the steps' prefill
latencies), per-step latencies, prompt tokens computed vs reused, peak KV cache bytes, peak device memory, and the
roofline floor (see `lragent.bench.roofline`). `--concurrent K` runs K independent trajectories through one engine
at once (HF + PEFT runs one trajectory at a time, like the published system, so it only takes K = 1).

JSON trace format (`--trace FILE`):
    {"name": "my-trace",
     "steps": [{"agent": "plan",   "prefill": 512,           "generate": 32},
               {"agent": "action", "prefill": [9906, 11, 1917], "generate": 8},
               {"agent": "plan",   "prefill": "ctx",         "generate": 32}]}
  - `agent`: any name; each distinct name becomes one adapter (random rank-8 q/v, shared v_proj A, unless given
    with `--adapter NAME=PATH`).
  - `prefill`: tokens appended before the agent runs: a count (random ids), a list of token ids (replayed as
    given), or "ctx" (a count taken from `--ctx`, one run per value; without "ctx" the trace runs once).
  - `generate`: tokens the agent generates (>= 1). A step may also be written `["plan", 512, 32]`, and the file
    may be a bare list of steps.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lragent.bench.adapters import model_config_for, write_random_adapters
from lragent.bench.decoding import (
    add_sampling_args,
    describe,
    engine_only,
    request_params,
    request_seed,
    sampling_options,
)
from lragent.bench.hf_baseline import HF_SYSTEMS
from lragent.bench.roofline import ModelCost, Rates, calibrate, ideal_floor_s, system_floor_s
from lragent.cache.sharing import SharingMode
from lragent.engine.stats import StepStats
from lragent.sampling import CONSTRAINTS

if TYPE_CHECKING:
    from lragent.engine.llm_engine import LLMEngine, RequestOutput

ENGINE_SYSTEMS = tuple(m.value for m in SharingMode)
ALL_SYSTEMS = ENGINE_SYSTEMS + HF_SYSTEMS
PAPER_CTX = (256, 512, 1024, 2048, 4096, 8192, 16384)
CPU_CTX = (256, 512, 1024)


# ---- the trace ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    agent: str
    prefill: int | str | tuple[int, ...]  # count, "ctx", or explicit token ids
    generate: int

    def appended(self, ctx: int | None) -> int:
        if isinstance(self.prefill, tuple):
            return len(self.prefill)
        if self.prefill == "ctx":
            if ctx is None:
                raise ValueError("the trace has a 'ctx' step but no --ctx value")
            return ctx
        return int(self.prefill)


@dataclass(frozen=True)
class TraceSpec:
    """One concrete trace: steps with `ctx` resolved to counts."""

    name: str
    ctx: int | None
    steps: tuple[Step, ...]

    @property
    def counts(self) -> list[tuple[int, int]]:
        return [(s.appended(self.ctx), s.generate) for s in self.steps]

    @property
    def total_tokens(self) -> int:
        return sum(a + g for a, g in self.counts)

    @property
    def agents(self) -> list[str]:
        return list(dict.fromkeys(s.agent for s in self.steps))

    def label(self) -> str:
        return fmt_tokens(self.total_tokens)


def paper_steps(gen_cap: int | None = None) -> tuple[Step, ...]:
    """The 17 steps of one iteration (appendix C.6); `gen_cap` shortens generation (warm-up, tests)."""

    def g(n: int) -> int:
        return n if gen_cap is None else max(1, min(n, gen_cap))

    steps = [Step("plan", 512, g(32))]
    for i in range(5):  # steps 2..16: plan 8/8, action 8/8, then (four times) plan reads a retrieved document
        steps.append(Step("plan", 8, g(8)))
        steps.append(Step("action", 8, g(8)))
        if i < 4:
            steps.append(Step("plan", "ctx", g(32)))
    steps.append(Step("reflect", 32, g(32)))
    steps.append(Step("reflect", 8, g(8)))
    return tuple(steps)


def paper_trace(ctx: int, gen_cap: int | None = None, first_prefill: int = 512) -> TraceSpec:
    steps = list(paper_steps(gen_cap))
    steps[0] = Step("plan", first_prefill, steps[0].generate)
    return TraceSpec("paper", ctx, tuple(steps))


def parse_trace(data) -> tuple[str, tuple[Step, ...]]:
    """Validate a JSON trace (see the module docstring); returns its name and steps."""
    name = "custom"
    if isinstance(data, dict):
        name = str(data.get("name", name))
        data = data.get("steps")
    if not isinstance(data, list) or not data:
        raise ValueError("a trace needs a non-empty list of steps (a list, or an object with 'steps')")
    steps = []
    for i, raw in enumerate(data):
        where = f"step {i + 1}"
        if isinstance(raw, (list, tuple)):
            if len(raw) != 3:
                raise ValueError(f"{where}: a list step is [agent, prefill, generate], got {raw!r}")
            raw = {"agent": raw[0], "prefill": raw[1], "generate": raw[2]}
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object or a 3-item list, got {type(raw).__name__}")
        unknown = set(raw) - {"agent", "prefill", "generate"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        agent, prefill, generate = raw.get("agent"), raw.get("prefill", 0), raw.get("generate")
        if not isinstance(agent, str) or not agent or "=" in agent:
            raise ValueError(f"{where}: 'agent' must be a non-empty name, got {agent!r}")
        if not isinstance(generate, int) or isinstance(generate, bool) or generate < 1:
            raise ValueError(f"{where}: 'generate' must be an integer >= 1, got {generate!r}")
        if isinstance(prefill, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prefill):
                raise ValueError(f"{where}: 'prefill' token ids must be non-negative integers")
            prefill = tuple(prefill)
        elif prefill == "ctx":
            pass
        elif not isinstance(prefill, int) or isinstance(prefill, bool) or prefill < 0:
            raise ValueError(
                f"{where}: 'prefill' must be a count >= 0, a list of token ids or \"ctx\", got {prefill!r}"
            )
        steps.append(Step(agent, prefill, generate))
    if steps[0].prefill in (0, ()):
        raise ValueError("step 1 must append at least one token (the trajectory starts empty)")
    return name, tuple(steps)


def load_trace(path: str | Path) -> tuple[str, tuple[Step, ...]]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return parse_trace(data)


def token_range(vocab: int) -> tuple[int, int]:
    """Random ids avoid both ends of the vocabulary, where the special tokens usually live."""
    return max(1, min(1000, vocab // 32)), vocab - max(1, vocab // 64)


def appended_tokens(spec: TraceSpec, vocab: int, seed: int, trajectory: int) -> list[list[int]]:
    """The ids each step appends, the same for every system (seeded by trace seed and trajectory index)."""
    lo, hi = token_range(vocab)
    rng = random.Random(f"{seed}/{trajectory}/{spec.name}/{spec.ctx}")
    out = []
    for step, (n, _) in zip(spec.steps, spec.counts):
        if isinstance(step.prefill, tuple):
            bad = [t for t in step.prefill if t >= vocab]
            if bad:
                raise ValueError(f"trace token ids out of range [0, {vocab}): {bad[:5]}")
            out.append(list(step.prefill))
        else:
            out.append([rng.randrange(lo, hi) for _ in range(n)])
    return out


# ---- helpers -----------------------------------------------------------------------------------------------------
def fmt_tokens(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            mult = 1024 if part.endswith("k") else 1
            out.append(int(float(part.rstrip("k")) * mult))
    return out


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _free_cuda() -> None:
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def reset_prefix_cache(engine: LLMEngine) -> None:
    """Forget every cached block so the next run starts cold and its KV peak is its own."""
    engine.reset_prefix_cache()


class StepTimers:
    """Per-kind sums of the engine's `StepStats`: the trace's timing columns.

    Subscribed through `LLMEngine.add_step_listener` (see `step_timers`), so the benchmark times the engine without
    touching its internals. `forward_s` of a step is the model runner's run (prepare + forward + sampling),
    `prepare_s` its host-side input preparation, `step_s` the whole `engine.step()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.run_s = {"prefill": 0.0, "decode": 0.0}
        self.prepare_s = {"prefill": 0.0, "decode": 0.0}
        self.count = {"prefill": 0, "decode": 0}
        self.tokens = {"prefill": 0, "decode": 0}
        self.graphed = {"prefill": 0, "decode": 0}  # forward passes replayed from CUDA graphs
        self.step_s = 0.0

    def __call__(self, stats: StepStats) -> None:
        kind = stats.kind
        self.run_s[kind] += stats.forward_s
        self.prepare_s[kind] += stats.prepare_s
        self.count[kind] += 1
        self.tokens[kind] += stats.num_tokens
        self.graphed[kind] += stats.graphed
        self.step_s += stats.step_s

    def decode_ms(self, seconds: dict[str, float]) -> float | None:
        """Mean milliseconds per decode pass of one of the per-kind sums; None before any decode ran."""
        return 1e3 * seconds["decode"] / self.count["decode"] if self.count["decode"] else None

    def summary(self) -> dict:
        return {
            "forward_passes": dict(self.count),
            "graph_replays": dict(self.graphed),
            "prefill_forward_s": self.run_s["prefill"],
            "decode_forward_s": self.run_s["decode"],
            "decode_step_ms": self.decode_ms(self.run_s),
            "host_prepare_ms_per_decode": self.decode_ms(self.prepare_s),
            "host_prepare_prefill_s": self.prepare_s["prefill"],
            "engine_step_s": self.step_s,  # engine.step() total: scheduling, forward, bookkeeping
            "outside_forward_s": self.step_s - self.run_s["prefill"] - self.run_s["decode"],
        }


@contextmanager
def step_timers(engine: LLMEngine) -> Iterator[StepTimers]:
    """Time every engine step taken inside the block (the listener is removed again on the way out)."""
    timers = StepTimers()
    engine.add_step_listener(timers)
    try:
        yield timers
    finally:
        engine.remove_step_listener(timers)


# ---- our engine ----------------------------------------------------------------------------------------------------
def build_engine(args: argparse.Namespace, system: str, adapters: dict[str, str]) -> LLMEngine:
    from lragent.config import EngineConfig
    from lragent.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=args.model,
        adapters=adapters,
        sharing=system,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.attention_backend,
        max_num_seqs=max(256, max(args.concurrent)),
        max_model_len=args.max_model_len,
        warmup=False if args.no_warmup else None,
        tensor_parallel_size=args.tensor_parallel_size,
        cuda_graph_prefill_tokens=args.cuda_graph_prefill_tokens,
        async_scheduling=args.async_scheduling,
        cascade_decode=args.cascade_decode,
    )
    return LLMEngine(config)


class _Trajectories:
    """K independent trajectories of one trace driven through one engine: what each has appended so far, which step
    it is at, the request it is waiting on, and one record per finished step."""

    def __init__(self, engine: LLMEngine, spec: TraceSpec, k: int, seed: int, sampling: dict | None = None):
        vocab = engine.model_config.vocab_size
        self.engine, self.spec, self.seed, self.sampling = engine, spec, seed, sampling
        self.appended = [appended_tokens(spec, vocab, seed, t) for t in range(k)]
        self.tokens: list[list[int]] = [[] for _ in range(k)]
        self.pos = [0] * k
        self.records: list[list[dict]] = [[] for _ in range(k)]
        self.active: dict[str, int] = {}  # request id -> trajectory
        self.kv_peak = 0  # bytes of cache blocks held (in use + cached), the largest seen after a step

    def submit(self, t: int) -> None:
        """Append trajectory `t`'s next step's tokens and hand the whole trajectory to the step's agent."""
        pos = self.pos[t]
        step = self.spec.steps[pos]
        self.tokens[t].extend(self.appended[t][pos])
        seed = request_seed(self.seed, t, pos)
        params = request_params(self.sampling, seed, max_tokens=step.generate, ignore_eos=True)
        rid = self.engine.add_request(
            list(self.tokens[t]), params, step.agent, request_id=f"t{t}-s{pos}-{time.monotonic_ns()}"
        )
        self.active[rid] = t

    def finish(self, out: RequestOutput) -> None:
        """Record a finished step, append what the agent generated and submit the trajectory's next step."""
        t = self.active.pop(out.request_id)
        m = out.metrics
        step = self.spec.steps[self.pos[t]]
        self.records[t].append(
            {
                "agent": step.agent,
                "appended": len(self.appended[t][self.pos[t]]),
                "prompt_tokens": m.prompt_tokens,
                "reused_tokens": m.reused_tokens,
                "base_reused_tokens": m.base_reused_tokens,
                "computed_tokens": m.computed_tokens,
                "generated": m.generated_tokens,
                "preemptions": m.preemptions,
                "ttft_s": m.ttft_s,
                "latency_s": m.latency_s,
            }
        )
        self.tokens[t].extend(out.token_ids)
        self.pos[t] += 1
        if self.pos[t] < len(self.spec.steps):
            self.submit(t)

    def drive(self, deadline: float) -> str:
        """Step the engine until every trajectory is done (or cannot go on); returns the run's status.

        The peak KV bytes are kept on `self` as they rise, so a run cut short by an exception still reports its peak.
        """
        for t in range(len(self.tokens)):
            self.submit(t)
        while self.active:
            outs = self.engine.step()
            stats = self.engine.cache_stats()
            self.kv_peak = max(self.kv_peak, stats["bytes_used"])  # in use + cached (still findable)
            if not outs and not stats["running"] and stats["waiting"]:
                return "KV budget exhausted (a prompt does not fit the cache)"
            for out in outs:
                if out.finished:
                    self.finish(out)
            if self.active and time.perf_counter() > deadline:
                return "timeout"
        return "ok"

    def abort_all(self) -> None:
        for rid in list(self.active):
            self.engine.abort(rid)


def _capacity_tokens(engine: LLMEngine) -> int:
    """Tokens one sequence can hold in the cache: the smallest pool's blocks (from the public cache stats)."""
    stats = engine.cache_stats()
    return min(p["blocks_total"] for p in stats["pools"].values() if p["blocks_total"]) * stats["block_size"]


def run_engine_trace(
    engine: LLMEngine, spec: TraceSpec, k: int, seed: int, deadline: float, sampling: dict | None = None
) -> dict:
    """K independent trajectories of `spec` through one engine at once, driven with add_request / step; greedy, or
    sampled with `sampling` ({temperature, top_p, top_k})."""
    device = engine.device
    runs = _Trajectories(engine, spec, k, seed, sampling)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with step_timers(engine) as timers:
        t_start = time.perf_counter()
        try:
            status = runs.drive(deadline)
        except ValueError as e:  # a prompt longer than the context, or than the cache can ever hold
            by_cache = engine.max_model_len >= _capacity_tokens(engine)  # the cache, not the model, limits
            status = f"{'KV budget exhausted' if by_cache else 'context length exceeded'}: {e}"
            if str(e).split(":", 1)[0] in CONSTRAINTS:  # a refused constraint (its message names the field)
                status = f"error: {e}"
        except MemoryError as e:
            status = f"KV budget exhausted: {e}"
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            status = "OOM"
        e2e = time.perf_counter() - t_start
    runs.abort_all()
    kv_peak = runs.kv_peak
    row = {"e2e_s": e2e, "status": status, "kv_peak_bytes": kv_peak, **timers.summary()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        pool = engine.cache_stats()["bytes_allocated"]
        row["device_peak_bytes"] = peak
        row["device_peak_effective_bytes"] = peak - pool + kv_peak  # the preallocated pool counted as used only
    row.update(_summarise(runs.records, spec, k))
    reset_prefix_cache(engine)
    return row


def _summarise(records: list[list[dict]], spec: TraceSpec, k: int) -> dict:
    done = [r for r in records if len(r) == len(spec.steps) and all(s.get("ttft_s") is not None for s in r)]
    flat = [s for r in records for s in r]
    out = {
        "trajectories_done": len(done),
        "computed_tokens": sum(s["computed_tokens"] for s in flat),
        "reused_tokens": sum(s["reused_tokens"] for s in flat),
        "prompt_tokens": sum(s["prompt_tokens"] for s in flat),
        "generated_tokens": sum(s["generated"] for s in flat),
        "preemptions": sum(s["preemptions"] for s in flat),
    }
    if done:
        n = len(done)
        out["ttft_s"] = sum(sum(s["ttft_s"] for s in r) for r in done) / n
        out["step_ttft_s"] = [sum(r[i]["ttft_s"] for r in done) / n for i in range(len(spec.steps))]
        out["step_latency_s"] = [sum(r[i]["latency_s"] for r in done) / n for i in range(len(spec.steps))]
        out["step_computed_tokens"] = [sum(r[i]["computed_tokens"] for r in done) / n for i in range(len(spec.steps))]
    if k == 1 and records:
        out["steps"] = records[0]
    return out


def warm_up(
    engine, ctxs: list[int], seed: int, k: int = 1, first_prefill: int = 512, sampling: dict | None = None
) -> None:
    """Compile/warm the kernels on short-generation traces (ids disjoint from the timed runs), then forget them.

    Triton specialises integer arguments (e.g. block-table widths divisible by 16), so a kernel can still compile
    in a timed run; on a GPU a 9.1k-token trace plus the shortest timed length catches most variants (a fresh
    machine's first run still showed one ~1 s compile stall in 17 steps: see BENCHMARKS.md)."""
    for ctx in ctxs:
        spec = paper_trace(ctx, gen_cap=3, first_prefill=first_prefill)
        warm = TraceSpec("warmup", spec.ctx, spec.steps)
        run_engine_trace(engine, warm, min(k, 4), seed + 7919, time.perf_counter() + 600, sampling)
    if k > 4:
        spec = paper_trace(64, 3, first_prefill)
        warm = TraceSpec("warmup", 64, spec.steps)
        run_engine_trace(engine, warm, k, seed + 7919, time.perf_counter() + 600, sampling)


def profile_decode(engine, context: int, steps: int, seed: int, sampling: dict | None = None) -> dict:
    """Where a decode step's time goes at `context` tokens: wall per step, host metadata time, and (CUDA) GPU
    kernel time and launches per step from torch.profiler."""
    vocab = engine.model_config.vocab_size
    lo, hi = token_range(vocab)
    rng = random.Random(seed + 31)
    adapter = sorted(engine.registry.adapters)[0] if engine.registry.adapters else None
    prompt = [rng.randrange(lo, hi) for _ in range(context)]
    engine.add_request(
        prompt,
        request_params(sampling, request_seed(seed, 31), max_tokens=2 * steps + 4, ignore_eos=True),
        adapter,
        request_id="profile",
    )
    with step_timers(engine) as timers:
        while engine.has_unfinished():  # prefill
            engine.step()
            if timers.count["decode"] >= 2:
                break
        timers.reset()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - t0) / steps
    out = {
        "context": context,
        "decode_step_wall_ms": wall * 1e3,
        "runner_run_ms": 1e3 * timers.run_s["decode"] / max(1, timers.count["decode"]),
        "host_prepare_ms": 1e3 * timers.prepare_s["decode"] / max(1, timers.count["decode"]),
    }
    if engine.device.type == "cuda":
        from lragent.bench.profiling import profile_steps

        out.update(profile_steps(engine.step, steps, top=8))
        out["gpu_busy_fraction"] = out["gpu_kernel_ms"] / out["decode_step_wall_ms"]  # against the unprofiled wall
    engine.abort("profile")
    reset_prefix_cache(engine)
    return out


# ---- HF transformers + PEFT ----------------------------------------------------------------------------------------
def run_hf_trace(runner, spec: TraceSpec, vocab: int, seed: int, deadline: float, device: torch.device) -> dict:
    runner.reset()
    appended = appended_tokens(spec, vocab, seed, 0)
    tokens: list[int] = []
    records = []
    status = "ok"
    _free_cuda()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    try:
        for i, step in enumerate(spec.steps):
            tokens.extend(appended[i])
            r = runner.run_step(step.agent, tokens, step.generate, deadline, seed=request_seed(seed, 0, i))
            gen = r.pop("generated")
            records.append(
                {
                    "agent": step.agent,
                    "appended": len(appended[i]),
                    **r,
                    "base_reused_tokens": r["reused_tokens"],
                    "generated": len(gen),
                    "preemptions": 0,
                }
            )
            tokens.extend(gen)
            if time.perf_counter() > deadline and i + 1 < len(spec.steps):
                raise TimeoutError
    except TimeoutError:
        status = "timeout"
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        status = "OOM"
    e2e = time.perf_counter() - t_start
    row = {"e2e_s": e2e, "status": status, "kv_peak_bytes": runner.kv_peak}
    runner.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["device_peak_bytes"] = row["device_peak_effective_bytes"] = torch.cuda.max_memory_allocated(device)
    row.update(_summarise([records], spec, 1))
    _free_cuda()
    return row


# ---- the run -----------------------------------------------------------------------------------------------------
def _finish_row(row: dict, system: str, spec: TraceSpec, k: int, cost: ModelCost, rates: Rates) -> dict:
    row = {
        "system": system,
        "concurrent": k,
        "ctx": spec.ctx,
        "trace": spec.name,
        "total_tokens": spec.total_tokens,
        **row,
    }
    if row["status"] == "ok":
        # tokens generated, not asked for: a constrained step ends when its schema is complete
        generated = row.get("generated_tokens", k * sum(g for _, g in spec.counts))
        row["throughput_tok_s"] = (k * sum(a for a, _ in spec.counts) + generated) / row["e2e_s"]
        _add_floors(row, spec, cost, rates)
    return row


def _add_floors(row: dict, spec: TraceSpec, cost: ModelCost, rates: Rates) -> None:
    """Roofline floors of a finished run: of the trace itself (K trajectories: K x the FLOPs, one weight read per
    pass) and, for K = 1, of the work this system chose to do (its recomputed prefills) and of its prefills alone."""
    k = row["concurrent"]
    row["floor_s"] = ideal_floor_s(cost, rates, spec.counts, batch=k)
    row["time_over_floor"] = row["e2e_s"] / row["floor_s"]
    steps = [(s["prompt_tokens"], s["computed_tokens"], s["generated"]) for s in row.get("steps", [])]
    if k == 1 and steps:
        lr = row["system"] != SharingMode.FULL_SHARED  # every scheme but full_shared reads an LR row per token
        row["system_floor_s"] = system_floor_s(cost, rates, steps, lr=lr)
        row["system_prefill_floor_s"] = system_floor_s(cost, rates, steps, lr=lr, decode=False)


def _row_line(r: dict) -> str:
    ok = r["status"] == "ok"

    def f(key: str, fmt: str) -> str:
        v = r.get(key)
        return format(v, fmt) if (ok and v is not None) else "-"

    dec = r.get("decode_step_ms")
    over = r.get("time_over_floor")
    over_text = format(100 * over, "7.0f") + "%" if ok and over else "       -"
    return (
        f"{r['system']:<15} {r['concurrent']:>3} {fmt_tokens(r['total_tokens']):>6} "
        f"{(r['status'] if not ok else 'ok')[:22]:<22} {f('throughput_tok_s', '10.1f')} {f('ttft_s', '8.3f')} "
        f"{f('e2e_s', '8.2f')} {r.get('computed_tokens', 0):>9} {r.get('reused_tokens', 0):>9} "
        f"{_gib(r.get('kv_peak_bytes')):>8} {_gib(r.get('device_peak_effective_bytes')):>8} "
        f"{f('floor_s', '8.3f')} {over_text} "
        f"{(format(dec, '7.2f')) if dec else '      -'}"
        f"{'' if r.get('decoding', 'greedy') == 'greedy' else '  ' + r['decoding']}"
    )


HEADER = (
    f"{'system':<15} {'K':>3} {'tokens':>6} {'status':<22} {'tok/s':>10} {'TTFT s':>8} {'e2e s':>8} "
    f"{'computed':>9} {'reused':>9} {'KV GiB':>8} {'mem GiB':>8} {'floor s':>8} {'t/floor':>8} {'dec ms':>7}"
)


_RowKey = tuple[str, int | None, int]  # (system, ctx, concurrent)


def _target(name: str, value: Any, threshold: str, passed: bool | None, bound: float | None = None) -> dict:
    """One target's verdict; `bound`: the best value the roofline floors allow (both sides of a ratio at their
    floors)."""
    return {
        "target": name,
        "value": value,
        "threshold": threshold,
        "floor_bound": bound,
        "result": "n/a" if passed is None else ("PASS" if passed else "FAIL"),
    }


def _ratio(a: dict | None, b: dict | None, key: str, invert: bool = False) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return b[key] / a[key] if invert else a[key] / b[key]


def _headline_targets(ok: dict[_RowKey, dict]) -> list[dict]:
    """The paper's 33.7k-token trace (L_ctx 8192): base_lr_shared against full_shared and non_shared."""
    at = 8192
    blr, fs, ns = ok.get(("base_lr_shared", at, 1)), ok.get(("full_shared", at, 1)), ok.get(("non_shared", at, 1))
    out = []
    v = _ratio(blr, fs, "throughput_tok_s")
    out.append(
        _target("33.7k: base_lr_shared / full_shared throughput", v, ">= 0.95", None if v is None else v >= 0.95)
    )
    v = _ratio(blr, ns, "throughput_tok_s")
    out.append(
        _target(
            "33.7k: base_lr_shared / non_shared throughput",
            v,
            ">= 2.5",
            None if v is None else v >= 2.5,
            _ratio(ns, blr, "system_floor_s"),
        )
    )
    v = _ratio(blr, ns, "ttft_s", invert=True)
    out.append(
        _target(
            "33.7k: non_shared / base_lr_shared TTFT",
            v,
            ">= 4.2",
            None if v is None else v >= 4.2,
            _ratio(ns, blr, "system_prefill_floor_s"),
        )
    )
    v = blr["throughput_tok_s"] if blr else None
    out.append(_target("33.7k: base_lr_shared tok/s", v, ">= 8000", None if v is None else v >= 8000))
    return out


def _memory_targets(ok: dict[_RowKey, dict], allrows: dict[_RowKey, dict], ctxs: list[int]) -> list[dict]:
    """Peak KV bytes of the shared-base schemes against non_shared, and no OOM at 66.4k tokens."""
    out = []
    for system in ("base_shared", "base_lr_shared"):
        vals = [_ratio(ok.get((system, c, 1)), ok.get(("non_shared", c, 1)), "kv_peak_bytes") for c in ctxs]
        vals = [x for x in vals if x is not None]
        out.append(
            _target(
                f"{system} / non_shared peak KV bytes (max over lengths)",
                max(vals) if vals else None,
                "<= 0.36",
                None if not vals else max(vals) <= 0.36,
            )
        )
    big = allrows.get(("base_lr_shared", 16384, 1)), allrows.get(("base_shared", 16384, 1))
    if any(big):
        states = {r["system"]: r["status"] for r in big if r}
        bad = [f"{k}: {v}" for k, v in states.items() if v == "OOM" or v.startswith("KV budget")]
        unknown = [k for k, v in states.items() if v != "ok" and f"{k}: {v}" not in bad]
        value = "; ".join(f"{k}: {v}" for k, v in states.items())
        out.append(
            _target(
                "66.4k: no OOM (base_shared, base_lr_shared)",
                value,
                "ok",
                False if bad else (None if unknown and len(unknown) == len(states) else True),
            )
        )
    return out


def _per_length_targets(ok: dict[_RowKey, dict], ctxs: list[int]) -> list[dict]:
    """Per length: our engine against HF + PEFT, base_lr_shared against its roofline floor, and --concurrent 16."""
    out = []
    for c in ctxs:
        v = _ratio(ok.get(("non_shared", c, 1)), ok.get(("hf_non_shared", c, 1)), "throughput_tok_s")
        if v is not None:
            need = 5.0 if c == 256 else 3.0
            out.append(
                _target(
                    f"{fmt_tokens(paper_trace(c).total_tokens)}: non_shared / hf_non_shared throughput",
                    v,
                    f">= {need}",
                    v >= need,
                )
            )
    for c in ctxs:
        r = ok.get(("base_lr_shared", c, 1))
        if r and c >= 2048 and r.get("time_over_floor"):
            out.append(
                _target(
                    f"{fmt_tokens(r['total_tokens'])}: base_lr_shared time / floor",
                    r["time_over_floor"],
                    "<= 1.5",
                    r["time_over_floor"] <= 1.5,
                )
            )
    for (system, c, k), r in ok.items():
        one = ok.get((system, c, 1))
        if k == 16 and one:
            v = r["throughput_tok_s"] / one["throughput_tok_s"]
            bound = k * one["floor_s"] / r["floor_s"] if r.get("floor_s") and one.get("floor_s") else None
            out.append(
                _target(
                    f"{fmt_tokens(r['total_tokens'])}: {system} --concurrent 16 / single throughput",
                    v,
                    ">= 8",
                    v >= 8,
                    bound,
                )
            )
    return out


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on the rows of this run (paper trace only; greedy rows where a merged report
    also holds sampled ones)."""
    if any(r.get("decoding", "greedy") == "greedy" for r in rows):
        rows = [r for r in rows if r.get("decoding", "greedy") == "greedy"]
    ok = {(r["system"], r["ctx"], r["concurrent"]): r for r in rows if r["status"] == "ok" and r["trace"] == "paper"}
    allrows = {(r["system"], r["ctx"], r["concurrent"]): r for r in rows if r["trace"] == "paper"}
    ctxs = sorted({c for (_, c, _) in ok if c is not None})
    return [*_headline_targets(ok), *_memory_targets(ok, allrows, ctxs), *_per_length_targets(ok, ctxs)]


def _print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print("\ntargets (issue 5):")
    for t in targets:
        v = t["value"]
        v = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        bound = t.get("floor_bound")
        note = f"; at the roofline floors: {bound:.2f}" if bound else ""
        print(f"  {t['result']:<5} {t['target']}: {v} (want {t['threshold']}{note})")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lragent bench trace",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_workload_args(p)
    _add_engine_config_args(p)
    _add_run_args(p)
    add_sampling_args(p)
    _add_output_args(p)
    return p


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    """The model, the traces (lengths, steps, concurrency), the systems and the agents' adapters."""
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (CPU), dummy:llama-3.1-8b, dummy:ministral-8b (random weights)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--ctx", default=None, help="L_ctx values, e.g. 256,512,1k (default: 256..16k on CUDA, 256..1k on CPU)"
    )
    p.add_argument("--trace", default=None, help="a JSON trace (see the module doc); default: the paper's 17 steps")
    p.add_argument("--first-prefill", type=int, default=512, help="tokens of step 1 (the paper: 512)")
    p.add_argument("--gen-cap", type=int, default=None, help="cap every step's generation (tests; not the paper)")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument(
        "--concurrent", default="1", help="comma list of K: K independent trajectories at once (engine only)"
    )
    p.add_argument("--hf-max-tokens", type=int, default=None, help="skip HF + PEFT on traces longer than this")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a real PEFT adapter for an agent (default: random rank-8 q/v with shared v_proj A)",
    )
    p.add_argument(
        "--adapter-targets",
        default="q_proj,v_proj",
        help="modules of the random adapters, e.g. q_proj,k_proj,v_proj,o_proj (k_proj and v_proj A shared)",
    )


def _add_engine_config_args(p: argparse.ArgumentParser) -> None:
    """The engine's cache, batching and attention settings."""
    p.add_argument("--block-size", type=int, default=0, help="tokens per KV block (0: the engine's default)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV budget (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model's); dummy models may go past their trained length",
    )
    p.add_argument("--attention-backend", default="auto")
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs (ranks) per engine: NCCL on CUDA, gloo on CPU"
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Time limits, warm-up, decode profiling and the seed."""
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds per (system, length, K) run")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds for the whole benchmark; later runs are skipped"
    )
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--cascade-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode rows sharing >= 1024 cached prefix tokens read them once per step (default: the engine's, on "
        "for CUDA)",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode one step ahead of the host (default: the engine's, on for CUDA)",
    )
    p.add_argument(
        "--cuda-graph-prefill-tokens",
        type=int,
        default=512,
        help="prefill steps of up to this many tokens replay a CUDA graph (0: eager, as before 2026-12-02)",
    )
    p.add_argument(
        "--profile-decode",
        type=int,
        default=None,
        metavar="CTX",
        help="also break a decode step at CTX tokens down (host vs GPU kernels) for every engine system",
    )
    p.add_argument("--seed", type=int, default=0, help="trace ids, and the per-request seeds when sampling")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Where results go, and --report (merge earlier results instead of running)."""
    p.add_argument("--out", default="results/trace", help="results folder (trace.json, PNG plots)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="TRACE_JSON",
        help="run nothing: merge these trace.json files, print the table and targets, write --out",
    )


def _parse_systems(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The systems to run; also turns `--concurrent` into a list of K (argparse errors exit like any bad flag)."""
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    args.concurrent = [int(k) for k in args.concurrent.split(",")]
    if any(k < 1 for k in args.concurrent):
        p.error("--concurrent values must be >= 1")
    return systems


def _trace_specs(args: argparse.Namespace, ctxs: list[int]) -> list[TraceSpec]:
    """One spec per `--ctx` value (the paper's trace, or a JSON trace with "ctx" steps); a trace without "ctx"
    steps runs once."""
    if not args.trace:
        return [paper_trace(c, args.gen_cap, args.first_prefill) for c in ctxs]
    name, steps = load_trace(args.trace)
    if args.gen_cap:
        steps = tuple(Step(s.agent, s.prefill, max(1, min(s.generate, args.gen_cap))) for s in steps)
    has_ctx = any(s.prefill == "ctx" for s in steps)
    return [TraceSpec(name, c, steps) for c in ctxs] if has_ctx else [TraceSpec(name, None, steps)]


def _run_meta(
    args: argparse.Namespace,
    argv: list[str] | None,
    device: torch.device,
    dtype: torch.dtype,
    rates: Rates,
    agents: list[str],
    given: dict[str, str],
) -> dict:
    """What the results were measured on and with (written to trace.json's `meta`)."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    meta = {
        "model": args.model,
        "random_weights": args.model.startswith("dummy:"),
        "device": args.device,
        "device_name": device_name,
        "dtype": str(dtype).split(".")[-1],
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "lragent bench trace " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "rates": rates.as_dict(),
        "agents": agents,
        "decoding": describe(args.sampling),
        "sampling": args.sampling,
        "adapters": "given: " + ", ".join(given)
        if given
        else f"random rank-8 {args.adapter_targets} LoRA (alpha 16), shared k_proj / v_proj A",
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        pass
    return meta


@dataclass
class _Run:
    """One benchmark invocation: its settings, traces, cost model and deadline, and the results written so far
    (trace.json is rewritten after every row, so an interrupted run keeps what it measured)."""

    args: argparse.Namespace
    specs: list[TraceSpec]
    ctxs: list[int]
    device: torch.device
    dtype: torch.dtype
    cost: ModelCost
    rates: Rates
    budget_end: float
    result: dict
    json_path: Path

    def over_budget(self) -> bool:
        return time.perf_counter() > self.budget_end

    def save(self) -> None:
        self.json_path.write_text(json.dumps(self.result, indent=1, default=str))

    def record(self, row: dict) -> None:
        row.setdefault("decoding", self.result["meta"]["decoding"])
        self.result["rows"].append(row)
        print(_row_line(row), flush=True)
        self.save()

    def finish(self, row: dict, system: str, spec: TraceSpec, k: int) -> dict:
        """Record a measured row (with throughput and floors) and return it."""
        row = _finish_row(row, system, spec, k, self.cost, self.rates)
        self.record(row)
        return row

    def skipped(self, system: str, spec: TraceSpec, k: int, why: str) -> None:
        self.record(_finish_row({"status": why, "e2e_s": None}, system, spec, k, self.cost, self.rates))

    def skip_all(self, system: str, why: str, ks: list[int]) -> None:
        for spec in self.specs:
            for k in ks:
                self.skipped(system, spec, k, why)

    def deadline(self) -> float:
        """When the next run must stop: its own timeout or the end of the whole budget, whichever is first."""
        return min(time.perf_counter() + self.args.run_timeout, self.budget_end)


def _agent_adapters(args: argparse.Namespace, agents: list[str], given: dict[str, str], tmp: Path) -> dict[str, str]:
    """Agent -> adapter folder: the ones given with `--adapter`, random rank-8 q/v (shared v_proj A) for the rest."""
    missing = [a for a in agents if a not in given]
    adapters = dict(given)
    if missing:
        targets = tuple(t.strip() for t in args.adapter_targets.split(",") if t.strip())
        adapters.update(write_random_adapters(args.model, tmp, missing, rank=8, targets=targets, shared_a=True))
    return {a: adapters[a] for a in agents}


def _start_engine(run: _Run, system: str, adapters: dict[str, str]) -> LLMEngine:
    """Build the engine of one system and (unless `--no-warmup`) compile its kernels on throw-away traces."""
    args = run.args
    engine = build_engine(args, system, adapters)
    if not args.no_warmup:
        gpu = run.device.type == "cuda"
        warm_ctx = sorted({2048, min(run.ctxs)}) if gpu else [16]
        warm_up(engine, warm_ctx, args.seed, max(args.concurrent), 512 if gpu else 32, args.sampling)
    return engine


def _run_engine_system(run: _Run, system: str, adapters: dict[str, str]) -> None:
    """Every (length, K) of one sharing scheme on one engine; a length that OOMs or times out skips the longer ones."""
    args = run.args
    if run.over_budget():
        run.skip_all(system, "skipped (time budget)", args.concurrent)
        return
    try:
        engine = _start_engine(run, system, adapters)
    except Exception as e:  # noqa: BLE001 - reported, not raised: the other systems still run
        run.skip_all(system, "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}", args.concurrent)
        _free_cuda()
        return
    failed = None
    for spec in run.specs:
        for k in args.concurrent:
            if failed:
                run.skipped(system, spec, k, f"skipped ({failed} at a shorter length)")
            elif run.over_budget():
                run.skipped(system, spec, k, "skipped (time budget)")
            else:
                measured = run_engine_trace(engine, spec, k, args.seed, run.deadline(), args.sampling)
                row = run.finish(measured, system, spec, k)
                if row["status"] in ("OOM", "timeout"):
                    failed = row["status"]
    if args.profile_decode and not run.over_budget():
        try:
            run.result["profiles"][system] = profile_decode(engine, args.profile_decode, 16, args.seed, args.sampling)
            run.save()
        except Exception as e:  # noqa: BLE001
            run.result["profiles"][system] = {"error": f"{type(e).__name__}: {e}"}
    del engine
    _free_cuda()


def _run_hf_system(run: _Run, system: str, model: Any, vocab: int) -> None:
    """Every length of one HF + PEFT system (K = 1 only), with the same skipping rules as the engine's."""
    from lragent.bench.hf_baseline import HFRunner

    args = run.args
    runner = HFRunner(model, system, args.device, args.sampling) if model is not None else None
    if runner is not None and not args.no_warmup:
        warm = paper_trace(16, gen_cap=2, first_prefill=32)
        run_hf_trace(
            runner, TraceSpec("warmup", 16, warm.steps), vocab, args.seed + 7919, time.perf_counter() + 120, run.device
        )
    failed = None
    for spec in run.specs:
        if runner is None or run.over_budget():
            run.skipped(system, spec, 1, "skipped (time budget)")
        elif failed:
            run.skipped(system, spec, 1, f"skipped ({failed} at a shorter length)")
        elif args.hf_max_tokens and spec.total_tokens > args.hf_max_tokens:
            run.skipped(system, spec, 1, "skipped (--hf-max-tokens)")
        else:
            row = run.finish(run_hf_trace(runner, spec, vocab, args.seed, run.deadline(), run.device), system, spec, 1)
            if row["status"] in ("OOM", "timeout"):
                failed = row["status"]


def _run_hf_systems(run: _Run, systems: list[str], adapters: dict[str, str], vocab: int) -> None:
    """The HF + PEFT baselines: one PeftModel with every agent's adapter, shared by both systems."""
    if systems and (flags := engine_only(run.args.sampling)):
        for system in systems:
            run.skip_all(system, f"skipped ({flags}: engine only)", [1])
        return
    if not systems:
        return
    from lragent.bench.hf_baseline import load_hf_peft

    model = None
    try:
        if not run.over_budget():
            model = load_hf_peft(run.args.model, adapters, run.args.device, run.dtype)
    except Exception as e:  # noqa: BLE001
        for system in systems:
            run.skip_all(system, "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}", [1])
        systems = []
    for system in systems:
        _run_hf_system(run, system, model, vocab)
    del model
    _free_cuda()


def _print_intro(run: _Run) -> None:
    meta, rates = run.result["meta"], run.rates
    weights = "RANDOM weights: speed only, outputs meaningless" if meta["random_weights"] else "real weights"
    print(f"trace benchmark: {meta['model']} ({weights}), {meta['dtype']} on {meta['device_name']}; {meta['adapters']}")
    print(
        f"calibration: matmul {rates.matmul_flops / 1e12:.1f} TFLOP/s, copy {rates.copy_bytes / 1e9:.0f} GB/s "
        f"(floor = every forward pass at max(FLOPs / matmul rate, bytes / copy bandwidth))"
    )
    print(f"decoding: {meta['decoding']}", flush=True)
    print(HEADER, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = _build_parser()
    args = p.parse_args(argv)
    if args.report:
        return report_main(args.report, args.out, not args.no_plots)
    args.sampling = sampling_options(args, p)

    t_begin = time.perf_counter()
    device = torch.device(args.device)
    systems = _parse_systems(p, args)
    ctxs = parse_sizes(args.ctx) if args.ctx else list(PAPER_CTX if device.type == "cuda" else CPU_CTX)
    specs = _trace_specs(args, ctxs)
    agents = specs[0].agents
    mconfig = model_config_for(args.model)
    from lragent.config import EngineConfig

    dtype = EngineConfig(model=args.model, device=args.device, dtype=args.dtype).torch_dtype
    given = dict(a.split("=", 1) for a in args.adapter)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rates = calibrate(device, dtype)
    result = {
        "meta": _run_meta(args, argv, device, dtype, rates, agents, given),
        "rows": [],
        "profiles": {},
        "targets": [],
    }
    run = _Run(
        args,
        specs,
        ctxs,
        device,
        dtype,
        ModelCost.of(mconfig, dtype),
        rates,
        t_begin + args.time_budget if args.time_budget else math.inf,
        result,
        out_dir / "trace.json",
    )
    _print_intro(run)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = _agent_adapters(args, agents, given, Path(tmp))
        for system in [s for s in systems if s in ENGINE_SYSTEMS]:
            _run_engine_system(run, system, adapters)
        _run_hf_systems(run, [s for s in systems if s in HF_SYSTEMS], adapters, mconfig.vocab_size)

    result["meta"]["wall_s"] = time.perf_counter() - t_begin
    return report(result, out_dir, plots=not args.no_plots, targets=not args.trace)


def report(result: dict, out_dir: Path, plots: bool = True, targets: bool = True) -> int:
    """Print the table (grouped by length), the decode profiles and the targets; write trace.json and the plots."""
    rows = result["rows"]
    print("\n" + HEADER)
    keys = sorted({(r["trace"], r["total_tokens"]) for r in rows}, key=lambda kv: kv[1])
    for key in keys:
        for r in sorted(
            (r for r in rows if (r["trace"], r["total_tokens"]) == key),
            key=lambda r: (r["concurrent"], ALL_SYSTEMS.index(r["system"]), r.get("decoding", "greedy")),
        ):
            print(_row_line(r))
    print(
        "tok/s = trajectory tokens (appended + generated) x K / end-to-end time; TTFT = sum of prefill latencies "
        "(per trajectory); KV GiB = peak cache bytes held (in use + reusable); mem GiB = peak device memory with "
        "the engine's preallocated pool counted only as far as used; t/floor = time / roofline floor; "
        "dec ms = mean decode forward pass"
    )
    print(f"decoding: {result['meta'].get('decoding', 'greedy')}")
    if result["meta"].get("random_weights"):
        print("NOTE: random (dummy) weights: speed only; generated tokens are meaningless.")
    for system, prof in result.get("profiles", {}).items():
        print(f"decode profile {system}: " + json.dumps(prof))
    result["targets"] = check_targets(rows) if targets else []
    _print_targets(result["targets"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "trace.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    if plots:
        try:
            from lragent.bench.plots import plot_results

            for path in plot_results(result, out_dir):
                print("wrote", path)
        except ImportError:
            print("matplotlib is missing: no plots (python -m lragent.bench.plots trace.json redraws them)")
    print("wrote", json_path)
    return 0


def _backfill_floors(data: dict) -> None:
    """Floors that files written by older versions lack, from the rates measured in their own run."""
    meta, rows = data["meta"], data["rows"]
    todo = [
        r
        for r in rows
        if r["status"] == "ok"
        and r["trace"] == "paper"
        and r.get("ctx") is not None
        and ("system_prefill_floor_s" not in r if r["concurrent"] == 1 else "floor_s" not in r)
    ]
    if not todo or "rates" not in meta:
        return
    m = meta["rates"]
    rates = Rates(m["matmul_TFLOPs"] * 1e12, m["copy_GBps"] * 1e9, m["device"], m["dtype"])
    cost = ModelCost.of(model_config_for(meta["model"]), getattr(torch, meta["dtype"]))
    for r in todo:
        spec = paper_trace(r["ctx"])
        # the paper's trace as run (not a --gen-cap / --first-prefill variant)
        if spec.total_tokens == r["total_tokens"]:
            _add_floors(r, spec, cost, rates)


def report_main(files: list[str], out_dir: str, plots: bool) -> int:
    """Merge the rows (and profiles) of several trace.json files of one machine and report them together."""
    merged = None
    for f in files:
        data = json.loads(Path(f).read_text())
        if merged is None:
            merged = {"meta": dict(data["meta"], merged_from=list(files)), "rows": [], "profiles": {}}
        _backfill_floors(data)
        merged["rows"].extend(data["rows"])
        merged["profiles"].update(data.get("profiles", {}))
    best: dict[tuple, dict] = {}
    for r in merged["rows"]:  # a later file's row wins, except that a completed run beats one that did not finish
        key = (r["system"], r["trace"], r["total_tokens"], r["concurrent"], r.get("decoding", "greedy"))
        if key not in best or r["status"] == "ok" or best[key]["status"] != "ok":
            best[key] = r
    merged["rows"] = list(best.values())
    decodings = sorted({r.get("decoding", "greedy") for r in merged["rows"]})
    merged["meta"]["decoding"] = decodings[0] if len(decodings) == 1 else "mixed: " + "; ".join(decodings)
    return report(merged, Path(out_dir), plots, targets=all(r["trace"] == "paper" for r in merged["rows"]))


if __name__ == "__main__":
    raise SystemExit(main())

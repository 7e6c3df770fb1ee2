#!/usr/bin/env python
"""Load test: N concurrent plan/action/reflect trajectories replayed through the OpenAI API of an lragent server.

Each trajectory is a short agent episode (a small trace in the shape of the paper's appendix C.6): `plan` reads
the context and writes a thought, `action` writes a tool call, a tool observation is appended, and so on for
`--iterations`, then `reflect`. Every agent sends the whole trajectory; the server shares the prefix across
adapters. All agents of all trajectories run concurrently (bounded by --agents), for --rounds rounds with fresh
trajectories, within --max-seconds. Loopback only.

Reports per round requests/s, prompt+generated tokens/s, client TTFT p50/p99 (time to the first streamed token),
errors (must be 0), the share of prompt tokens served from the cache, and the server's resident memory before and
after, to show it does not grow across rounds (a warm-up first fills the KV cache in near-maximal prefill steps,
so the allocator's high-water mark is reached before the first round). Prints a table and one parseable
`LOADTEST ...` line, writes JSON; exits 1 on any error or if a sequence or cache block is left behind.

    python scripts/load_test.py                                   # spawns a CPU server with random role adapters
    python scripts/load_test.py --url http://127.0.0.1:8000       # an already running server
    python scripts/load_test.py --write-adapters /tmp/roles       # just write random shared-A adapters
    python scripts/load_test.py --model dummy:llama-3.1-8b --device cuda --dtype bfloat16 --kv-cache-bytes 16G \
        --max-model-len 8192                                      # GPU, token-id prompts (scripts/gpu_load_test.sh)

Greedy by default; `--temperature --top-p --top-k` make every request sample (temperature and top_p through the
OpenAI client, top_k in extra_body, and a fixed seed per trajectory and turn); `--json-schema FILE` constrains every
answer (chat API: `response_format` json_schema). The decoding is printed, written to the JSON and put on the
`LOADTEST` line.

On CUDA the GPU's used memory (nvidia-smi) is read before and after every round as well. `--kv-cache-bytes auto`
lets the engine size the cache (1 GiB on CPU, --gpu-memory-utilization of the card on CUDA). The JSON is rewritten
after every round, so a run stopped by an outer time limit keeps the rounds it finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

ROLES = ("plan", "action", "reflect")
WORDS = (
    "the river city museum north treaty harbor album singer novel season team founded during second director "
    "village county railway film island species award band league war empire college bridge mountain bishop "
    "station festival journal born written released located known career party election poet painter ship"
).split()
SYSTEM = (
    "You are one of three agents (plan, action, reflect) answering a multi-hop question. Tools: Retrieve[entity], "
    "Lookup[keyword], Finish[answer]. Think step by step and keep the trajectory consistent."
)


# ---- random role adapters -------------------------------------------------------------------------------------
def write_random_adapters(folder: Path, model: str, rank: int = 8, seed: int = 0) -> dict[str, str]:
    """Three q/v LoRA adapters in PEFT's file format whose v_proj A is shared (valid under base_lr_shared)."""
    import torch
    from safetensors.torch import save_file

    from lragent.model_config import ModelConfig
    from lragent.models.hub import resolve_model
    from lragent.models.presets import preset

    if model.startswith("dummy:"):
        config = ModelConfig.from_dict(preset(model.split(":", 1)[1]), name=model)
    else:
        config = ModelConfig.from_file(resolve_model(model) / "config.json", name=model)
    shapes, gen = config.module_shapes(), torch.Generator().manual_seed(seed)
    shared_a = {
        layer: torch.randn(rank, shapes["v_proj"][0], generator=gen) / shapes["v_proj"][0] ** 0.5
        for layer in range(config.num_layers)
    }
    paths = {}
    for role in ROLES:
        tensors = {}
        for layer in range(config.num_layers):
            for module in ("q_proj", "v_proj"):
                d_in, d_out = shapes[module]
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                a = shared_a[layer] if module == "v_proj" else torch.randn(rank, d_in, generator=gen) / d_in**0.5
                tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.05
        out = folder / role
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        paths[role] = str(out)
    return paths


# ---- the server -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(args: argparse.Namespace, adapters: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lragent.server",
        "--model",
        args.model,
        "--sharing",
        args.sharing,
        "--device",
        args.device,
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if args.kv_cache_bytes and args.kv_cache_bytes != "auto":
        cmd += ["--kv-cache-bytes", args.kv_cache_bytes]
    for flag in ("dtype", "gpu_memory_utilization", "max_model_len", "max_num_batched_tokens", "attention_backend"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    cmd += args.server_arg
    for role, path in adapters.items():
        cmd += ["--adapter", f"{role}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"the server did not become healthy in {args.startup_timeout:.0f} s")
    except BaseException:  # also a SIGTERM (Stopped) during start-up: don't leave the server behind
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise


def gpu_used_mib(device: str) -> float | None:
    """Used memory of the card (nvidia-smi, every process: the server is the only one on a lent machine)."""
    if not device.startswith("cuda"):
        return None
    index = device.split(":", 1)[1] if ":" in device else "0"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def scrape(url: str, api_key: str | None = None) -> dict[str, float]:
    """Selected /metrics samples, summed over labels (with the key: a keyed server guards /metrics too)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers=headers), timeout=60) as r:
        text = r.read().decode()
    wanted = {
        "process_resident_memory_bytes": "rss",
        "lragent_num_requests_running": "running",
        "lragent_num_requests_waiting": "waiting",
        "lragent_prompt_tokens_total": "prompt",
        "lragent_prompt_tokens_reused_total": "reused",
        "lragent_prompt_tokens_computed_total": "computed",
    }
    out = dict.fromkeys([*wanted.values(), "blocks_in_use", "key_blocks", "block_size"], 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        if base in wanted:
            out[wanted[base]] += float(value)
        elif base == "lragent_cache_blocks" and 'state="in_use"' in name:
            out["blocks_in_use"] += float(value)
        elif base == "lragent_cache_blocks" and 'pool="key"' in name and 'state="total"' in name:
            out["key_blocks"] = float(value)
        elif base == "lragent_info" and 'block_size="' in name:
            out["block_size"] = float(name.split('block_size="', 1)[1].split('"', 1)[0])
    return out


async def warm_up(url: str, args: argparse.Namespace) -> dict:
    """Fill the whole KV cache once, in near-maximal prefill steps, before measuring: the allocator's high-water
    mark (activations of the largest step, Python and torch pools) is reached here, so RSS changes across the
    rounds that follow are real growth."""
    before = scrape(url, args.api_key)
    capacity = int(before["key_blocks"] * before["block_size"])
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", max_retries=0, timeout=600)
    cards = (await client.models.list()).data
    max_len = int((cards[0].model_extra or {}).get("max_model_len", 512))
    chunk = min(256, max_len - 1)
    count = -(-capacity * 11 // 10 // chunk)  # 10% more tokens than the cache holds, in distinct prompts
    rng = random.Random(args.seed + 99)
    start = time.perf_counter()
    prompts = [[rng.randrange(1000, 30000) for _ in range(chunk)] for _ in range(count)]
    await asyncio.gather(
        *(client.completions.create(model=ROLES[0], prompt=p, max_tokens=1, temperature=0) for p in prompts)
    )
    # a few decode steps with every adapter at once (compiles the decode and multi-LoRA paths on a GPU)
    await asyncio.gather(
        *(
            client.completions.create(model=role, prompt=prompts[i % count][:32], max_tokens=4, temperature=0)
            for i, role in enumerate(ROLES)
        )
    )
    await client.close()
    after = scrape(url, args.api_key)
    return {
        "warmup_s": time.perf_counter() - start,
        "warmup_prompt_tokens": count * chunk,
        "cache_capacity_tokens": capacity,
        "rss_before_warmup_mib": before["rss"] / 2**20,
        "rss_after_warmup_mib": after["rss"] / 2**20,
        "gpu_used_after_warmup_mib": gpu_used_mib(args.device),
    }


# ---- trajectories ---------------------------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Trajectory:
    """One agent episode; `messages` for the chat API, `ids` for token-id prompts (dummy models)."""

    rng: random.Random
    api: str
    seed: int = 0  # the requests' seeds (when sampling) are seed * 64 + turn
    turn: int = 0
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    def start(self, context_words: int) -> None:
        question = f"Question: {words(self.rng, 16)}?\nContext: {words(self.rng, context_words)}"
        self.messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        self.ids = [self.rng.randrange(1000, 30000) for _ in range(context_words + 40)]

    def observe(self, n_words: int) -> None:
        self.messages.append({"role": "user", "content": f"Observation: {words(self.rng, n_words)}"})
        self.ids += [self.rng.randrange(1000, 30000) for _ in range(n_words)]

    def answer(self, text: str, n_tokens: int) -> None:
        self.turn += 1
        self.messages.append({"role": "assistant", "content": text})
        self.ids += [self.rng.randrange(1000, 30000) for _ in range(n_tokens)]  # stands in for the generated ids


def turns(iterations: int) -> list[tuple[str, bool]]:
    """(role, observation before it) for one episode."""
    plan = [("plan", i > 0) for i in range(iterations)]
    return [t for pair in zip(plan, [("action", False)] * iterations) for t in pair] + [("reflect", True)]


@dataclass
class Sample:
    ttft: float
    latency: float
    prompt: int
    cached: int
    generated: int


async def one_request(client: openai.AsyncOpenAI, traj: Trajectory, role: str, args) -> tuple[Sample, str]:
    start = time.perf_counter()
    extra: dict = {"ignore_eos": True}
    common = dict(
        model=role,
        max_tokens=args.gen_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if sampled(args):
        common.update(top_p=args.top_p, seed=traj.seed * 64 + traj.turn)
        if args.top_k > 0:
            extra["top_k"] = args.top_k
    if args.schema is not None:
        common["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": args.schema}}
    if traj.api == "chat":
        stream = await client.chat.completions.create(messages=traj.messages, extra_body=extra, **common)
    else:
        stream = await client.completions.create(prompt=traj.ids, extra_body=extra, **common)
    first, text, usage = None, [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = (c.delta.content if traj.api == "chat" else c.text) or ""
            if first is None and (piece or c.finish_reason):
                first = time.perf_counter()
            text.append(piece)
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("no usage in the last chunk")
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    sample = Sample((first or end) - start, end - start, usage.prompt_tokens, cached or 0, usage.completion_tokens)
    return sample, "".join(text)


async def run_episode(
    client, traj: Trajectory, args, samples: list[Sample], errors: list[str], deadline: float
) -> None:
    traj.start(args.context_words)
    for role, observe in turns(args.iterations):
        if time.time() > deadline:
            return
        if observe:
            traj.observe(args.observation_words)
        try:
            sample, text = await one_request(client, traj, role, args)
        except Exception as exc:  # counted, reported, and the episode ends
            errors.append(f"{role}: {type(exc).__name__}: {exc}")
            return
        samples.append(sample)
        traj.answer(text, sample.generated)


def sampled(args: argparse.Namespace) -> bool:
    return args.temperature >= 1e-5  # below this the server decodes greedily (lragent.sampling.GREEDY_TEMPERATURE)


def decoding(args: argparse.Namespace) -> str:
    """'greedy' or e.g. 'T0.9/p0.75/k40', '+json_schema' when constrained (no spaces: it goes on the LOADTEST line)."""
    suffix = "+json_schema" if args.schema is not None else ""
    if not sampled(args):
        return "greedy" + suffix
    parts = [f"T{args.temperature:g}"]
    if args.top_p < 1:
        parts.append(f"p{args.top_p:g}")
    if args.top_k > 0:
        parts.append(f"k{args.top_k}")
    return "/".join(parts) + suffix


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_round(url: str, args, round_no: int, deadline: float) -> dict:
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=args.api_key or "none", max_retries=0, timeout=args.request_timeout
    )
    before = scrape(url, args.api_key)
    gpu_before = gpu_used_mib(args.device)
    samples: list[Sample] = []
    errors: list[str] = []
    start = time.perf_counter()
    episodes = [
        run_episode(
            client,
            Trajectory(
                random.Random(args.seed * 1000 + round_no * 100 + i), args.api, args.seed * 1000 + round_no * 100 + i
            ),
            args,
            samples,
            errors,
            deadline,
        )
        for i in range(args.agents)
    ]
    await asyncio.gather(*episodes)
    wall = time.perf_counter() - start
    await client.close()
    await asyncio.sleep(0.2)
    after = scrape(url, args.api_key)
    ttfts = [s.ttft for s in samples]
    tokens = sum(s.prompt + s.generated for s in samples)
    prompt = sum(s.prompt for s in samples)
    return {
        "round": round_no,
        "ttfts": ttfts,
        "requests": len(samples),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": wall,
        "req_per_s": len(samples) / wall,
        "tok_per_s": tokens / wall,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p99_s": pct(ttfts, 0.99),
        "latency_p50_s": pct([s.latency for s in samples], 0.5),
        "prompt_tokens": prompt,
        "cached_share": sum(s.cached for s in samples) / prompt if prompt else 0.0,
        "computed_prompt_tokens": after["computed"] - before["computed"],
        "rss_before_mib": before["rss"] / 2**20,
        "rss_after_mib": after["rss"] / 2**20,
        "gpu_used_before_mib": gpu_before,
        "gpu_used_after_mib": gpu_used_mib(args.device),
        "left_running": after["running"] + after["waiting"],
        "blocks_in_use_after": after["blocks_in_use"],
    }


HEADER = (
    f"{'round':>5} {'reqs':>5} {'err':>4} {'wall s':>7} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
    f"{'cached':>7} {'RSS before':>11} {'RSS after':>10}"
)


def row_line(r: dict) -> str:
    return (
        f"{r['round']:>5} {r['requests']:>5} {r['errors']:>4} {r['wall_s']:>7.1f} {r['req_per_s']:>6.2f} "
        f"{r['tok_per_s']:>7.0f} {r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p99_s'] * 1e3:>7.0f}ms "
        f"{r['cached_share']:>6.0%} {r['rss_before_mib']:>8.0f}MiB {r['rss_after_mib']:>7.0f}MiB"
    )


def summarize(args: argparse.Namespace, rows: list[dict], warm: dict) -> dict:
    ttfts = [t for r in rows for t in r["ttfts"]]
    requests, wall = sum(r["requests"] for r in rows), sum(r["wall_s"] for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows)
    summary = {
        "decoding": decoding(args),
        "agents": args.agents,
        "rounds": len(rows),
        "requests": requests,
        "errors": sum(r["errors"] for r in rows),
        "req_per_s": requests / wall if wall else 0.0,
        "tok_per_s": sum(r["tok_per_s"] * r["wall_s"] for r in rows) / wall if wall else 0.0,
        "ttft_p50_ms": 1e3 * pct(ttfts, 0.5),
        "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
        "cached_share": sum(r["cached_share"] * r["prompt_tokens"] for r in rows) / prompt if prompt else 0.0,
        "rss_baseline_mib": warm.get("rss_after_warmup_mib", rows[0]["rss_after_mib"]),
        "rss_growth_mib": rows[-1]["rss_after_mib"] - warm.get("rss_after_warmup_mib", rows[0]["rss_after_mib"]),
        "rss_growth_after_round1_mib": rows[-1]["rss_after_mib"] - rows[0]["rss_after_mib"],
        "left_running": rows[-1]["left_running"],
        "blocks_in_use_after": rows[-1]["blocks_in_use_after"],
    }
    gpu_after = [r["gpu_used_after_mib"] for r in rows if r.get("gpu_used_after_mib") is not None]
    if gpu_after:
        summary["gpu_used_mib"] = gpu_after[-1]
        summary["gpu_growth_after_round1_mib"] = gpu_after[-1] - gpu_after[0]
    return summary


def write_json(args: argparse.Namespace, meta: dict, warm: dict, rows: list[dict], summary: dict | None) -> None:
    if not args.json:
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "args": vars(args), "warmup": warm, "rounds": rows, "summary": summary}
    if summary is None:
        doc["partial"] = True
    Path(args.json).write_text(json.dumps(doc, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="an already running server (default: spawn one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sharing", default="base_lr_shared")
    p.add_argument("--kv-cache-bytes", default="256M", help="'auto': the engine's default (GPU: a share of the card)")
    p.add_argument("--dtype", default=None, help="server --dtype (default: its own, float32 on CPU, bfloat16 on CUDA)")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=None, help="server flag (with --kv-cache-bytes auto)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="server flag")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="server flag")
    p.add_argument("--attention-backend", default=None, help="server flag")
    p.add_argument(
        "--server-arg", action="append", default=[], metavar="ARG", help="one more argument for the server (repeatable)"
    )
    p.add_argument("--adapters-dir", help="role adapters plan/action/reflect (default: random shared-A ones)")
    p.add_argument("--write-adapters", metavar="DIR", help="write random shared-A role adapters to DIR and exit")
    p.add_argument("--api", choices=["chat", "tokens"], default=None, help="default: chat, tokens for dummy models")
    p.add_argument("--agents", type=int, default=8, help="concurrent trajectories")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2, help="plan/action pairs per trajectory (then reflect)")
    p.add_argument("--context-words", type=int, default=200)
    p.add_argument("--observation-words", type=int, default=60)
    p.add_argument("--gen-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: every request samples, seeded")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus cut when sampling (1: off)")
    p.add_argument("--top-k", type=int, default=-1, help="top-k cut when sampling, sent as extra_body (-1: off)")
    p.add_argument("--json-schema", metavar="FILE", help="constrain every answer to this JSON schema (chat API)")
    p.add_argument("--max-seconds", type=float, default=900, help="no new requests after this")
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip filling the KV cache once before round 1"
    )
    p.add_argument("--json", default="results/load_test.json")
    args = p.parse_args(argv)
    if not 0 <= args.temperature <= 100 or not 0 < args.top_p <= 1 or args.top_k < -1:
        p.error("want --temperature in [0, 100], --top-p in (0, 1] and --top-k >= -1")
    args.api = args.api or ("tokens" if args.model.startswith("dummy:") else "chat")
    args.schema = None
    if args.json_schema:
        if args.api != "chat":
            p.error("--json-schema needs --api chat (response_format)")
        try:
            args.schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--json-schema {args.json_schema}: {e}")
    return args


class Stopped(Exception):
    pass


def _stop(signum, frame) -> None:
    raise Stopped(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_adapters:
        for role, path in write_random_adapters(Path(args.write_adapters), args.model).items():
            print(f"{role}={path}")
        return 0
    # an outer `timeout` sends SIGTERM: stop the spawned server, wait for it, and report the rounds finished so far
    signal.signal(signal.SIGTERM, _stop)
    meta = {
        "machine": platform.node(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "argv": sys.argv,
        "decoding": decoding(args),
    }
    if args.device.startswith("cuda"):
        meta["gpu"] = gpu_name()
    proc, tmp = None, None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        if args.adapters_dir:
            adapters = {r: str(Path(args.adapters_dir) / r) for r in ROLES}
        else:
            tmp = tempfile.TemporaryDirectory(prefix="lragent-roles-")
            adapters = write_random_adapters(Path(tmp.name), args.model)
        proc, url = spawn_server(args, adapters)
    rows: list[dict] = []
    warm: dict = {}
    stopped = None
    try:
        deadline = time.time() + args.max_seconds
        if args.warmup:
            warm = asyncio.run(warm_up(url, args))
            print(
                f"warm-up: {warm['warmup_prompt_tokens']} prompt tokens over a {warm['cache_capacity_tokens']}-token "
                f"cache in {warm['warmup_s']:.1f} s; server RSS {warm['rss_before_warmup_mib']:.0f} -> "
                f"{warm['rss_after_warmup_mib']:.0f} MiB",
                flush=True,
            )
        print(f"decoding: {decoding(args)}", flush=True)
        print(HEADER, flush=True)
        for round_no in range(1, args.rounds + 1):
            if time.time() > deadline:
                break
            rows.append(asyncio.run(run_round(url, args, round_no, deadline)))
            print(row_line(rows[-1]), flush=True)
            write_json(args, meta, warm, rows, None)
    except Stopped as exc:
        stopped = str(exc)
        print(f"stopped ({stopped}) after {len(rows)} finished round(s)", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        if tmp is not None:
            tmp.cleanup()
    if not rows:
        print("no round ran", file=sys.stderr)
        return 1
    summary = summarize(args, rows, warm)
    if stopped:
        summary["stopped"] = stopped
    print("LOADTEST " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    for r in rows:
        for example in r["error_examples"]:
            print(f"  error (round {r['round']}): {example}")
    write_json(args, meta, warm, rows, summary)
    return 1 if stopped or summary["errors"] or summary["left_running"] or summary["blocks_in_use_after"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""`lragent bench sampler`: the batched sampler alone (`lragent.engine.sampler.sample`) on random float32 logits.

For each batch size x vocabulary size and each decoding setting, the rows' `SamplingBatch` is built once (its build
time is reported as a column of its own: the engine builds one per step on the host) and `sample(logits, batch)` is
timed: warm-up calls, then the median of `--reps` calls (CUDA: synchronised before and after each call; CPU: wall
clock). tokens/s = batch / median step time. Settings:

- greedy: temperature 0
- t0.9: temperature 0.9, no truncation
- t0.9-p0.75-k40: temperature 0.9, top-p 0.75, top-k 40 (the AutoAct pipeline's)
- t0.9-p0.9: temperature 0.9, top-p 0.9, no top-k (candidates are the whole sorted vocabulary)
- t0.9-penalties: temperature 0.9, repetition 1.1 + presence 0.5 over a 1k-token history (512 prompt + 512 output)

`--impl` (repeatable, or `all`: torch, graph, triton, triton+graph) times each implementation of `sample` on the same
logits and batch, side by side; a value marked `~` ran a fallback (e.g. triton on a batch without top-k runs the
torch path: `lragent.engine.sampler.resolve_impl`), and `diff` counts the rows whose token differs from the first
implementation's.

Prints a table, one parseable `SAMPLER ...` line (the median ms of every setting at the reference size: batch 32 x
128k vocabulary when measured, else the largest measured; `<setting>@<impl>_ms` for every implementation after the
first), and writes `--json FILE` (a row per setting, size and implementation).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lragent.engine.sampler import IMPLS, SamplingBatch, resolve_impl, sample
from lragent.sampling import SamplingParams

SETTINGS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "t0.9": {"temperature": 0.9},
    "t0.9-p0.75-k40": {"temperature": 0.9, "top_p": 0.75, "top_k": 40},
    "t0.9-p0.9": {"temperature": 0.9, "top_p": 0.9},
    "t0.9-penalties": {"temperature": 0.9, "repetition_penalty": 1.1, "presence_penalty": 0.5},
}
HISTORY, PROMPT = 1024, 512  # tokens of history of a penalised row, of which the prompt
CUDA_BATCH, CUDA_VOCAB = "1,8,32,128,256", "32k,128k,256k"
CPU_BATCH, CPU_VOCAB = "1,8,32", "32k,128k"
REF = (32, 128 * 1024)  # the target size: batch 32, 128k vocabulary
ALL_IMPLS = ["torch", "graph", "triton", "triton+graph"]


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            mult = 1024 if part.endswith("k") else 1
            out.append(int(float(part.rstrip("k")) * mult))
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive sizes (e.g. 32k,128k), got {text!r}")
    return out


def _fmt(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_batch(setting: str, batch: int, vocab: int, device: torch.device, seed: int = 0) -> SamplingBatch:
    """The `SamplingBatch` of `batch` rows of one setting (seeded rows, random 1k-token histories)."""
    params = [SamplingParams(seed=seed + i, **SETTINGS[setting]) for i in range(batch)]
    gen = torch.Generator().manual_seed(seed)
    histories = torch.randint(0, vocab, (batch, HISTORY), generator=gen).tolist()
    return SamplingBatch.build(
        params, [seed + i for i in range(batch)], [HISTORY] * batch, histories, [PROMPT] * batch, vocab, device
    )


def time_one(
    setting: str,
    batch: int,
    vocab: int,
    device: torch.device,
    reps: int,
    warmup: int,
    seed: int = 0,
    impls: list[str] | None = None,
) -> list[dict]:
    """Median (and min / max) ms of `sample` for one setting and size, per implementation (same logits, same
    batch), with the build time of the batch and the tokens drawn by the last call."""
    gen = torch.Generator().manual_seed(seed + batch * 7 + vocab)
    logits = (3.0 * torch.randn(batch, vocab, generator=gen)).to(device)
    builds = []
    for _ in range(max(1, min(3, reps))):
        _sync(device)
        t0 = time.perf_counter()
        sb = build_batch(setting, batch, vocab, device, seed)
        _sync(device)
        builds.append(time.perf_counter() - t0)
    build_ms = statistics.median(builds) * 1e3
    return [
        {"setting": setting, **_time_impl(logits, sb, impl, reps, warmup), "build_ms": build_ms}
        for impl in impls or ["auto"]
    ]


def _time_impl(logits: torch.Tensor, sb: SamplingBatch, impl: str, reps: int, warmup: int) -> dict:
    device = logits.device
    batch, vocab = logits.shape
    for _ in range(warmup):
        sample(logits, sb, impl=impl)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = sample(logits, sb, impl=impl)
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert len(out.tokens) == batch
    ms = statistics.median(times) * 1e3
    return {
        "batch": batch,
        "vocab": vocab,
        "impl": impl,
        "ran": resolve_impl(impl, logits, sb),
        "ms": ms,
        "ms_min": min(times) * 1e3,
        "ms_max": max(times) * 1e3,
        "tok_s": batch / (ms / 1e3),
        "reps": reps,
        "tokens": out.tokens,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def summary_line(rows: list[dict], device: torch.device, wall_s: float) -> str:
    """`SAMPLER device=... ref=BxV <setting>_ms=... wall_s=...`: every setting at the reference size."""
    sizes = {(r["batch"], r["vocab"]) for r in rows}
    ref = REF if REF in sizes else max(sizes, key=lambda s: (s[0] * s[1], s))
    parts = [f"SAMPLER device={device.type}", f"ref=b{ref[0]}xv{ref[1]}"]
    first = rows[0]["impl"] if rows else None
    for r in rows:
        if (r["batch"], r["vocab"]) == ref:
            name = r["setting"] if r["impl"] == first else f"{r['setting']}@{r['impl']}"
            parts.append(f"{name}_ms={r['ms']:.4g}")
    return " ".join([*parts, f"configs={len(rows)}", f"wall_s={wall_s:.1f}"])


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lragent bench sampler",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=_sizes, default=None, help=f"comma list (CUDA: {CUDA_BATCH}; CPU: {CPU_BATCH})")
    p.add_argument("--vocab", type=_sizes, default=None, help=f"comma list (CUDA: {CUDA_VOCAB}; CPU: {CPU_VOCAB})")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)} (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per configuration (CUDA: 50; CPU: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (CUDA: 5; CPU: 2)")
    p.add_argument(
        "--impl",
        action="append",
        choices=[*IMPLS, "all"],
        default=None,
        help=f"implementation of `sample` to time, repeatable; all = {', '.join(ALL_IMPLS)} (default: auto)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows and run metadata as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _build_parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = args.batch or _sizes(CUDA_BATCH if gpu else CPU_BATCH)
    vocabs = args.vocab or _sizes(CUDA_VOCAB if gpu else CPU_VOCAB)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    reps = args.reps if args.reps is not None else (50 if gpu else 10)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    if reps < 1 or warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")

    t_begin = time.perf_counter()
    impls = _impls(args.impl)
    rows = _time_all(args, device, vocabs, batches, settings, reps, warmup, impls)
    wall = time.perf_counter() - t_begin
    line = summary_line(rows, device, wall)
    print(line)
    if args.json:
        _write_json(args, argv, device, rows, line, reps, warmup, wall)
    return 0


def _impls(chosen: list[str] | None) -> list[str]:
    """The implementations to time, in order, each once ("all" expands to ALL_IMPLS)."""
    out: list[str] = []
    for impl in chosen or ["auto"]:
        for one in ALL_IMPLS if impl == "all" else [impl]:
            if one not in out:
                out.append(one)
    return out


def _time_all(
    args: argparse.Namespace,
    device: torch.device,
    vocabs: list[int],
    batches: list[int],
    settings: list[str],
    reps: int,
    warmup: int,
    impls: list[str],
) -> list[dict]:
    """Time every (vocab, batch, setting, implementation), printing the table as it goes; its rows."""
    print(
        f"sampler alone: float32 logits on {args.device} ({_device_name(device)}), median of {reps} calls after "
        f"{warmup} warm-up; tok/s = batch / step time; build = SamplingBatch.build (host, once per engine step)",
        flush=True,
    )
    cols = "".join(f" {impl + ' ms':>16}" for impl in impls)
    print(f"{'setting':<16} {'batch':>5} {'vocab':>6} {'build ms':>9}{cols} {'best tok/s':>11} {'diff':>5}", flush=True)
    rows = []
    for vocab in vocabs:
        for batch in batches:
            for setting in settings:
                got = time_one(setting, batch, vocab, device, reps, warmup, args.seed, impls)
                for r in got:  # rows whose token differs from the first implementation's
                    r["diff_rows"] = sum(a != b for a, b in zip(r["tokens"], got[0]["tokens"]))
                print(_line(setting, batch, vocab, got), flush=True)
                rows += [{k: v for k, v in r.items() if k != "tokens"} for r in got]
    return rows


def _line(setting: str, batch: int, vocab: int, got: list[dict]) -> str:
    """One table line: every implementation's ms (`~`: it ran a fallback), the best tok/s, the most differing rows."""
    times = "".join(f" {r['ms']:>15.3f}{'~' if r['ran'] != r['impl'] else ' '}" for r in got)
    best = max(r["tok_s"] for r in got)
    diff = max(r["diff_rows"] for r in got)
    return f"{setting:<16} {batch:>5} {_fmt(vocab):>6} {got[0]['build_ms']:>9.3f}{times} {best:>11.0f} {diff:>5}"


def _write_json(
    args: argparse.Namespace,
    argv: list[str] | None,
    device: torch.device,
    rows: list[dict],
    line: str,
    reps: int,
    warmup: int,
    wall: float,
) -> None:
    """Write the rows, the summary line and the run's metadata to --json."""
    meta = {
        "device": args.device,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "lragent bench sampler " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reps": reps,
        "warmup": warmup,
        "wall_s": wall,
        "history_tokens": HISTORY,
        "impls": sorted({r["impl"] for r in rows}, key=[r["impl"] for r in rows].index),
    }
    out = {"meta": meta, "settings": SETTINGS, "rows": rows, "summary": line}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print("wrote", args.json)


if __name__ == "__main__":
    raise SystemExit(main())

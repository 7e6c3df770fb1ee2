"""`lragent demo` (`make demo`): a few HotpotQA questions through the plan/action/reflect agents under every sharing
scheme, side by side: answers, accuracy, prompt tokens computed vs reused, KV cache memory and TTFT.

    lragent demo                        # 3 easy HotpotQA questions, greedy, at most 6 agent iterations each
    lragent demo --questions 5 --max-iterations 12 --out results/demo

The same shipped adapter set runs under all four schemes (default: `hotpotqa-shared-a`, the paper's shared-A
recipe), so the cache scheme is the only thing that changes between columns: base_lr_shared needs every agent's
v_proj A to be the same matrix, and the shared-A set serves the other three schemes equally well. `--adapters DIR`
picks another set; a set without shared A skips base_lr_shared unless `--force` (the paper's failure mode).
Decoding is greedy and capped (`--max-iterations`, `--max-tokens`) so the demo takes a few minutes on a CPU; the
accuracy of a few questions with a 135M model says little (see `lragent eval` and `lragent analyze` for that).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lragent.agents.pipeline import PipelineConfig, run_pipeline
from lragent.agents.tools import ToolConfig
from lragent.cache.sharing import SharingMode
from lragent.eval.runner import DEFAULT_ADAPTER_ROOT, AdapterSet, find_adapter_sets, load_questions, summarize

SCHEMES = tuple(m.value for m in SharingMode)
DEFAULT_SET = "hotpotqa-shared-a"


def default_questions() -> Path:
    """hotpotqa_easy.jsonl of the project's shared data (`<repo>/../shared/data/hotpotqa` or /work/shared)."""
    from lragent.train.examples import default_data_dir  # noqa: PLC0415

    return default_data_dir().parent / "hotpotqa" / "hotpotqa_easy.jsonl"


def default_adapter_set() -> AdapterSet:
    for aset in find_adapter_sets([DEFAULT_ADAPTER_ROOT]):
        if aset.name == DEFAULT_SET:
            return aset
    raise FileNotFoundError(
        f"the shipped adapter set {DEFAULT_SET} is missing under {DEFAULT_ADAPTER_ROOT} "
        "(reproduce it with scripts/train_adapters.sh, or pass --adapters DIR)"
    )


@dataclass
class DemoSpec:
    data: str
    adapters: AdapterSet
    questions: int = 3
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    max_iterations: int = 6
    max_tokens: int = 40
    force: bool = False
    model: str = "smollm2-135m-instruct"
    kv_cache_bytes: int | None = None


@dataclass
class SchemeRun:
    scheme: str
    forced: bool
    summary: dict
    cache: dict  # cache_stats() after the run: every block still held or cached for reuse
    answers: list[dict]


def run_demo(
    spec: DemoSpec, log: Callable[[str], None] = print, llm_factory: Callable[..., Any] | None = None
) -> list[SchemeRun]:
    from lragent import LLM  # noqa: PLC0415

    task, rows = load_questions(spec.data, spec.questions)
    cfg = PipelineConfig(max_iterations=spec.max_iterations, max_tokens=spec.max_tokens, greedy=True, workers=len(rows))
    factory = llm_factory or LLM
    runs = []
    for scheme in spec.schemes:
        forced = False
        kwargs = dict(model=spec.model, adapters=dict(spec.adapters.paths), sharing=scheme)
        if spec.kv_cache_bytes:
            kwargs["kv_cache_bytes"] = spec.kv_cache_bytes
        try:
            llm = factory(**kwargs)
        except ValueError as e:  # base_lr_shared refuses adapters whose v_proj A differ
            if scheme != "base_lr_shared" or not spec.force:
                log(f"{scheme}: skipped: {e}")
                continue
            llm, forced = factory(**kwargs, allow_unshared_a=True), True
        t0 = time.perf_counter()
        results = run_pipeline(llm, rows, cfg, ToolConfig())
        wall = time.perf_counter() - t0
        summary = summarize(results, Path(spec.data).stem, task, spec.adapters.name, scheme, wall)
        cache = llm.cache_stats()
        summary_dict = asdict(summary)
        summary_dict["base_reused_tokens"] = sum(r.base_reused_tokens for r in results)
        answers = [
            {
                "id": r.id,
                "gold": r.gold,
                "prediction": r.prediction,
                "correct": r.correct,
                "iterations": r.iterations,
                "halt": r.halt_reason,
            }
            for r in results
        ]
        runs.append(SchemeRun(scheme, forced, summary_dict, cache, answers))
        log(
            f"{scheme}{' (forced)' if forced else ''}: {sum(a['correct'] for a in answers)}/{len(answers)} correct, "
            f"{summary.computed_tokens} prompt tokens computed, {summary.reused_tokens} reused, "
            f"cache {cache['bytes_used'] / 2**20:.1f} MiB, {wall:.1f}s"
        )
        del llm
        gc.collect()
    return runs


def _short(text: str | None, n: int) -> str:
    text = "-" if text is None else " ".join(str(text).split()) or '""'
    return text if len(text) <= n else text[: n - 1] + "…"


def answer_rows(runs: list[SchemeRun], rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["question", "gold", *(r.scheme + ("*" if r.forced else "") for r in runs)]
    table = []
    for i, row in enumerate(rows):
        cells = [_short(row.get("question"), 48), _short(row.get("answer"), 18)]
        for r in runs:
            a = r.answers[i]
            cells.append(("✓ " if a["correct"] else "✗ ") + _short(a["prediction"], 18))
        table.append(cells)
    return header, table


def metric_rows(runs: list[SchemeRun]) -> tuple[list[str], list[list[str]]]:
    header = ["", *(r.scheme + ("*" if r.forced else "") for r in runs)]
    mib = 2**20

    def row(title: str, fn: Callable[[SchemeRun], str]) -> list[str]:
        return [title, *(fn(r) for r in runs)]

    table = [
        row(
            "accuracy (EM)",
            lambda r: f"{r.summary['accuracy']:.0f}% ({sum(a['correct'] for a in r.answers)}/{r.summary['n']})",
        ),
        row("F1", lambda r: f"{r.summary['f1']:.1f}%"),
        row("agent calls", lambda r: str(r.summary["agent_calls"])),
        row("prompt tokens", lambda r: str(r.summary["prompt_tokens"])),
        row("  computed (prefill)", lambda r: str(r.summary["computed_tokens"])),
        row("  reused from cache", lambda r: f"{r.summary['reused_tokens']} ({100 * r.summary['reuse_ratio']:.0f}%)"),
        row("  keys/base values reused", lambda r: str(r.summary["base_reused_tokens"])),
        row("generated tokens", lambda r: str(r.summary["generated_tokens"])),
        row("KV cache used (MiB)", lambda r: f"{r.cache['bytes_used'] / mib:.1f}"),
        row(
            "  keys + base values",
            lambda r: (
                f"{(r.cache['pools']['key']['bytes_used'] + r.cache['pools']['base_value']['bytes_used']) / mib:.1f}"
            ),
        ),
        row("  LR cache", lambda r: f"{r.cache['pools']['lr']['bytes_used'] / mib:.2f}"),
        row("TTFT, sum over calls (s)", lambda r: f"{r.summary['ttft_s']:.2f}"),
        row("wall (s)", lambda r: f"{r.summary['wall_s']:.1f}"),
    ]
    return header, table


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print(title)
        for cells in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    Console(width=max(120, Console().width)).print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lragent demo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--data", default=None, help="HotpotQA JSONL (default: the shared hotpotqa_easy.jsonl)")
    p.add_argument("--questions", type=int, default=3, help="first N questions")
    p.add_argument(
        "--adapters",
        default=None,
        metavar="DIR",
        help=f"one adapter set with plan/, action/, reflect/ (default: shipped {DEFAULT_SET})",
    )
    p.add_argument("--sharing", default="all", help=f"comma-separated schemes or 'all' ({', '.join(SCHEMES)})")
    p.add_argument("--max-iterations", type=int, default=6, help="agent iterations per question (paper: 45)")
    p.add_argument("--max-tokens", type=int, default=40, help="new tokens per agent call (paper: 128)")
    p.add_argument("--force", action="store_true", help="run base_lr_shared even if the adapters' v_proj A differ")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write demo.json to this folder")
    return p


def spec_from_args(args: argparse.Namespace) -> DemoSpec:
    if args.adapters:
        sets = find_adapter_sets([args.adapters])
        if len(sets) != 1:
            raise ValueError(
                f"--adapters {args.adapters}: expected one folder with plan/, action/, reflect/, found {len(sets)}"
            )
        aset = sets[0]
    else:
        aset = default_adapter_set()
    if args.sharing.strip().lower() == "all":
        schemes = list(SCHEMES)
    else:
        schemes = [s.strip().lower().replace("-", "_") for s in args.sharing.split(",") if s.strip()]
        bad = [s for s in schemes if s not in SCHEMES]
        if bad or not schemes:
            raise ValueError(f"unknown scheme(s) {bad}; choose from {', '.join(SCHEMES)} or 'all'")
    data = Path(args.data) if args.data else default_questions()
    if not data.is_file():
        raise FileNotFoundError(f"no question file {data}; pass --data FILE (HotpotQA JSONL)")
    if args.questions < 1 or args.max_iterations < 1 or args.max_tokens < 1:
        raise ValueError("--questions, --max-iterations and --max-tokens must be positive")
    return DemoSpec(
        data=str(data),
        adapters=aset,
        questions=args.questions,
        schemes=schemes,
        max_iterations=args.max_iterations,
        max_tokens=args.max_tokens,
        force=args.force,
        model=args.model,
        kv_cache_bytes=args.kv_cache_bytes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lragent demo: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    print(
        f"lragent demo: {spec.questions} question(s) of {spec.data}, adapters {spec.adapters.name}, model "
        f"{spec.model}; greedy, <= {spec.max_iterations} agent iterations, <= {spec.max_tokens} tokens per call"
    )
    t0 = time.perf_counter()
    runs = run_demo(spec)
    if not runs:
        print("lragent demo: no scheme ran", file=sys.stderr)
        return 1
    _, rows = load_questions(spec.data, spec.questions)
    _print("answers per sharing scheme (✓ exact match)", *answer_rows(runs, rows))
    _print("cost per sharing scheme (all questions together)", *metric_rows(runs))
    if any(r.forced for r in runs):
        print(
            "* forced: base_lr_shared with adapters whose v_proj A differ (allow_unshared_a), the paper's failure mode"
        )
    print(
        "computed = prompt tokens run through the model (base_shared's LR prefill included); reused = served entirely "
        "from an earlier call's cache; keys/base values reused = tokens whose K and X W_v0 came from the cache "
        "(base_shared still runs its own LR prefill over them); KV cache used = blocks held or cached at the end "
        "(fp32 on CPU); TTFT is summed over all agent calls, which run concurrently across questions."
    )
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"spec": {**asdict(spec), "adapters": spec.adapters.name}, "runs": [asdict(r) for r in runs]}
        (out / "demo.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        print(f"wrote {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`lragent eval`: the AutoAct pipeline's accuracy on HotpotQA / ScienceQA question files per sharing scheme.

    lragent eval /work/shared/data/hotpotqa/hotpotqa_easy.jsonl --sharing non_shared,base_shared,base_lr_shared \\
        --adapters lragent/adapters --limit 50 --workers 16 --out results/eval
    lragent eval easy.jsonl medium.jsonl --together --workers 256 --device cuda --dtype float32 \\
        --kv-cache-bytes 10G --time-limit 480 --greedy --out results/eval_gpu   # all 200 in flight, bounded
    lragent eval --merge results/a/eval.json results/b/eval.json --out results/eval_all   # one table + chart
    lragent eval hotpotqa_easy.jsonl --sharing all --seeds 1 2 3 --noise-control \
        --fidelity results/analyze/analyze.json --out results/eval_ci   # accuracy +- CI beside fidelity

The terminal shows an 80-column summary per file and adapter set: accuracy with its 95% bootstrap CI over questions
(seeds pooled), the paired delta to non_shared with its CI, the noise control's row (non_shared under seed + 1000:
the spread a delta must beat), OOF and iteration-cap rates, and analyze's agreement/KL when --fidelity is given.
eval.md holds every column and every run.

eval.json and eval.png are rewritten after every run (adapter set x scheme x file or pool), so an interrupted
evaluation keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from lragent.agents.pipeline import PipelineConfig
from lragent.agents.tools import ToolConfig
from lragent.cache.sharing import SharingMode
from lragent.engine_args import parse_size
from lragent.eval.report import merge_reports, print_summary, write_report
from lragent.eval.runner import DEFAULT_ADAPTER_ROOT, EvalSpec, find_adapter_sets, run_eval

SCHEMES = tuple(m.value for m in SharingMode)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lragent eval", description=__doc__.split("\n")[0])
    _add_input_args(p)
    _add_engine_options(p)
    _add_run_args(p)
    _add_agent_args(p)
    _add_output_args(p)
    return p


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """The question files, the sharing schemes to compare and the adapters."""
    p.add_argument(
        "data",
        nargs="+",
        help="JSONL question files (HotpotQA or ScienceQA rows; format detected); with --merge, eval.json files",
    )
    p.add_argument(
        "--sharing",
        default="base_lr_shared",
        help=f"comma-separated schemes, 'all' ({', '.join(SCHEMES)}), or 'none' (with --noise-control: only its runs)",
    )
    p.add_argument(
        "--adapters",
        action="append",
        default=None,
        metavar="DIR",
        help="folder(s) holding plan/, action/, reflect/ (searched 3 levels down; repeatable, "
        f"comma-separated ok); default {DEFAULT_ADAPTER_ROOT}",
    )


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The model and the engine's device, dtype, KV cache budget and other keywords."""
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="engine dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--kv-cache-bytes",
        type=parse_size,
        default=None,
        help="KV cache budget per engine, e.g. 10G (default: 1G on CPU, 90%% of free memory on CUDA; "
        "set it when several evaluations share one GPU)",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other LLM/EngineConfig keyword, e.g. max_num_seqs=256 (repeatable)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Which questions run, how many at once and for how long; --merge to combine earlier reports instead."""
    p.add_argument("--limit", type=int, default=None, help="first N questions of each file")
    p.add_argument(
        "--workers", type=int, default=8, help="questions in flight at once (one batched generate per round)"
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="run the files of one task as one pool of questions through each engine (reported per file "
        "and combined); with --workers >= the pool, all questions advance in the same batches",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="seconds per pipeline run: then the questions in flight are halted (reported as "
        "time-limited, scored on any answer given) and unstarted ones dropped (not_run)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds for the whole evaluation: later runs are skipped, the last one is cut to fit",
    )
    p.add_argument("--merge", action="store_true", help="merge the eval.json files given as DATA into one report")
    p.add_argument(
        "--max-time-limited",
        type=float,
        default=100.0,
        help="with --merge: leave out a run whose questions were halted by the time limit beyond this %% (a run "
        "found in several files is always taken from the one with the fewest halted)",
    )


def _add_agent_args(p: argparse.ArgumentParser) -> None:
    """Decoding, the agents' limits and --force (base_lr_shared over adapters whose v_proj A differ)."""
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="run every scheme once per seed (overrides --seed)"
    )
    p.add_argument(
        "--noise-control",
        action="store_true",
        help="also run non_shared under seed+1000 for every seed: the run-to-run spread a scheme's delta must beat",
    )
    p.add_argument(
        "--free",
        action="store_true",
        help="the paper's loop: an unanswered question may run out of iterations (default: its last iteration "
        "goes to Finish, reported as forced %%)",
    )
    p.add_argument(
        "--constrain",
        action="store_true",
        help="constrain the tool line, reflect verdict and ScienceQA's Finish letter to their closed sets (engine "
        "choice constraint; costly on CPU)",
    )
    p.add_argument(
        "--constrain-finish",
        action="store_true",
        help="constrain only ScienceQA's Finish answer to the question's own option letters (e.g. A/B for two "
        "options; engine choice constraint on one short call per answer)",
    )
    add_score_options(p)
    p.add_argument(
        "--score-spans",
        action="store_true",
        help="HotpotQA's Finish answer chosen by likelihood: the action agent reads the question restated below "
        "its observations and scores their spans (names, dates, numbers; yes / no), answering with the most likely",
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of T 0.9 / top-p 0.75 / top-k 40")
    p.add_argument("--max-iterations", type=int, default=45)
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per agent call")
    p.add_argument("--max-context", type=int, default=None, help="halt a question whose prompt would exceed this")
    p.add_argument("--retrieve-sentences", type=int, default=5, help="sentences Retrieve returns (0: all)")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow base_lr_shared with adapters whose v_proj A differ (engine allow_unshared_a)",
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """What the report keeps, and where it goes."""
    p.add_argument("--save-trajectories", action="store_true", help="keep every trajectory text in the JSON")
    p.add_argument("--out", default="results/eval", help="output folder for eval.json, eval.md and eval.png")
    p.add_argument(
        "--fidelity", default=None, metavar="ANALYZE_JSON", help="an analyze.json whose agreement/KL join the table"
    )


def add_score_options(p: argparse.ArgumentParser) -> None:
    """`--score-options [trajectory|reader]`, shared with `lragent demo` (PipelineConfig.score_options)."""
    p.add_argument(
        "--score-options",
        nargs="?",
        const="trajectory",
        default="",
        choices=["trajectory", "reader"],
        help="ScienceQA's Finish answer chosen by likelihood, the most likely option's letter: 'trajectory' (the "
        "default when given alone) scores each option's text after 'Finish[' in the trajectory; 'reader' after a "
        "short prompt of the evidence the tools returned and the question, calibrated by the option's prior",
    )


def parse_schemes(text: str) -> list[str]:
    """'all', 'none' (only the noise control: one process per run, merged later) or a comma list of schemes."""
    if text.strip().lower() == "all":
        return list(SCHEMES)
    if text.strip().lower() == "none":
        return []
    schemes = [s.strip().lower().replace("-", "_") for s in text.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        raise ValueError(f"unknown sharing scheme(s) {unknown}; choose from {', '.join(SCHEMES)} or 'all'")
    return schemes


def parse_engine_args(items: Sequence[str]) -> dict[str, object]:
    """['max_num_seqs=64', 'enforce_eager=true'] -> {'max_num_seqs': 64, 'enforce_eager': True}."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--engine-arg expects KEY=VALUE, got {item!r}")
        low = raw.strip().lower()
        value: object
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key] = value
    return out


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    roots = [r for a in (args.adapters or [str(DEFAULT_ADAPTER_ROOT)]) for r in a.split(",") if r]
    sets = find_adapter_sets(roots)
    if not sets:
        raise ValueError(f"no adapter set (plan/, action/, reflect/ folders) under {roots}")
    pipeline = PipelineConfig(
        max_iterations=args.max_iterations,
        max_tokens=args.max_tokens,
        greedy=args.greedy,
        seed=args.seed,
        workers=args.workers,
        max_context_tokens=args.max_context,
        keep_trajectories=args.save_trajectories,
        constrain=args.constrain,
        constrain_finish=args.constrain_finish,
        score_options=args.score_options,
        score_spans=args.score_spans,
        finish_at_cap=not args.free,
    )
    tools = ToolConfig(max_sentences=args.retrieve_sentences or None)
    engine_kwargs = parse_engine_args(args.engine_arg)
    if args.kv_cache_bytes is not None:
        engine_kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    if parse_schemes(args.sharing) == [] and not args.noise_control:
        raise ValueError("--sharing none runs nothing without --noise-control")
    for name, value in (("time limit", args.time_limit), ("time budget", args.time_budget)):
        if value is not None and value <= 0:
            raise ValueError(f"the {name} must be positive, got {value}")
    return EvalSpec(
        data=list(args.data),
        schemes=parse_schemes(args.sharing),
        adapter_sets=sets,
        limit=args.limit,
        pipeline=pipeline,
        tools=tools,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        force=args.force,
        engine_kwargs=engine_kwargs,
        together=args.together,
        time_limit=args.time_limit,
        time_budget=args.time_budget,
        seeds=args.seeds,
        noise_control=args.noise_control,
    )


def load_fidelity(path: str | None) -> dict | None:
    """An analyze.json (or None): its handoff fidelity joins the summary table."""
    if not path:
        return None
    data = json.loads(open(path, encoding="utf-8").read())
    if not isinstance(data, dict) or "sets" not in data:
        raise ValueError(f"{path}: not an analyze.json (no 'sets')")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fidelity = load_fidelity(args.fidelity)
    except (ValueError, OSError) as e:
        print(f"lragent eval: --fidelity: {e}", file=sys.stderr)
        return 2
    if args.merge:
        try:
            report = merge_reports(args.data, args.max_time_limited)
        except (ValueError, OSError) as e:
            print(f"lragent eval --merge: {e}", file=sys.stderr)
            return 2
        print_summary(report, fidelity)
        paths = write_report(report, args.out, fidelity=fidelity)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    try:
        spec = spec_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lragent eval: {e}", file=sys.stderr)
        return 2
    report = run_eval(spec, checkpoint=lambda partial: write_report(partial, args.out, fidelity=fidelity))
    print_summary(report, fidelity)
    paths = write_report(report, args.out, fidelity=fidelity)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print("EVAL_SUMMARY " + json.dumps([asdict(s) for s in report.summaries]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`lragent eval`: the AutoAct pipeline's accuracy on HotpotQA / ScienceQA question files per sharing scheme.

    lragent eval /work/shared/data/hotpotqa/hotpotqa_easy.jsonl --sharing non_shared,base_shared,base_lr_shared \\
        --adapters lragent/adapters --limit 50 --workers 16 --out results/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from lragent.agents.pipeline import PipelineConfig
from lragent.agents.tools import ToolConfig
from lragent.eval.report import print_table, write_report
from lragent.eval.runner import DEFAULT_ADAPTER_ROOT, EvalSpec, find_adapter_sets, run_eval

SCHEMES = ("non_shared", "full_shared", "base_shared", "base_lr_shared")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lragent eval", description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="+", help="JSONL question files (HotpotQA or ScienceQA rows; format detected)")
    p.add_argument("--sharing", default="base_lr_shared",
                   help=f"comma-separated schemes, or 'all' ({', '.join(SCHEMES)})")
    p.add_argument("--adapters", action="append", default=None, metavar="DIR",
                   help="folder(s) holding plan/, action/, reflect/ (searched 3 levels down; repeatable, "
                        f"comma-separated ok); default {DEFAULT_ADAPTER_ROOT}")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each file")
    p.add_argument("--workers", type=int, default=8, help="questions in flight at once (one batched generate per round)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of T 0.9 / top-p 0.75 / top-k 40")
    p.add_argument("--max-iterations", type=int, default=45)
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per agent call")
    p.add_argument("--max-context", type=int, default=None, help="halt a question whose prompt would exceed this")
    p.add_argument("--retrieve-sentences", type=int, default=5, help="sentences Retrieve returns (0: all)")
    p.add_argument("--force", action="store_true",
                   help="allow base_lr_shared with adapters whose v_proj A differ (engine allow_unshared_a)")
    p.add_argument("--save-trajectories", action="store_true", help="keep every trajectory text in the JSON")
    p.add_argument("--out", default="results/eval", help="output folder for eval.json and eval.png")
    return p


def parse_schemes(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(SCHEMES)
    schemes = [s.strip().lower().replace("-", "_") for s in text.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        raise ValueError(f"unknown sharing scheme(s) {unknown}; choose from {', '.join(SCHEMES)} or 'all'")
    return schemes


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
    )
    tools = ToolConfig(max_sentences=args.retrieve_sentences or None)
    return EvalSpec(data=list(args.data), schemes=parse_schemes(args.sharing), adapter_sets=sets, limit=args.limit,
                    pipeline=pipeline, tools=tools, model=args.model, device=args.device, force=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lragent eval: {e}", file=sys.stderr)
        return 2
    report = run_eval(spec)
    print_table(report.summaries)
    paths = write_report(report, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print("EVAL_SUMMARY " + json.dumps([asdict(s) for s in report.summaries]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`lragent demo` (`make demo`): a few HotpotQA questions through the plan/action/reflect agents under every sharing
scheme, side by side: one question's whole trajectory (thought, tool call, observation, answer), the answers, and
the cost per scheme (prompt tokens computed vs reused, KV cache memory, TTFT), in 80 columns.

    lragent demo                        # 3 easy HotpotQA questions, greedy, at most 6 agent iterations each
    lragent demo --questions 5 --max-iterations 12 --out results/demo

Which questions: always the first N rows of the file (default the shared hotpotqa_easy.jsonl), in file order; they
are never picked by outcome. The trajectory shown is the first question's under the first scheme run (non_shared).
The terminal shows the key columns; --out (default results/demo) also gets demo.md with every column and every
trajectory, and demo.json.

The same shipped adapter set runs under all four schemes (default: `hotpotqa-shared-a`, the paper's shared-A
recipe), so the cache scheme is the only thing that changes between columns: base_lr_shared needs every agent's
v_proj A to be the same matrix, and the shared-A set serves the other three schemes equally well. `--adapters DIR`
picks another set; a set without shared A skips base_lr_shared unless `--force` (the paper's failure mode).
Decoding is greedy and capped (`--max-iterations`, `--max-tokens`) so the demo takes a few minutes on a CPU. The
last iteration of an unanswered question goes to Finish (`--free`: the paper's loop, which may end without an
answer); `--constrain` also constrains the closed-set outputs (tool line, reflect verdict) to their sets through the
engine's choice constraint (slow on a CPU); `--score-spans` reads the action agent's answer off its observations
(the most likely observed span after the question restated, as `lragent eval --score-spans`; its scoring requests
add computed tokens to the cost table, so the default keeps the paper's generated answer). The accuracy of a few
questions with a 135M model says little (see `lragent eval` and `lragent analyze` for that).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lragent.agents.pipeline import PipelineConfig, run_pipeline
from lragent.agents.tools import ToolConfig
from lragent.cache.sharing import SharingMode
from lragent.eval import tables
from lragent.eval.cli import add_score_options
from lragent.eval.runner import DEFAULT_ADAPTER_ROOT, AdapterSet, find_adapter_sets, load_questions, summarize
from lragent.train import data as D

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
    free: bool = False  # the paper's loop: no Finish forced at the iteration cap
    constrain: bool = False  # the engine's choice constraint on the tool line and reflect verdict
    score_spans: bool = False  # the Finish answer read off the observations (lragent.agents.spans; --score-spans)
    score_options: str = ""  # ScienceQA's Finish answer by option likelihood (--score-options [trajectory|reader])


@dataclass
class SchemeRun:
    scheme: str
    forced: bool
    summary: dict
    cache: dict  # cache_stats() after the run: every block still held or cached for reuse
    answers: list[dict]
    trajectories: list[str] = field(default_factory=list)


def run_demo(
    spec: DemoSpec, log: Callable[[str], None] = print, llm_factory: Callable[..., Any] | None = None
) -> list[SchemeRun]:
    from lragent import LLM  # noqa: PLC0415

    task, rows = load_questions(spec.data, spec.questions)
    cfg = PipelineConfig(
        max_iterations=spec.max_iterations,
        max_tokens=spec.max_tokens,
        greedy=True,
        workers=len(rows),
        keep_trajectories=True,
        constrain=spec.constrain,
        score_spans=spec.score_spans,
        score_options=spec.score_options,
        finish_at_cap=not spec.free,
    )
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
                log(textwrap.fill(f"{scheme}: skipped: {e}", tables.WIDTH))
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
                "forced_finish": r.forced_finish,
            }
            for r in results
        ]
        runs.append(SchemeRun(scheme, forced, summary_dict, cache, answers, [r.trajectory or "" for r in results]))
        log(
            f"{scheme}{' (forced)' if forced else ''}: {sum(a['correct'] for a in answers)}/{len(answers)} correct, "
            f"{summary.computed_tokens} tokens computed, {summary.reused_tokens} reused, "
            f"{cache['bytes_used'] / 2**20:.1f} MiB, {wall:.1f}s"
        )
        del llm
        gc.collect()
    return runs


def _short(text: str | None, n: int) -> str:
    text = "-" if text is None else " ".join(str(text).split()) or '""'
    return text if len(text) <= n else text[: n - 1] + "…"


def _label(r: SchemeRun) -> str:
    return r.scheme + ("*" if r.forced else "")


def answer_rows(runs: list[SchemeRun], rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per question and scheme (long rather than wide, so any number of schemes fits 80 columns)."""
    header = ["#", "scheme", "answer (✓ exact match)", "iters", "halt"]
    table = []
    for i in range(len(rows)):
        for r in runs:
            a = r.answers[i]
            halt = a["halt"] + (" (forced)" if a.get("forced_finish") else "")
            mark = "✓ " if a["correct"] else "✗ "
            table.append([str(i + 1), _label(r), mark + _short(a["prediction"], 36), str(a["iterations"]), halt])
    return header, table


MIB = 2**20
COST_COLUMNS: tuple[tuple[str, Callable[[SchemeRun], str]], ...] = (
    ("correct", lambda r: f"{sum(a['correct'] for a in r.answers)}/{r.summary['n']}"),
    ("calls", lambda r: str(r.summary["agent_calls"])),
    ("computed", lambda r: str(r.summary["computed_tokens"])),
    ("reused", lambda r: f"{100 * r.summary['reuse_ratio']:.0f}%"),
    ("KV MiB", lambda r: f"{r.cache['bytes_used'] / MIB:.1f}"),
    ("LR MiB", lambda r: f"{r.cache['pools']['lr']['bytes_used'] / MIB:.2f}"),
    ("TTFT s", lambda r: f"{r.summary['ttft_s']:.1f}"),
    ("wall s", lambda r: f"{r.summary['wall_s']:.1f}"),
)
EXTRA_COST_COLUMNS: tuple[tuple[str, Callable[[SchemeRun], str]], ...] = (
    ("F1 %", lambda r: f"{r.summary['f1']:.1f}"),
    ("prompt tokens", lambda r: str(r.summary["prompt_tokens"])),
    ("reused tokens", lambda r: str(r.summary["reused_tokens"])),
    ("keys/base values reused", lambda r: str(r.summary["base_reused_tokens"])),
    ("generated", lambda r: str(r.summary["generated_tokens"])),
    (
        "keys + base values MiB",
        lambda r: f"{(r.cache['pools']['key']['bytes_used'] + r.cache['pools']['base_value']['bytes_used']) / MIB:.1f}",
    ),
)


def metric_rows(runs: list[SchemeRun], full: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per scheme: the key cost columns (with ``full``, every column, for the file)."""
    columns = COST_COLUMNS + (EXTRA_COST_COLUMNS if full else ())
    header = ["scheme", *(name for name, _ in columns)]
    return header, [[_label(r), *(fn(r) for _, fn in columns)] for r in runs]


def trajectory_lines(text: str, width: int = tables.WIDTH) -> list[str]:
    """A trajectory as numbered Thought / Action / Observation lines (the system prompt left out), cut to ``width``."""
    head, steps = D.parse_history(text)
    question = head.split("\nQuestion:", 1)[-1].strip()
    lines = [_short("Question: " + question, width)]
    for i, step in enumerate(steps, 1):
        lines += [
            _short(f"{i}. Thought: {step.thought}", width),
            "   " + _short(f"Action: {step.action}", width - 3),
            "   " + _short(f"Observation: {step.observation}", width - 3),
        ]
    return lines


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    right = [False] + [True] * (len(header) - 1) if header and header[0] == "scheme" else None
    print(tables.render(header, rows, tables.WIDTH, right, title))
    print()


def write_markdown(path: Path, runs: list[SchemeRun], rows: list[dict]) -> None:
    """demo.md: the questions, every answer, every cost column and every trajectory."""
    parts = ["# lragent demo\n", "## Questions (the first N of the file)\n"]
    parts += [f"{i + 1}. {row.get('question')} (gold: {row.get('answer')})" for i, row in enumerate(rows)]
    parts += ["\n## Answers\n", tables.markdown(*answer_rows(runs, rows))]
    parts += ["## Cost\n", tables.markdown(*metric_rows(runs, full=True))]
    for r in runs:
        for i, text in enumerate(r.trajectories):
            parts += [f"## Trajectory: {r.scheme}, question {i + 1}\n", "```", *trajectory_lines(text, 10_000), "```\n"]
    path.write_text("\n".join(parts), encoding="utf-8")


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
    p.add_argument("--out", default="results/demo", help="folder for demo.md (every column) and demo.json ('' : none)")
    p.add_argument("--free", action="store_true", help="the paper's loop: no Finish forced at the iteration cap")
    p.add_argument("--constrain", action="store_true", help="choice-constrain the tool line and reflect verdict")
    p.add_argument(
        "--score-spans",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the Finish answer is the observed span the action agent finds most likely after the question restated "
        "(lragent eval --score-spans: on the H200 it lifts the embedded model's HotpotQA exact match from 6%% to "
        "14%%); off by default, so the cost table is the paper's loop's (the scoring requests add computed tokens)",
    )
    add_score_options(p)
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
        free=args.free,
        constrain=args.constrain,
        score_spans=args.score_spans,
        score_options=args.score_options,
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
    intro = (
        f"lragent demo: {spec.questions} question(s) of {spec.data}, adapters {spec.adapters.name}, model "
        f"{spec.model}; greedy, <= {spec.max_iterations} agent iterations, <= {spec.max_tokens} tokens per call"
    )
    print(textwrap.fill(intro, tables.WIDTH))
    t0 = time.perf_counter()
    runs = run_demo(spec)
    if not runs:
        print("lragent demo: no scheme ran", file=sys.stderr)
        return 1
    _, rows = load_questions(spec.data, spec.questions)
    shown = runs[0]
    print(f"\ntrajectory of question 1 under {shown.scheme} ({shown.answers[0]['halt']}):")
    print("\n".join(trajectory_lines(shown.trajectories[0])) + "\n")
    print("questions (the first N of the file, in order):")
    for i, row in enumerate(rows):
        gold = f" (gold: {_short(row.get('answer'), 24)})"
        print(_short(f"{i + 1}. {row.get('question')}", tables.WIDTH - len(gold)) + gold)
    print()
    _print("answers per sharing scheme (✓ exact match)", *answer_rows(runs, rows))
    _print("cost per sharing scheme (all questions together)", *metric_rows(runs))
    if any(r.forced for r in runs):
        print(
            "* forced: base_lr_shared with adapters whose v_proj A differ (allow_unshared_a), the paper's failure mode"
        )
    print(
        textwrap.fill(
            "computed = prompt tokens run through the model; reused = share of prompt tokens served from an earlier "
            "call's cache; KV/LR MiB = cache blocks held or cached at the end (fp32 on CPU); TTFT summed over all "
            "agent calls, which run concurrently across questions.",
            tables.WIDTH,
        )
    )
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"spec": {**asdict(spec), "adapters": spec.adapters.name}, "runs": [asdict(r) for r in runs]}
        (out / "demo.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        write_markdown(out / "demo.md", runs, rows)
        print(f"wrote {out / 'demo.md'} (every column and trajectory)\nwrote {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

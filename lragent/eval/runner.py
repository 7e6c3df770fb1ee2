"""Accuracy evaluation: the agent pipeline over question files, for several sharing schemes and adapter sets.

    from lragent.eval.runner import EvalSpec, run_eval, write_report
    report = run_eval(EvalSpec(data=["hotpotqa_easy.jsonl"], schemes=["non_shared", "base_lr_shared"],
                               adapter_sets=find_adapter_sets(["lragent/adapters"])))
    write_report(report, "results/eval")       # eval.json + eval.png

One fresh LLM per (adapter set, scheme), so no cache state leaks between schemes; every question file whose task
the adapter set serves runs through it (one file after the other, or, with `together`, all files of a task as one
pool of questions in flight at once, reported per file and combined). `time_limit` bounds one pipeline run (the
questions in flight are halted, see `pipeline.Driver`), `time_budget` the whole evaluation (runs that would start
after it are skipped); `checkpoint` gets the report after every run, so a killed process leaves what it finished.

`seeds` runs every scheme once per sampling seed (a fresh LLM each time); `noise_control` adds non_shared run again
under seed + 1000 for every seed, labelled `non_shared/reseed`, so that `lragent.eval.stats` can put every scheme's
delta to non_shared beside the run-to-run spread of non_shared itself.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lragent.agents.episode import EpisodeResult
from lragent.agents.pipeline import PipelineConfig, detect_task, run_pipeline
from lragent.agents.tools import ToolConfig
from lragent.eval.stats import GREEDY_SUFFIX, NOISE_LABEL, NOISE_SEED_OFFSET, REFERENCE, SPANS_SUFFIX
from lragent.train.data import ROLES, TASKS

DEFAULT_ADAPTER_ROOT = Path(__file__).resolve().parents[1] / "adapters"


@dataclass(frozen=True)
class AdapterSet:
    """plan/action/reflect adapter folders; `task` is set when the set was trained for one task only."""

    name: str
    paths: dict[str, str]
    task: str | None = None

    def serves(self, task: str) -> bool:
        return self.task is None or self.task == task


def _is_set(d: Path) -> bool:
    return all((d / r).is_dir() for r in ROLES)


def _set_task(folder: Path, parts: Sequence[str]) -> str | None:
    """The task a set serves: from a `manifest.json` beside it (the shipped sets' index), else from a path
    component named `<task>` or `<task>-...` / `<task>_...`; None: any task."""
    manifest = folder.parent / "manifest.json"
    if manifest.is_file():
        try:
            entry = json.loads(manifest.read_text(encoding="utf-8")).get(folder.name, {})
        except (ValueError, AttributeError):
            entry = {}
        if isinstance(entry, dict) and entry.get("task") in TASKS:
            return entry["task"]
    for part in reversed([p.lower() for p in parts]):
        for task in TASKS:
            if part == task or part.startswith((task + "-", task + "_")):
                return task
    return None


def find_adapter_sets(roots: Sequence[str | Path], max_depth: int = 3) -> list[AdapterSet]:
    """Every folder (the roots themselves included, up to `max_depth` levels down) holding plan/, action/ and
    reflect/ subfolders. A path component named after a task (hotpotqa, scienceqa) restricts the set to it."""
    found: list[AdapterSet] = []
    for root in map(Path, roots):
        frontier = [(root, 0)]
        while frontier:
            d, depth = frontier.pop(0)
            if not d.is_dir():
                continue
            if _is_set(d):
                name = "/".join(d.relative_to(root).parts) if d != root else root.name
                parts = [root.name, *d.relative_to(root).parts]
                found.append(AdapterSet(name, {r: str(d / r) for r in ROLES}, _set_task(d, parts)))
            elif depth < max_depth:
                frontier.extend((c, depth + 1) for c in sorted(d.iterdir()) if c.is_dir())
    return found


def load_questions(path: str | Path, limit: int | None = None) -> tuple[str, list[dict]]:
    """A JSONL of HotpotQA or ScienceQA rows -> (task, rows[:limit]); the format is detected from the first row."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no questions")
    task = detect_task(rows[0])
    bad = [i for i, r in enumerate(rows) if detect_task(r) != task]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not {task} rows")
    return task, rows


@dataclass
class RunSummary:
    dataset: str
    task: str
    adapters: str
    scheme: str
    n: int
    accuracy: float  # % correct (EM for HotpotQA, option letter for ScienceQA)
    f1: float  # % mean F1 (HotpotQA; equals accuracy for ScienceQA)
    out_of_function: float  # % with no Finish within the iteration cap
    finished: float  # % ended by Reflect[right] / a second Finish
    mean_iterations: float
    agent_calls: int
    parse_failures: int
    prompt_tokens: int
    reused_tokens: int
    computed_tokens: int
    generated_tokens: int
    reuse_ratio: float  # reused / prompt tokens
    ttft_s: float  # sum over all agent calls
    wall_s: float  # the whole run (all questions, concurrently; with `together`, the pooled run's)
    time_limited: float = 0.0  # % halted in flight by the run's time limit (scored on any answer given so far)
    not_run: int = 0  # questions never started before the time limit (not in n)
    rounds: int = 0  # batched generate calls of the run
    decode_steps: int = 0  # sum over rounds of the longest output (decode passes of the engine)
    seed: int = 0  # the pipeline's sampling seed of this run
    capped: float = 0.0  # % halted by the iteration cap (with or without an answer)
    forced: float = 0.0  # % whose answer came from the forced Finish at the cap (PipelineConfig.finish_at_cap)


def summarize(
    results: Sequence[EpisodeResult],
    dataset: str,
    task: str,
    adapters: str,
    scheme: str,
    wall_s: float,
    stats: dict[str, Any] | None = None,
) -> RunSummary:
    stats = stats or {}
    n = max(len(results), 1)
    prompt = sum(r.prompt_tokens for r in results)
    reused = sum(r.reused_tokens for r in results)
    return RunSummary(
        dataset=dataset,
        task=task,
        adapters=adapters,
        scheme=scheme,
        n=len(results),
        accuracy=100.0 * sum(r.correct for r in results) / n,
        f1=100.0 * sum(r.f1 for r in results) / n,
        out_of_function=100.0 * sum(r.out_of_function for r in results) / n,
        finished=100.0 * sum(r.finished for r in results) / n,
        mean_iterations=sum(r.iterations for r in results) / n,
        agent_calls=sum(sum(r.calls.values()) for r in results),
        parse_failures=sum(sum(r.parse_failures.values()) for r in results),
        prompt_tokens=prompt,
        reused_tokens=reused,
        computed_tokens=sum(r.computed_tokens for r in results),
        generated_tokens=sum(r.generated_tokens for r in results),
        reuse_ratio=reused / prompt if prompt else 0.0,
        ttft_s=sum(r.ttft_s for r in results),
        wall_s=wall_s,
        time_limited=100.0 * sum(r.halt_reason == "time_limit" for r in results) / n,
        not_run=int(stats.get("not_run", 0)),
        rounds=int(stats.get("rounds", 0)),
        decode_steps=int(stats.get("decode_steps", 0)),
        seed=int(stats.get("seed", 0)),
        capped=100.0 * sum(r.halt_reason == "max_iterations" for r in results) / n,
        forced=100.0 * sum(r.forced_finish for r in results) / n,
    )


@dataclass
class EvalSpec:
    data: list[str]
    schemes: list[str] = field(default_factory=lambda: ["base_lr_shared"])
    adapter_sets: list[AdapterSet] = field(default_factory=list)
    limit: int | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)
    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA (the engine's default); float32 to compare with the CPU
    force: bool = False  # allow base_lr_shared with adapters whose v_proj A differ
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    together: bool = False  # the question files of one task as one pool (one engine pass per scheme)
    time_limit: float | None = None  # seconds per pipeline run (see pipeline.Driver)
    time_budget: float | None = None  # seconds for the whole evaluation
    seeds: list[int] | None = None  # sampling seeds, one run each (None: the pipeline's seed)
    noise_control: bool = False  # also non_shared under seed + NOISE_SEED_OFFSET, labelled NOISE_LABEL

    def run_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.pipeline.seed]

    def runs(self) -> list[tuple[str, str, int]]:
        """(engine scheme, label, seed) of every run per adapter set, seeds innermost; the noise control last.
        Greedy runs are labelled `<scheme>/greedy` (`GREEDY_SUFFIX`) and runs with scored span answers
        `<scheme>/spans` (`SPANS_SUFFIX`, both: `/spans/greedy`), so that a merge keeps them apart and pairs each
        with the non_shared run of its own decoding and answering."""
        suffix = (SPANS_SUFFIX if self.pipeline.score_spans else "") + (GREEDY_SUFFIX if self.pipeline.greedy else "")
        out = [(scheme, scheme + suffix, seed) for scheme in self.schemes for seed in self.run_seeds()]
        if self.noise_control:
            out += [(REFERENCE, NOISE_LABEL + suffix, seed + NOISE_SEED_OFFSET) for seed in self.run_seeds()]
        return out


@dataclass
class EvalReport:
    spec: dict
    summaries: list[RunSummary]
    questions: list[dict]  # per question: dataset, adapters, scheme and the EpisodeResult fields


LLMFactory = Callable[[EvalSpec, str, AdapterSet], Any]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_llm_factory(spec: EvalSpec, scheme: str, adapters: AdapterSet) -> Any:
    from lragent import LLM  # noqa: PLC0415 (heavy import, only when really running)

    kwargs = dict(spec.engine_kwargs)
    if spec.force:
        kwargs["allow_unshared_a"] = True
    return LLM(
        model=spec.model,
        adapters=dict(adapters.paths),
        sharing=scheme,
        device=resolve_device(spec.device),
        dtype=spec.dtype,
        **kwargs,
    )


def _free_memory() -> None:
    gc.collect()
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _progress_logger(
    tag: str, total: int, log: Callable[[str], None], every: int = 10
) -> Callable[[EpisodeResult], None]:
    t0, done = time.perf_counter(), []

    def progress(r: EpisodeResult) -> None:
        done.append(r.correct)
        if len(done) % every == 0 or len(done) == total:
            log(f"  {tag}: {len(done)}/{total} done, {sum(done)} correct ({time.perf_counter() - t0:.0f}s)")

    return progress


_Dataset = tuple[str, str, list[dict]]  # (file stem, task, question rows)


def _pools(datasets: list[_Dataset], together: bool) -> list[list[_Dataset]]:
    """Files run one by one, or (together) grouped by task in order of first appearance."""
    if not together:
        return [[d] for d in datasets]
    by_task: dict[str, list] = {}
    for d in datasets:
        by_task.setdefault(d[1], []).append(d)
    return list(by_task.values())


def _split_by_file(
    pool: list[_Dataset], results: list[EpisodeResult], tag: str
) -> tuple[list[str], list[tuple[str, str, list[EpisodeResult]]]]:
    """The file each result came from, and the results per file (plus the combined pool when it holds several).

    Questions start in input order, so the started ones (the results) are the first len(results) rows."""
    origin = [name for name, _, file_rows in pool for _ in file_rows]
    started = origin[: len(results)]
    parts = [(name, task, [r for r, o in zip(results, started) if o == name]) for name, task, _ in pool]
    if len(pool) > 1:
        parts.append((tag, pool[0][1], results))
    return origin, parts


class _EvalRun:
    """One `run_eval`: what has been measured and skipped so far, the time budget, and the report built from them
    (handed to `checkpoint` after every pipeline run, so a killed process leaves what it finished)."""

    def __init__(self, spec: EvalSpec, log: Callable[[str], None], checkpoint: Callable[[EvalReport], None] | None):
        self.spec, self.log, self.checkpoint = spec, log, checkpoint
        self.t_start = time.perf_counter()
        self.summaries: list[RunSummary] = []
        self.questions: list[dict] = []
        self.skipped: list[str] = []
        self.spec_dict = asdict(spec)

    def report(self) -> EvalReport:
        return EvalReport(
            spec={**self.spec_dict, "skipped_runs": list(self.skipped)},
            summaries=list(self.summaries),
            questions=list(self.questions),
        )

    def remaining(self) -> float | None:
        budget = self.spec.time_budget
        return None if budget is None else budget - (time.perf_counter() - self.t_start)

    def skip(self, pool: list[_Dataset], aset: AdapterSet, scheme: str) -> None:
        self.skipped += [f"{name} | {aset.name} | {scheme}" for name, _, _ in pool]

    def run_scheme(
        self,
        llm_factory: LLMFactory,
        aset: AdapterSet,
        scheme: str,
        todo: list[_Dataset],
        label: str | None = None,
        seed: int | None = None,
    ) -> None:
        """Every question file `aset` serves under one scheme and seed, on a fresh LLM that is freed afterwards;
        reported under `label` (default: the scheme)."""
        label = label or scheme
        seed = self.spec.pipeline.seed if seed is None else seed
        left = self.remaining()
        if left is not None and left <= 0:
            self.skip(todo, aset, scheme)
            self.log(f"{aset.name} | {scheme}: skipped: time budget of {self.spec.time_budget:.0f}s spent")
            return
        try:
            llm = llm_factory(self.spec, scheme, aset)
        except ValueError as e:  # AdapterError: e.g. base_lr_shared with unshared A and no --force
            self.log(f"{aset.name} | {scheme}: skipped: {e}")
            return
        try:
            for pool in _pools(todo, self.spec.together):
                left = self.remaining()
                if left is not None and left <= 0:
                    self.skip(pool, aset, scheme)
                    self.log(f"{aset.name} | {scheme}: skipped {[p[0] for p in pool]}: time budget spent")
                    continue
                self.run_pool(llm, aset, label, pool, left, seed)
        finally:
            del llm  # one engine (and its KV pool) at a time
            _free_memory()

    def run_pool(
        self, llm: Any, aset: AdapterSet, scheme: str, pool: list[_Dataset], left: float | None, seed: int
    ) -> None:
        """One pipeline run over a pool of files (all in flight at once), summarised per file and combined."""
        spec = self.spec
        limits = [x for x in (spec.time_limit, left) if x is not None]
        pipeline = replace(spec.pipeline, time_limit_s=min(limits) if limits else None, seed=seed)
        rows = [r for _, _, file_rows in pool for r in file_rows]
        tag = "+".join(name for name, _, _ in pool)
        t0 = time.perf_counter()
        progress = _progress_logger(f"{tag} | {aset.name} | {scheme} | seed {seed}", len(rows), self.log)
        stats: dict[str, Any] = {"seed": seed}
        results = run_pipeline(llm, rows, pipeline, spec.tools, progress=progress, stats=stats)
        wall = time.perf_counter() - t0
        origin, parts = _split_by_file(pool, results, tag)
        for name, task, res in parts:
            not_run = sum(o == name for o in origin) - len(res) if name != tag else stats.get("not_run", 0)
            s = summarize(res, name, task, aset.name, scheme, wall, {**stats, "not_run": not_run})
            self.summaries.append(s)
            self.log(_summary_line(s, aset.name, scheme, bool(stats.get("timed_out"))))
        self.questions.extend(
            {"dataset": o, "adapters": aset.name, "scheme": scheme, "seed": seed, **asdict(r)}
            for r, o in zip(results, origin)
        )
        if self.checkpoint is not None:
            self.checkpoint(self.report())


def _summary_line(s: RunSummary, adapters: str, scheme: str, timed_out: bool) -> str:
    cut = f" time-limited {s.time_limited:.1f}% not run {s.not_run}" if timed_out else ""
    return (
        f"{s.dataset} | {adapters} | {scheme} | seed {s.seed}: acc {s.accuracy:.1f}% f1 {s.f1:.1f}% "
        f"oof {s.out_of_function:.1f}% cap {s.capped:.1f}% iters {s.mean_iterations:.1f} "
        f"reuse {100 * s.reuse_ratio:.1f}% "
        f"rounds {s.rounds} decode steps {s.decode_steps} wall {s.wall_s:.1f}s{cut}"
    )


def run_eval(
    spec: EvalSpec,
    llm_factory: LLMFactory = default_llm_factory,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[EvalReport], None] | None = None,
) -> EvalReport:
    run = _EvalRun(spec, log, checkpoint)
    datasets = [(Path(p).stem, *load_questions(p, spec.limit)) for p in spec.data]
    if not spec.adapter_sets:
        raise ValueError("no adapter sets: pass --adapters DIR (folders with plan/, action/, reflect/)")
    for aset in spec.adapter_sets:
        todo = [d for d in datasets if aset.serves(d[1])]
        if not todo:
            log(f"adapter set {aset.name} ({aset.task}) serves none of the question files; skipped")
            continue
        for scheme, label, seed in spec.runs():
            run.run_scheme(llm_factory, aset, scheme, todo, label, seed)
    return run.report()

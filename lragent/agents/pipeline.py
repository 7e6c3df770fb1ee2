"""The AutoAct pipeline over the engine's Python API: many questions, one LLM, one batched generate per round.

    from lragent import LLM
    from lragent.agents.pipeline import PipelineConfig, run_pipeline
    llm = LLM(model=..., adapters={"plan": p, "action": a, "reflect": r}, sharing="base_lr_shared")
    results = run_pipeline(llm, records, PipelineConfig(workers=8, seed=42))   # list[EpisodeResult]

Each round the driver asks every active episode for its pending call (plan / action / reflect on a list of token
ids), sends them all in ONE `llm.generate(prompts, adapter=[roles...], sampling_params=...)`, and feeds the
outputs back. `workers` bounds how many questions are in flight; finished ones are replaced from the queue.
Prompts are token-id lists so that the engine's prefix cache sees identical prefixes across agents.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lragent.agents.episode import AgentCall, Episode, EpisodeConfig, EpisodeResult, Trajectory, metric_value
from lragent.agents.formats import TrajectoryFormat, load_format
from lragent.agents.scoring import LETTERS, Score, score_hotpotqa, score_scienceqa
from lragent.agents.tools import ToolBox, ToolConfig


@dataclass
class PipelineConfig:
    """Decoding of the paper (temperature 0.9, top-p 0.75, top-k 40, stop at newline, 128 new tokens)."""

    max_iterations: int = 45
    max_tokens: int = 128
    temperature: float = 0.9
    top_p: float = 0.75
    top_k: int = 40
    stop: tuple[str, ...] = ("\n",)
    greedy: bool = False
    seed: int = 42
    workers: int = 1
    max_context_tokens: int | None = None  # None: the engine's max_model_len (8192 if it has none)
    keep_trajectories: bool = False
    time_limit_s: float | None = None  # wall bound of one run: no round starts after it (see Driver.run)
    constrain: bool = False  # engine choice constraint on closed-set outputs (see lragent.agents.episode)
    constrain_finish: bool = False  # the same, on ScienceQA's Finish letter only (the question's own letters)
    finish_at_cap: bool = False  # the last iteration of a question without an answer goes to Finish
    score_options: str = ""  # ScienceQA's Finish: the most likely option after "trajectory" / "reader" (episode doc)
    score_spans: bool = False  # HotpotQA's Finish: the observation span the action agent finds most likely (same)


def detect_task(record: dict) -> str:
    """'hotpotqa' (question/answer/context) or 'scienceqa' (Question/choices/Answer)."""
    if "context" in record and "question" in record:
        return "hotpotqa"
    if "Question" in record and "choices" in record:
        return "scienceqa"
    raise ValueError(f"unknown question format, keys: {sorted(record)}")


def record_id(record: dict, fallback: int) -> str:
    return str(record.get("id") or record.get("pid") or record.get("_id") or fallback)


def scorer_for(record: dict, task: str) -> Callable[[str | None], Score]:
    if task == "hotpotqa":
        return lambda pred: score_hotpotqa(pred, record["answer"])
    return lambda pred: score_scienceqa(pred, record["choices"], record["Answer"])


def make_encoder(tokenizer: Any) -> Callable[[str, bool], list[int]]:
    """`encode(text, special)`: the opening with the tokenizer's default special tokens (as training tokenises a
    whole prompt), appended chunks without."""

    def encode(text: str, special: bool = False) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=special))

    return encode


def make_episode(
    record: dict,
    encode: Callable[[str, bool], list[int]],
    index: int = 0,
    task: str | None = None,
    fmt: TrajectoryFormat | None = None,
    episode_config: EpisodeConfig | None = None,
    tool_config: ToolConfig | None = None,
) -> Episode:
    task = task or detect_task(record)
    fmt = fmt or load_format(task)
    gold = record["answer"] if task == "hotpotqa" else record["Answer"]
    texts = () if task == "hotpotqa" else tuple(str(c) for c in record.get("choices") or [])
    options = tuple(LETTERS[: len(texts)])
    return Episode(
        qid=record_id(record, index),
        task=task,
        gold=gold,
        fmt=fmt,
        toolbox=ToolBox.for_record(record, task, tool_config),
        traj=Trajectory(encode, fmt.opening(record)),
        score_fn=scorer_for(record, task),
        config=episode_config or EpisodeConfig(),
        options=options,
        option_texts=texts,
        question=fmt.question(record),
    )


def _sampling_cls() -> type:
    try:
        from lragent import SamplingParams  # noqa: PLC0415 (engine may not be importable in unit tests)
    except ImportError:
        from lragent.agents.fake import SamplingParams  # noqa: PLC0415
    return SamplingParams


def sampling_params(cfg: PipelineConfig, seed: int, cls: type | None = None, choice: list[str] | None = None) -> Any:
    """One call's decoding: the paper's sampling (or greedy), plus the call's choice constraint when it has one."""
    cls = cls or _sampling_cls()
    extra = {"choice": list(choice)} if choice else {}
    if cfg.greedy:
        return cls(
            max_tokens=cfg.max_tokens, temperature=0.0, top_p=1.0, top_k=1, stop=list(cfg.stop), seed=seed, **extra
        )
    return cls(
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop=list(cfg.stop),
        seed=seed,
        **extra,
    )


def scoring_params(start: int, cls: type | None = None) -> Any:
    """A scoring request: one greedy token (its cost is one decode step), prompt log-probs from `start` on."""
    cls = cls or _sampling_cls()
    return cls(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=start)


@dataclass
class ScoredOutput:
    """What a scoring call feeds back: the summed log-prob of each candidate, and the requests' metrics summed
    (they are real engine work: prompt tokens, reuse, computation)."""

    option_scores: list[float]
    metrics: dict[str, float]
    text: str = ""
    token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, outs: list[Any], start: int, prior: Sequence[Any] = (), prior_start: int = 0) -> ScoredOutput:
        """Summed log-probs of `outs` from `start` on; with `prior` (the same candidates after the call's prior
        ids), each minus its prior's (pointwise mutual information with the context)."""
        scores = [_summed(o, start) for o in outs]
        if prior:
            scores = [s - _summed(p, prior_start) for s, p in zip(scores, prior, strict=True)]
        both = [*outs, *prior]
        names = ("prompt_tokens", "reused_tokens", "base_reused_tokens", "computed_tokens")
        metrics = {n: sum(metric_value(getattr(o, "metrics", None), n) for o in both) for n in names}
        metrics["ttft_s"] = max((metric_value(getattr(o, "metrics", None), "ttft_s") for o in both), default=0.0)
        return cls(scores, metrics)


def _summed(out: Any, start: int) -> float:
    return sum(e.logprob for e in (out.prompt_logprobs or [])[start:] if e is not None)


def call_seed(base: int, qid: str, n: int) -> int:
    """Per-call seed independent of batch composition: hash(base seed, question id, call number)."""
    digest = hashlib.blake2b(f"{base}:{qid}:{n}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def engine_max_len(llm: Any, default: int = 8192) -> int:
    engine = getattr(llm, "engine", None)
    return int(getattr(engine, "max_model_len", None) or getattr(llm, "max_model_len", None) or default)


class Driver:
    """Runs episodes concurrently through one LLM, one `generate` call per round.

    Every call gets its own SamplingParams whose seed depends only on (seed, question id, call number), so a
    question's sampled trajectory does not depend on which other questions share its batch.

    With `cfg.time_limit_s`, no round starts once that many seconds have passed since `run` began: episodes in
    flight are halted with reason ``time_limit`` (an answer already given is still scored, as at the iteration
    cap) and episodes not started yet stay unstarted (`run_pipeline` leaves them out). A round already running
    finishes, so the bound is soft by one round (at most `max_tokens` decode steps).
    """

    def __init__(self, llm: Any, cfg: PipelineConfig, sampling_cls: type | None = None) -> None:
        self.llm = llm
        self.cfg = cfg
        self.sampling_cls = sampling_cls
        self.rounds = 0
        self.decode_steps = 0  # sum over rounds of the longest output: the decode passes a batched engine ran
        self.generate_s = 0.0
        self.timed_out = False

    def _generate(self, calls: list[AgentCall], seeds: list[int]) -> list[Any]:
        """One engine batch for the round: a generation per call, and one scoring request per candidate of the
        calls that score (prompt + candidate, prompt log-probs from the candidate on; the prompt's own blocks come
        from the prefix cache as the scheme allows), and one more per candidate after the call's prior ids if any."""
        prompts, roles, params, owners = [], [], [], []
        for i, (c, seed) in enumerate(zip(calls, seeds)):
            if c.candidates is None:
                prompts.append(c.prompt_ids)
                params.append(sampling_params(self.cfg, seed, self.sampling_cls, c.choice))
                roles.append(c.role)
                owners.append((i, 0))
                continue
            for k, context in enumerate([c.prompt_ids] if c.prior_ids is None else [c.prompt_ids, c.prior_ids]):
                for cand in c.candidates:
                    prompts.append(context + cand)
                    params.append(scoring_params(len(context), self.sampling_cls))
                    roles.append(c.role)
                    owners.append((i, k))
        outs = self.llm.generate(prompts, adapter=roles, sampling_params=params)
        if len(outs) != len(prompts):
            raise RuntimeError(f"generate returned {len(outs)} outputs for {len(prompts)} prompts")
        grouped: list[tuple[list[Any], list[Any]]] = [([], []) for _ in calls]
        for (i, k), out in zip(owners, outs):
            grouped[i][k].append(out)
        return [
            own[0] if c.candidates is None else ScoredOutput.of(own, len(c.prompt_ids), prior, len(c.prior_ids or ()))
            for c, (own, prior) in zip(calls, grouped)
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "decode_steps": self.decode_steps,
            "generate_s": self.generate_s,
            "timed_out": self.timed_out,
        }

    def run(self, episodes: Sequence[Episode], progress: Callable[[EpisodeResult], None] | None = None) -> None:
        t0 = time.perf_counter()
        limit = self.cfg.time_limit_s
        queue = list(range(len(episodes)))[::-1]
        active: list[int] = []
        n_calls = [0] * len(episodes)
        while queue or active:
            if limit is not None and time.perf_counter() - t0 >= limit:
                self.timed_out = True
                for i in active:
                    episodes[i].halt("time_limit")
                    if progress is not None:
                        progress(episodes[i].result(self.cfg.keep_trajectories))
                return
            while queue and len(active) < max(1, self.cfg.workers):
                active.append(queue.pop())
            calls = []
            for i in active:
                call = episodes[i].next_call(i)
                if call is not None:
                    calls.append(call)
            still = [c.episode for c in calls]
            for i in active:
                if i not in still and progress is not None:
                    progress(episodes[i].result(self.cfg.keep_trajectories))
            active = still
            if not calls:
                continue
            self.rounds += 1
            seeds = [call_seed(self.cfg.seed, episodes[c.episode].qid, n_calls[c.episode]) for c in calls]
            t_gen = time.perf_counter()
            outs = self._generate(calls, seeds)
            self.generate_s += time.perf_counter() - t_gen
            self.decode_steps += max((len(getattr(o, "token_ids", None) or []) for o in outs), default=0)
            for c, out in zip(calls, outs):
                n_calls[c.episode] += 1
                episodes[c.episode].feed(out)


def run_pipeline(
    llm: Any,
    records: Iterable[dict],
    cfg: PipelineConfig | None = None,
    tool_config: ToolConfig | None = None,
    progress: Callable[[EpisodeResult], None] | None = None,
    sampling_cls: type | None = None,
    stats: dict[str, Any] | None = None,
) -> list[EpisodeResult]:
    """Run the AutoAct loop on every record (HotpotQA or ScienceQA rows); results in input order.

    Questions never started because `cfg.time_limit_s` ran out are left out of the results (their count goes to
    `stats["not_run"]`); `stats`, when given, also receives the driver's rounds, decode steps and generate time."""
    cfg = cfg or PipelineConfig()
    encode = make_encoder(llm.tokenizer)
    ecfg = EpisodeConfig(
        cfg.max_iterations,
        cfg.max_context_tokens or engine_max_len(llm),
        cfg.max_tokens,
        constrain=cfg.constrain,
        constrain_finish=cfg.constrain_finish,
        finish_at_cap=cfg.finish_at_cap,
        score_options=cfg.score_options,
        score_spans=cfg.score_spans,
    )
    formats: dict[str, TrajectoryFormat] = {}
    episodes = []
    for i, rec in enumerate(records):
        task = detect_task(rec)
        fmt = formats.setdefault(task, load_format(task))
        episodes.append(make_episode(rec, encode, i, task, fmt, ecfg, tool_config))
    driver = Driver(llm, cfg, sampling_cls)
    driver.run(episodes, progress)
    if stats is not None:
        stats.update(driver.stats(), not_run=sum(not e.started for e in episodes))
    return [e.result(cfg.keep_trajectories) for e in episodes if e.started]

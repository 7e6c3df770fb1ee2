"""Accuracy with uncertainty: bootstrap confidence intervals over questions, pooled over seeds, and paired deltas.

A run answers n questions; with several seeds each question has one 0/1 outcome per seed. The unit of resampling is
the question (questions are what we sampled from a larger population; seeds are averaged inside a question), so

    accuracy CI : percentile bootstrap of mean_q( mean_seed correct[q, seed] )
    delta CI    : the same over the paired per-question difference scheme - non_shared (same questions, same seeds)

The noise control is non_shared run again under other seeds (label ``NOISE_LABEL``): its delta to non_shared is the
run-to-run spread a scheme's delta has to exceed before it means anything. Greedy decoding makes every seed alike, so
the noise control is only informative with sampling.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

REFERENCE = "non_shared"
GREEDY_SUFFIX = "/greedy"  # the label suffix of greedy runs: deltas pair them with non_shared/greedy
SPANS_SUFFIX = "/spans"  # runs whose HotpotQA answers were scored spans (--score-spans): paired with non_shared/spans
VARIANTS = (SPANS_SUFFIX, GREEDY_SUFFIX)  # the suffixes a run label may end with, in the order they are appended
NOISE_LABEL = "non_shared/reseed"  # the noise control's scheme label in summaries and tables
NOISE_SEED_OFFSET = 1000  # the noise control runs seed + this for every seed of the evaluation
N_BOOT = 2000
LEVEL = 0.95


def variant(label: str) -> str:
    """The variant suffixes that end a run label (`VARIANTS`, e.g. "/spans/greedy"; "" for plain sampled runs): a
    scheme's delta is to non_shared of the same variant, and its fidelity that of the label without them."""
    out = ""
    for suffix in reversed(VARIANTS):
        if label.endswith(suffix):
            out, label = suffix + out, label.removesuffix(suffix)
    return out


def base_label(label: str) -> str:
    """The label without its variant suffixes ("base_lr_shared/spans/greedy" -> "base_lr_shared")."""
    return label.removesuffix(variant(label))


def bootstrap_ci(
    values: Sequence[float], n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, fixed RNG seed).

    One value: (v, v); none: (nan, nan). The interval is of the mean, in the units of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], method="inverted_cdf")
    return float(lo), float(hi)


@dataclass
class SchemeStats:
    """One (dataset, adapter set, scheme) over all its seeds; percentages, CIs as (low, high) percentages."""

    dataset: str
    adapters: str
    scheme: str
    seeds: list[int]
    n: int  # questions answered under every seed (the paired set)
    accuracy: float
    ci: tuple[float, float]
    delta: float | None = None  # accuracy - non_shared's, on the same questions and seeds
    delta_ci: tuple[float, float] | None = None
    out_of_function: float = 0.0  # % of (question, seed) runs without an answer
    capped: float = 0.0  # % halted by the iteration cap
    forced: float = 0.0  # % whose answer came from the forced Finish at the cap
    agreement: float | None = None  # analyze: next-token agreement with non_shared (%)
    kl: float | None = None  # analyze: mean KL(non_shared || scheme), nats
    extra: dict = field(default_factory=dict)


def _key(q: Mapping) -> tuple[str, str, str]:
    return str(q.get("dataset", "")), str(q.get("adapters", "")), str(q.get("scheme", ""))


def per_question(questions: Sequence[Mapping]) -> dict[tuple[str, str, str], dict[str, dict[int, Mapping]]]:
    """(dataset, adapters, scheme) -> question id -> seed -> the question's record."""
    out: dict[tuple[str, str, str], dict[str, dict[int, Mapping]]] = defaultdict(lambda: defaultdict(dict))
    for q in questions:
        out[_key(q)][str(q["id"])][int(q.get("seed", 0))] = q
    return out


def _matrix(runs: Mapping[str, Mapping[int, Mapping]], ids: list[str], field_name: str) -> np.ndarray:
    """[questions, seeds] of a boolean field, seeds in sorted order (seed k of one scheme pairs with seed k of the
    reference, also for the noise control whose seeds are offset)."""
    return np.array([[float(bool(runs[i][s][field_name])) for s in sorted(runs[i])] for i in ids])


def _complete(runs: Mapping[str, Mapping[int, Mapping]]) -> tuple[list[str], int]:
    """Question ids that ran under the most common number of seeds, and that number."""
    counts = [len(v) for v in runs.values()]
    k = max(set(counts), key=counts.count)
    return [i for i, v in runs.items() if len(v) == k], k


def scheme_stats(
    questions: Sequence[Mapping], n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> list[SchemeStats]:
    """Accuracy, its CI and the paired delta to non_shared for every (dataset, adapters, scheme) in ``questions``
    (the per-question records of an eval report), in order of first appearance."""
    grouped = per_question(questions)
    rows = []
    for (dataset, adapters, scheme), runs in grouped.items():
        ids, _ = _complete(runs)
        correct = _matrix(runs, ids, "correct")
        per_q = correct.mean(axis=1) if correct.size else np.zeros(0)
        row = SchemeStats(
            dataset,
            adapters,
            scheme,
            sorted({s for i in ids for s in runs[i]}),
            len(ids),
            100.0 * float(per_q.mean()) if per_q.size else 0.0,
            _pct(bootstrap_ci(per_q, n_boot, level, seed)),
            out_of_function=_rate(runs, ids, lambda q: q.get("prediction") is None),
            capped=_rate(runs, ids, lambda q: q.get("halt_reason") == "max_iterations"),
            forced=_rate(runs, ids, lambda q: bool(q.get("forced_finish"))),
        )
        reference = REFERENCE + variant(scheme)
        ref = grouped.get((dataset, adapters, reference))
        if ref is not None and scheme != reference:
            _add_delta(row, runs, ref, n_boot, level, seed)
        rows.append(row)
    return rows


def _add_delta(row: SchemeStats, runs: Mapping, ref: Mapping, n_boot: int, level: float, seed: int) -> None:
    """Paired delta over the questions both ran with the same number of seeds."""
    complete, k = _complete(runs)
    ids = [i for i in complete if i in ref and len(ref[i]) == k]
    if not ids:
        return
    diff = (_matrix(runs, ids, "correct") - _matrix(ref, ids, "correct")).mean(axis=1)
    row.delta = 100.0 * float(diff.mean())
    row.delta_ci = _pct(bootstrap_ci(diff, n_boot, level, seed))


def _rate(runs: Mapping, ids: list[str], pred) -> float:
    flags = [pred(r) for i in ids for r in runs[i].values()]
    return 100.0 * sum(flags) / max(len(flags), 1)


def _pct(ci: tuple[float, float]) -> tuple[float, float]:
    return 100.0 * ci[0], 100.0 * ci[1]


def attach_fidelity(rows: Sequence[SchemeStats], analyze_report: Mapping) -> None:
    """Copy `lragent analyze`'s handoff fidelity (greedy agreement %, mean KL) onto the rows of the same adapter set
    and scheme; non_shared is exact by definition (100%, 0) when analyze ran no control for it."""
    fid = {(s.get("adapters"), f["scheme"]): f for s in analyze_report.get("sets", []) for f in s.get("fidelity", [])}
    for row in rows:
        scheme = base_label(row.scheme)  # fidelity is a property of the scheme, not the decoding or answering
        f = fid.get((row.adapters, scheme))
        if f is not None:
            row.agreement, row.kl = 100.0 * float(f["agreement"]), float(f["kl_mean"])
        elif scheme in (REFERENCE, NOISE_LABEL) and any(a == row.adapters for a, _ in fid):
            row.agreement, row.kl = 100.0, 0.0

"""Bootstrap confidence intervals, seeds and the noise control of `lragent eval`, and 80-column tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lragent.eval import stats as S
from lragent.eval.report import format_summary
from lragent.eval.tables import render


def test_bootstrap_ci_enumerable_cases():
    # n = 2, values {0, 1}: the resampled mean is 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are 0 and 1 (inverted CDF)
    assert S.bootstrap_ci([0.0, 1.0], n_boot=20_000) == (0.0, 1.0)
    # n = 3, values {0, 0, 1}: the mean is k/3 with k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27. The CDF at 2/3
    # is 26/27 = 0.963: below 0.975 (95% upper end is 1), above 0.95 (90% upper end is 2/3)
    assert S.bootstrap_ci([0.0, 0.0, 1.0], n_boot=20_000, level=0.95) == (0.0, 1.0)
    lo, hi = S.bootstrap_ci([0.0, 0.0, 1.0], n_boot=20_000, level=0.90)
    assert lo == 0.0 and hi == pytest.approx(2 / 3)
    assert S.bootstrap_ci([0.4] * 7) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(x) for x in S.bootstrap_ci([]))


def test_bootstrap_ci_matches_the_normal_approximation():
    values = [1.0] * 200 + [0.0] * 200  # p = 0.5, n = 400: half-width 1.96 * sqrt(p (1 - p) / n) = 0.049
    lo, hi = S.bootstrap_ci(values, n_boot=20_000)
    assert lo == pytest.approx(0.5 - 0.049, abs=0.006) and hi == pytest.approx(0.5 + 0.049, abs=0.006)
    assert S.bootstrap_ci(values, seed=3) == S.bootstrap_ci(values, seed=3)  # fixed seed: reproducible


def _q(scheme: str, qid: int, seed: int, correct: bool, **kw) -> dict:
    return {"dataset": "d", "adapters": "a", "scheme": scheme, "id": str(qid), "seed": seed, "correct": correct,
            "prediction": kw.get("prediction", "x"), "halt_reason": kw.get("halt", "finished"),
            "forced_finish": kw.get("forced", False)}  # fmt: skip


def test_scheme_stats_pools_seeds_per_question_and_pairs_the_delta():
    ref = {(q, s): (q + s) % 2 == 0 for q in range(10) for s in (1, 2)}  # 50% right
    other = {(q, s): q < 8 for q in range(10) for s in (1, 2)}  # 80% right
    questions = [_q("non_shared", q, s, c) for (q, s), c in ref.items()]
    questions += [
        _q("base_lr_shared", q, s, c, halt="max_iterations" if q == 9 else "finished") for (q, s), c in other.items()
    ]
    questions += [_q(S.NOISE_LABEL, q, s + S.NOISE_SEED_OFFSET, c) for (q, s), c in ref.items()]
    questions.append(_q("non_shared", 99, 1, True))  # ran under one seed only: left out of the paired set
    rows = {r.scheme: r for r in S.scheme_stats(questions, n_boot=4000)}
    assert list(rows) == ["non_shared", "base_lr_shared", S.NOISE_LABEL]
    ns, lr, noise = rows["non_shared"], rows["base_lr_shared"], rows[S.NOISE_LABEL]
    assert ns.n == 10 and ns.seeds == [1, 2] and ns.accuracy == pytest.approx(50.0) and ns.delta is None
    per_q = np.array([np.mean([ref[(q, s)] for s in (1, 2)]) for q in range(10)])
    assert ns.ci == pytest.approx(tuple(100 * x for x in S.bootstrap_ci(per_q, n_boot=4000)))
    assert lr.accuracy == pytest.approx(80.0) and lr.delta == pytest.approx(30.0)
    diff = np.array([float(q < 8) for q in range(10)]) - per_q
    assert lr.delta_ci == pytest.approx(tuple(100 * x for x in S.bootstrap_ci(diff, n_boot=4000)))
    assert lr.capped == pytest.approx(10.0) and lr.out_of_function == 0.0
    assert noise.seeds == [1001, 1002] and noise.delta == 0.0 and noise.delta_ci == (0.0, 0.0)


def test_fidelity_joins_the_rows():
    rows = S.scheme_stats([_q("non_shared", 1, 1, True), _q("base_shared", 1, 1, True), _q("full_shared", 1, 1, False)])
    report = {"sets": [{"adapters": "a", "fidelity": [{"scheme": "base_shared", "agreement": 0.999, "kl_mean": 2e-6}]}]}
    S.attach_fidelity(rows, report)
    by = {r.scheme: r for r in rows}
    assert by["base_shared"].agreement == pytest.approx(99.9) and by["base_shared"].kl == 2e-6
    assert (by["non_shared"].agreement, by["non_shared"].kl) == (100.0, 0.0)
    assert by["full_shared"].agreement is None
    greedy = S.scheme_stats([_q("non_shared/greedy", 1, 1, True), _q("base_shared/greedy", 1, 1, True)])
    S.attach_fidelity(greedy, report)  # the fidelity of a scheme whatever the decoding of the accuracy run
    assert [(r.agreement, r.kl) for r in greedy] == [(100.0, 0.0), (pytest.approx(99.9), 2e-6)]


def test_tables_fit_80_columns():
    header = ["a very long header name", "b", "c"]
    rows = [["x" * 70, "y" * 30, "z"], ["short", "1", "2"]]
    text = render(header, rows, 80, [False, True, True], title="t" * 100)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" in text and "short" in text
    questions = [_q(s, q, seed, q % 3 == 0) for s in ("non_shared", "full_shared", "base_shared", "base_lr_shared")
                 for q in range(30) for seed in (1, 2, 3)]  # fmt: skip
    questions += [_q(S.NOISE_LABEL, q, seed + S.NOISE_SEED_OFFSET, q % 2 == 0) for q in range(30) for seed in (1, 2, 3)]
    rows = S.scheme_stats(questions)
    S.attach_fidelity(rows, {"sets": [{"adapters": "a", "fidelity": [{"scheme": "base_lr_shared", "agreement": 0.98765,
                                                                       "kl_mean": 0.01234}]}]})  # fmt: skip
    text = format_summary(rows)
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    for label in ("non_shared", "base_lr_shared", "ns reseed", "95% CI", "agree%", "KL", "98.8", "0.0123"):
        assert label in text
    assert "…" not in text  # nothing had to be cut


def test_greedy_runs_keep_their_own_label_and_pair_with_greedy_non_shared():
    """A merge of sampled and greedy runs (the same seeds) keeps them apart: greedy rows are `<scheme>/greedy` and
    their delta is to non_shared/greedy, never to the sampled non_shared."""
    from lragent.agents.pipeline import PipelineConfig
    from lragent.eval.runner import EvalSpec

    g = S.GREEDY_SUFFIX
    spec = EvalSpec(data=[], schemes=["non_shared", "base_lr_shared"], pipeline=PipelineConfig(greedy=True),
                    seeds=[1], noise_control=True)  # fmt: skip
    assert spec.runs() == [("non_shared", "non_shared" + g, 1), ("base_lr_shared", "base_lr_shared" + g, 1),
                           ("non_shared", S.NOISE_LABEL + g, 1 + S.NOISE_SEED_OFFSET)]  # fmt: skip
    assert [label for _, label, _ in EvalSpec(data=[], schemes=["non_shared"]).runs()] == ["non_shared"]
    sampled = [_q("non_shared", q, 1, q < 5) for q in range(10)]  # 50%
    greedy = [_q("non_shared" + g, q, 1, q < 9) for q in range(10)]  # 90%
    greedy += [_q("base_lr_shared" + g, q, 1, q < 7) for q in range(10)]  # 70%
    rows = {r.scheme: r for r in S.scheme_stats(sampled + greedy, n_boot=2000)}
    assert rows["non_shared"].accuracy == pytest.approx(50.0) and rows["non_shared" + g].accuracy == pytest.approx(90.0)
    assert rows["non_shared" + g].delta is None
    assert rows["base_lr_shared" + g].delta == pytest.approx(-20.0)  # against greedy non_shared, not +20 vs sampled


def test_span_scored_runs_keep_their_own_label_and_pair_with_their_own_non_shared():
    """--score-spans runs are `<scheme>/spans` (with greedy `/spans/greedy`) and pair with non_shared of the same
    variant, so a merge with generated-answer runs of the same seeds compares like with like; the terminal shows
    them as "/s" (the noise control as "ns reseed/s")."""
    from lragent.agents.pipeline import PipelineConfig
    from lragent.eval.report import short_label
    from lragent.eval.runner import EvalSpec

    sp, g = S.SPANS_SUFFIX, S.GREEDY_SUFFIX
    spec = EvalSpec(data=[], schemes=["base_lr_shared"], pipeline=PipelineConfig(score_spans=True, greedy=True),
                    seeds=[1], noise_control=True)  # fmt: skip
    assert spec.runs() == [("base_lr_shared", "base_lr_shared" + sp + g, 1),
                           ("non_shared", S.NOISE_LABEL + sp + g, 1 + S.NOISE_SEED_OFFSET)]  # fmt: skip
    generated = [_q("non_shared", q, 1, q < 2) for q in range(10)]  # 20%
    spans = [_q("non_shared" + sp, q, 1, q < 6) for q in range(10)]  # 60%
    spans += [_q("base_lr_shared" + sp, q, 1, q < 5) for q in range(10)]  # 50%
    rows = {r.scheme: r for r in S.scheme_stats(generated + spans, n_boot=2000)}
    assert rows["non_shared" + sp].delta is None
    assert rows["base_lr_shared" + sp].delta == pytest.approx(-10.0)  # against non_shared/spans, not +30
    assert S.base_label("base_lr_shared" + sp + g) == "base_lr_shared" and S.variant("non_shared") == ""
    assert short_label(S.NOISE_LABEL + sp) == "ns reseed/s" and short_label("base_shared" + sp + g) == "base_shared/s/g"

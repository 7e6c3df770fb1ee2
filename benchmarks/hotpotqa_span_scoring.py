"""Would scoring candidate spans recover HotpotQA answers the agent sees but does not pick? (CPU, offline, one table.)

Reads the saved H200 trajectories (`benchmarks/accuracy_h200/eval_hotpotqa.json.gz`), run hotpotqa-shared-a /
non_shared / seed 1, episodes not cut by the time limit that made a Finish call. Per episode the context is the
trajectory up to the first 'Finish[\\n### Response:\\n'; the candidates are spans of the observations before
it (maximal capitalised runs with inner connectors and their parts around 'and', numbers, dates; later observations
first, at most 60), 'yes', 'no' and the agent's own first Finish answer. Each candidate is scored with the action
adapter through the engine's prompt log-probs (`option_continuation`, as `lragent eval --score-options`
scores ScienceQA options):

  saved  : the episode's saved prediction
  sum    : argmax of the summed log-prob of the candidate after the context
  mean   : argmax of the mean log-prob per candidate token (length-normalised)
  PMI    : argmax of sum minus the candidate's log-prob after 'Finish[\\n### Response:\\n' alone (its prior)

and reports EM / F1 of each, the oracle rate (gold among the candidates) and EM among the oracle episodes.
Run: python benchmarks/hotpotqa_span_scoring.py [--limit N] [--out F]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path

from lragent import LLM, SamplingParams
from lragent.agents.episode import option_continuation
from lragent.agents.scoring import exact_match, f1_score, normalize_answer
from lragent.agents.spans import answer_spans

FILE = "benchmarks/accuracy_h200/eval_hotpotqa.json.gz"
RUN = ("hotpotqa-shared-a", "non_shared", 1)
ADAPTER = "lragent/adapters/hotpotqa-shared-a/action"
MARK = "Finish[\n### Response:\n"
_OBS = re.compile(r"Obversation: ([^\n]*)")
_FINISH = re.compile(re.escape(MARK) + r"([^\]\n]*)\]")
METHODS = ("saved", "sum", "mean", "PMI")


def candidates(observations: list[str], cap: int = 60) -> list[str]:
    """Spans of the observations, later observations first, deduplicated (normalised), at most `cap`: the
    pipeline's own `answer_spans` (`lragent eval --score-spans`) without its yes / no."""
    return answer_spans(observations, cap, extra=())


def episodes(path: str, limit: int | None) -> list[dict]:
    """The run's episodes that ended on their own with a Finish call: context, candidates, gold, saved prediction."""
    rows = []
    for ep in json.load(gzip.open(path))["questions"]:
        traj = ep["trajectory"]
        if (ep["adapters"], ep["scheme"], ep["seed"]) != RUN or ep["halt_reason"] == "time_limit" or MARK not in traj:
            continue
        cut = traj.index(MARK) + len(MARK)
        own = _FINISH.search(traj)
        cands = candidates(_OBS.findall(traj[:cut]))
        for extra in ("yes", "no", own.group(1).strip() if own else ""):
            if extra and normalize_answer(extra) not in {normalize_answer(c) for c in cands}:
                cands.append(extra)
        rows.append(
            {"id": ep["id"], "gold": ep["gold"], "saved": ep["prediction"], "context": traj[:cut], "cands": cands}
        )
    return rows[:limit] if limit else rows


def score(llm: LLM, rows: list[dict], batch: int) -> None:
    """Add each row's per-candidate (summed log-prob, token count, prior log-prob)."""

    def enc(text: str, special: bool = False) -> list[int]:
        return list(llm.tokenizer.encode(text, add_special_tokens=special))

    prior_ctx = enc(MARK, True)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        ctxs = [enc(row["context"], True) for row in chunk]
        llm.generate([*ctxs, prior_ctx], SamplingParams(max_tokens=1, temperature=0.0), adapter="action")  # fill cache
        prompts, params, where = [], [], []
        for i, (row, ctx) in enumerate(zip(chunk, ctxs), start):
            for j, c in enumerate(row["cands"]):
                cont = enc(option_continuation(c))
                for kind, pre in (("ctx", ctx), ("prior", prior_ctx)):
                    prompts.append(pre + cont)
                    params.append(
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=len(pre))
                    )
                    where.append((i, j, kind, len(cont)))
        for (i, j, kind, n), out in zip(where, llm.generate(prompts, params, adapter="action")):
            lp = sum(e.logprob for e in out.prompt_logprobs if e is not None)
            rows[i].setdefault(kind, {})[j] = lp
            rows[i].setdefault("ntok", {})[j] = n
        print(f"  scored {min(start + batch, len(rows))}/{len(rows)} episodes", flush=True)


def pick(row: dict) -> dict[str, str]:
    """Each method's answer for one scored row."""
    idx = range(len(row["cands"]))
    ways = {
        "sum": [row["ctx"][j] for j in idx],
        "mean": [row["ctx"][j] / row["ntok"][j] for j in idx],
        "PMI": [row["ctx"][j] - row["prior"][j] for j in idx],
    }
    answers = {"saved": row["saved"] or ""}
    for name, vals in ways.items():
        answers[name] = row["cands"][max(idx, key=vals.__getitem__)]
    return answers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default=FILE)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4, help="episodes per llm.generate")
    ap.add_argument("--out", default=".w/span_scoring.json")
    args = ap.parse_args()
    rows = episodes(args.file, args.limit)
    llm = LLM(
        model="smollm2-135m-instruct", adapters={"action": ADAPTER}, sharing="non_shared", dtype="float32", device="cpu"
    )
    start = time.perf_counter()
    score(llm, rows, args.batch)
    wall = time.perf_counter() - start
    per_ep = []
    for row in rows:
        ans = pick(row)
        oracle = any(exact_match(c, row["gold"]) for c in row["cands"])
        per_ep.append({"id": row["id"], "gold": row["gold"], "oracle": oracle, "n_cands": len(row["cands"]), **ans})
    n, n_or = len(per_ep), sum(e["oracle"] for e in per_ep)
    table = {}
    for m in METHODS:
        em = [exact_match(e[m], e["gold"]) for e in per_ep]
        table[m] = {
            "EM": 100.0 * sum(em) / n,
            "F1": 100.0 * sum(f1_score(e[m], e["gold"]) for e in per_ep) / n,
            "EM | oracle": 100.0 * sum(x for x, e in zip(em, per_ep) if e["oracle"]) / max(n_or, 1),
        }
    mean_c = sum(e["n_cands"] for e in per_ep) / n
    print(f"HotpotQA span scoring, {'/'.join(map(str, RUN))}: {n} episodes, {mean_c:.1f} candidates each, {wall:.0f} s")
    print(f"oracle (gold among candidates): {100.0 * n_or / n:.1f}% ({n_or}/{n})")
    print(f"{'method':8} {'EM':>7} {'F1':>7} {'EM|oracle':>10}")
    for m, r in table.items():
        print(f"{m:8} {r['EM']:7.1f} {r['F1']:7.1f} {r['EM | oracle']:10.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {
        "run": RUN,
        "episodes": n,
        "oracle": 100.0 * n_or / n,
        "wall_s": wall,
        "table": table,
        "per_episode": per_ep,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

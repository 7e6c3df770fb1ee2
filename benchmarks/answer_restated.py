"""Does restating the question before the answer help the action agent answer? (CPU, offline, one table per task.)

Reads saved H200 trajectories (`lragent eval` JSON), one run, episodes that made a Finish call and were not cut by
the time limit. Per episode, these contexts of the action adapter:

  finish   : the trajectory up to the first 'Finish[\\n### Response:\\n' (what `--score-options` scores after)
  restated : the trajectory up to the Thought of that Finish step (every observation kept), then
             'Question: {question}\\nAnswer:' (ScienceQA: the options listed too), the usual cloze form
  bare     : ScienceQA only: the restated context without the options listed

and the answer is the candidate with the highest summed log-prob after the context (PMI: minus its log-prob after
'Answer:' alone; eol: the candidate followed by the line's end, so a span cut short of the answer pays for
ending there; mean: the log-prob per token, as lm-evaluation-harness's length-normalised accuracy). Candidates:
ScienceQA the options' texts; HotpotQA spans of the observations (`hotpotqa_span_scoring.candidates`), 'yes', 'no'
and the agent's own answer; HotpotQA also greedy-generates after the restated context (up to 24 tokens, to the
line's end). Reports accuracy (ScienceQA) or EM / F1 (HotpotQA).
Run: python benchmarks/answer_restated.py --task scienceqa|hotpotqa [--limit N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from lragent import LLM, SamplingParams
from lragent.agents.episode import option_continuation
from lragent.agents.scoring import exact_match, f1_score, normalize_answer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpotqa_span_scoring import _FINISH, _OBS, MARK, candidates  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {
    "scienceqa": (
        "benchmarks/accuracy_h200_r6/eval_scienceqa.json.gz",
        ("scienceqa-shared-a", "non_shared", 1),
        "lragent/adapters/scienceqa-shared-a/action",
        ("scienceqa/scienceqa_grade1-4.jsonl", "scienceqa/scienceqa_grade5-8.jsonl"),
    ),
    "hotpotqa": (
        "benchmarks/accuracy_h200/eval_hotpotqa.json.gz",
        ("hotpotqa-shared-a", "non_shared", 1),
        "lragent/adapters/hotpotqa-shared-a/action",
        ("hotpotqa/hotpotqa_easy.jsonl", "hotpotqa/hotpotqa_medium.jsonl"),
    ),
}
_THOUGHT = "Thought: \n### Response:\n"


def _record_id(record: dict) -> str:
    return str(record.get("id") or record.get("_id") or record.get("pid") or record.get("question_id"))


def _question(record: dict) -> str:
    return str(record.get("Question") or record.get("question")).split("\nOptions:")[0].strip()


def episodes(task: str, limit: int | None) -> list[dict]:
    """The run's episodes with a Finish call: both contexts, candidates, gold, saved prediction."""
    path, run, _, files = TASKS[task]
    records = {_record_id(r): r for f in files for r in map(json.loads, open(DATA / f))}
    rows = []
    for ep in json.load(gzip.open(path))["questions"]:
        traj = ep["trajectory"]
        if (ep["adapters"], ep["scheme"], ep["seed"]) != tuple(run) or ep["halt_reason"] == "time_limit":
            continue
        if MARK not in traj or ep["id"] not in records:
            continue
        record = records[ep["id"]]
        cut = traj.index(MARK) + len(MARK)
        head = traj[: traj.rindex(_THOUGHT, 0, cut)]
        question = _question(record)
        if task == "scienceqa":
            cands = [" ".join(c.split()) for c in record["choices"]]
            listed = " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(cands))
            restated = f"{head}Question: {question}\nOptions: {listed}\nAnswer:"
            bare = f"{head}Question: {question}\nAnswer:"
        else:
            own = _FINISH.search(traj)
            cands = candidates(_OBS.findall(traj[:cut]))
            for extra in ("yes", "no", own.group(1).strip() if own else ""):
                if extra and normalize_answer(extra) not in {normalize_answer(c) for c in cands}:
                    cands.append(extra)
            restated = bare = f"{head}Question: {question}\nAnswer:"
        rows.append(
            {"id": ep["id"], "gold": ep["gold"], "saved": ep["prediction"] or "", "cands": cands,
             "finish": traj[:cut], "restated": restated, "bare": bare}
        )  # fmt: skip
    return rows[:limit] if limit else rows


def score(llm: LLM, rows: list[dict], task: str, batch: int) -> None:
    """Each row's per-candidate summed log-probs after both contexts and after the prior 'Answer:'."""

    def enc(text: str, special: bool = False) -> list[int]:
        return list(llm.tokenizer.encode(text, add_special_tokens=special))

    prior = enc("Answer:", True)
    gen = SamplingParams(max_tokens=24, temperature=0.0, stop=["\n"])
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        ctx = [{k: enc(r[k], True) for k in ("finish", "restated", "bare")} for r in chunk]
        outs = llm.generate([c["restated"] for c in ctx], gen, adapter="action")  # also fills the prefix cache
        for row, out in zip(chunk, outs):
            row["generated"] = out.text.strip().rstrip("]").strip()
        prompts, params, where = [], [], []
        for i, (row, c) in enumerate(zip(chunk, ctx), start):
            for j, cand in enumerate(row["cands"]):
                for kind, pre, cont in (
                    ("finish", c["finish"], enc(option_continuation(cand))),
                    ("restated", c["restated"], enc(" " + cand)),
                    ("restated eol", c["restated"], enc(" " + cand + "\n")),
                    *((("bare", c["bare"], enc(" " + cand)),) if task == "scienceqa" else ()),
                    ("prior", prior, enc(" " + cand)),
                ):
                    prompts.append(pre + cont)
                    params.append(
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=len(pre))
                    )
                    where.append((i, j, kind))
        for (i, j, kind), out in zip(where, llm.generate(prompts, params, adapter="action")):
            lps = [e.logprob for e in out.prompt_logprobs if e is not None]
            rows[i].setdefault("lp_" + kind, {})[j] = sum(lps)
            rows[i].setdefault("n_" + kind, {})[j] = len(lps)
        print(f"  scored {min(start + batch, len(rows))}/{len(rows)} episodes", flush=True)


def answers(row: dict, task: str) -> dict[str, str]:
    """Each method's answer for one scored row (ScienceQA: the option's letter)."""
    idx = range(len(row["cands"]))
    ways = {
        "finish": [row["lp_finish"][j] for j in idx],
        "restated": [row["lp_restated"][j] for j in idx],
        "restated PMI": [row["lp_restated"][j] - row["lp_prior"][j] for j in idx],
        "restated eol": [row["lp_restated eol"][j] for j in idx],
        "finish mean": [row["lp_finish"][j] / row["n_finish"][j] for j in idx],
        "restated mean": [row["lp_restated"][j] / row["n_restated"][j] for j in idx],
        **(
            {
                "bare": [row["lp_bare"][j] for j in idx],
                "bare PMI": [row["lp_bare"][j] - row["lp_prior"][j] for j in idx],
                "bare mean": [row["lp_bare"][j] / row["n_bare"][j] for j in idx],
            }
            if task == "scienceqa"
            else {}
        ),
    }
    out = {"saved": row["saved"]}
    for name, vals in ways.items():
        best = max(idx, key=vals.__getitem__)
        out[name] = chr(65 + best) if task == "scienceqa" else row["cands"][best]
    if task == "hotpotqa":
        out["restated generate"] = row["generated"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4, help="episodes per llm.generate")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = episodes(args.task, args.limit)
    _, run, adapter, _ = TASKS[args.task]
    llm = LLM(
        model="smollm2-135m-instruct", adapters={"action": adapter}, sharing="non_shared", dtype="float32", device="cpu"
    )
    start = time.perf_counter()
    score(llm, rows, args.task, args.batch)
    wall = time.perf_counter() - start
    per_ep = [{"id": r["id"], "gold": r["gold"], **answers(r, args.task)} for r in rows]
    methods = [m for m in per_ep[0] if m not in ("id", "gold")]

    def right(pred: str, gold: str) -> bool:  # ScienceQA letters compared as they are ("A" is an article to EM)
        return pred.strip() == gold if args.task == "scienceqa" else exact_match(pred, gold)

    table = {
        m: {
            "EM": 100.0 * sum(right(e[m], e["gold"]) for e in per_ep) / len(per_ep),
            "F1": 100.0 * sum(f1_score(e[m], e["gold"]) for e in per_ep) / len(per_ep),
        }
        for m in methods
    }
    print(f"{args.task} restated answer, {'/'.join(map(str, run))}: {len(per_ep)} episodes, {wall:.0f} s")
    print(f"{'method':18} {'EM/acc':>7} {'F1':>7}")
    for m, r in table.items():
        print(f"{m:18} {r['EM']:7.1f} {r['F1']:7.1f}")
    out = Path(args.out or f".w/answer_restated_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "episodes": len(per_ep), "wall_s": wall, "table": table,
                               "per_episode": per_ep}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

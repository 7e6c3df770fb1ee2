"""Does the action agent answer ScienceQA better as a reader of the agents' evidence? (CPU, offline, one table.)

`lragent eval --score-options reader` answers ScienceQA's Finish with the option the action agent finds most likely
after a short prompt of its own: the informative observations of the trajectory (`tools.evidence`), then the
question as a cloze (`episode.reader_prompt`), each option's score minus its score after 'Answer:' alone (PMI).
This script measures that answer step on saved H200 trajectories (the sixth session's shared-A non_shared seed-1
run, 240 questions, grade 1-4 + 5-8) with the pipeline's own prompt functions, for the base model and both shipped
action adapters, against:

  reader      : the evidence, then the question (what the pipeline scores), raw and PMI
  bare        : the question alone, no evidence (what the agents' evidence adds is reader - bare), raw and PMI

Columns: accuracy over all questions, and over the questions whose trajectory holds evidence (mostly an image
caption). The chance rate of the option letters is 39.3%; the in-trajectory answer (`--score-options`) was 41.9-46.2%.
Run: python benchmarks/scienceqa_reader.py [--limit N] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path

from lragent import LLM, SamplingParams
from lragent.agents import tools as T
from lragent.agents.episode import READER_PRIOR, reader_prompt
from lragent.agents.formats import load_format

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"
FILES = ("scienceqa_grade1-4.jsonl", "scienceqa_grade5-8.jsonl")
SAVED = Path(__file__).resolve().parent / "accuracy_h200_r6" / "eval_scienceqa.json.gz"
RUN = ("scienceqa-shared-a", "non_shared", 1)
ADAPTERS = {
    "shared-a-action": "lragent/adapters/scienceqa-shared-a/action",
    "independent-action": "lragent/adapters/scienceqa-independent/action",
}
_OBS = re.compile(r"Obversation: (.*)")


def questions(limit: int | None) -> list[dict]:
    """Each question with its option texts, gold index and the evidence of its saved trajectory."""
    fmt = load_format("scienceqa")
    saved = {e["id"]: e for e in json.load(gzip.open(SAVED))["questions"]
             if (e["adapters"], e["scheme"], e["seed"]) == RUN}  # fmt: skip
    rows = []
    for record in (json.loads(line) for f in FILES for line in open(DATA / f)):
        episode = saved.get(str(record["pid"]))
        found = T.evidence(_OBS.findall(episode["trajectory"])) if episode else []
        question = fmt.question(record)
        rows.append({
            "id": str(record["pid"]), "gold": ord(record["Answer"]) - 65, "evidence": bool(found),
            "options": [" " + " ".join(c.split()) for c in record["choices"]],
            "contexts": {"reader": reader_prompt(question, found), "bare": reader_prompt(question, []),
                         "prior": READER_PRIOR},
        })  # fmt: skip
    return rows[:limit] if limit else rows


def accuracy(llm: LLM, rows: list[dict], adapter: str | None) -> dict[str, list[float]]:
    """Way -> [accuracy over all, accuracy over the questions with evidence] (%)."""

    def enc(text: str, special: bool = False) -> list[int]:
        return list(llm.tokenizer.encode(text, add_special_tokens=special))

    prompts, params, where = [], [], []
    for qi, row in enumerate(rows):
        for name, context in row["contexts"].items():
            ctx = enc(context, True)
            for opt in row["options"]:
                prompts.append(ctx + enc(opt))
                params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                             prompt_logprobs_start=len(ctx)))  # fmt: skip
                where.append((qi, name))
    scores: dict[tuple[int, str], list[float]] = {}
    for key, out in zip(where, llm.generate(prompts, params, adapter=adapter)):
        scores.setdefault(key, []).append(sum(e.logprob for e in out.prompt_logprobs if e is not None))
    table = {}
    for way in ("reader PMI", "reader", "bare PMI", "bare"):
        name, pmi = way.split()[0], way.endswith("PMI")
        right = []
        for qi, row in enumerate(rows):
            vals = [s - (p if pmi else 0.0) for s, p in zip(scores[(qi, name)], scores[(qi, "prior")])]
            right.append((vals.index(max(vals)) == row["gold"], row["evidence"]))
        with_ev = [ok for ok, ev in right if ev]
        table[way] = [100.0 * sum(ok for ok, _ in right) / len(right), 100.0 * sum(with_ev) / max(1, len(with_ev))]
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/scienceqa_reader.json")
    args = ap.parse_args()
    rows = questions(args.limit)
    llm = LLM(model="smollm2-135m-instruct", adapters=ADAPTERS, sharing="non_shared", dtype="float32",
              device=args.device)  # fmt: skip
    start = time.perf_counter()
    table = {name or "base model": accuracy(llm, rows, name) for name in (None, *ADAPTERS)}
    n_ev = sum(r["evidence"] for r in rows)
    print(f"ScienceQA reader answer, {len(rows)} questions ({n_ev} with evidence), {time.perf_counter() - start:.0f} s")
    ways = list(next(iter(table.values())))
    print(f"{'model':20} " + " ".join(f"{w:>11}" for w in ways) + "   (all / with evidence, %)")
    for name, row in table.items():
        print(f"{name:20} " + " ".join(f"{a:5.1f}/{e:5.1f}" for a, e in row.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"questions": len(rows), "with_evidence": n_ev, "accuracy": table}, indent=1))


if __name__ == "__main__":
    main()

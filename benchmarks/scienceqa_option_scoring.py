"""How well does the model know the ScienceQA answers, asked in different ways? (CPU or GPU, one table.)

Every option of every question (grade 1-4 + 5-8, 240) is scored through the engine's prompt log-probs: the summed
log-probability of the option's text after a context, the question's answer being the most likely option. Contexts:

  finish letter : the AutoAct trajectory's opening up to 'Finish[' and the option's letter ('B]'), what a
                  generating action agent decides between
  finish text   : the same context, the option's text ('Dover]'): `lragent eval --score-options`
  finish PMI    : finish text minus the option's log-prob after 'Action: Finish[' alone (its prior in the agent's
                  answer slot, without question or prompt)
  finish agent-PMI : finish text minus its log-prob after the same agent prompt with an empty question (the prior
                  of the option given the agent's format)
  question      : 'Question: {question}\\nAnswer:' and the option's text, no agent prompt at all (the usual cloze
                  scoring of language-model evaluations)
  question PMI  : the same, minus the option's log-prob after 'Answer:' alone (calibrated against the option's own
                  prior, Holtzman et al. 2021)

The distance between the agent's context and the bare question says how much of what the model knows the agent
format loses. Run: python benchmarks/scienceqa_option_scoring.py [--adapters shared-a-action=DIR ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lragent import LLM, SamplingParams
from lragent.agents.episode import option_continuation
from lragent.agents.formats import load_format

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"
FILES = ("scienceqa_grade1-4.jsonl", "scienceqa_grade5-8.jsonl")
DEFAULT_ADAPTERS = ("shared-a-action=lragent/adapters/scienceqa-shared-a/action",)


def contexts(fmt, record: dict, enc) -> dict[str, tuple[list[int], list[list[int]]]]:
    """Context name -> (context ids, one continuation per option)."""
    question = record["Question"].split("\nOptions:")[0].strip()
    choices = record["choices"]
    finish = enc(fmt.opening(record), True) + enc("I need to pick the answer.\n" + fmt.action_call("Finish"))
    texts = [enc(" " + " ".join(c.split())) for c in choices]
    return {
        "finish letter": (finish, [enc(chr(65 + i) + "]") for i in range(len(choices))]),
        "finish text": (finish, [enc(option_continuation(c)) for c in choices]),
        "question": (enc(f"Question: {question}\nAnswer:", True), texts),
        "prior": (enc("Answer:", True), texts),
        "finish prior": (enc(fmt.action_call("Finish"), True), [enc(option_continuation(c)) for c in choices]),
        "agent prior": (
            enc(fmt.opening({**record, "Question": "", "choices": []}), True)
            + enc("I need to pick the answer.\n" + fmt.action_call("Finish")),
            [enc(option_continuation(c)) for c in choices],
        ),
    }


def score(llm: LLM, records: list[dict], adapter: str | None) -> dict[str, float]:
    """Accuracy (%) per way of asking, for one adapter (None: the base model)."""
    fmt = load_format("scienceqa")

    def enc(text: str, special: bool = False) -> list[int]:
        return list(llm.tokenizer.encode(text, add_special_tokens=special))

    prompts, params, where = [], [], []
    for qi, record in enumerate(records):
        for name, (ctx, conts) in contexts(fmt, record, enc).items():
            for cont in conts:
                prompts.append(ctx + cont)
                params.append(
                    SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=len(ctx))
                )
                where.append((qi, name))
    scores: dict[tuple[int, str], list[float]] = {}
    for key, out in zip(where, llm.generate(prompts, params, adapter=adapter)):
        scores.setdefault(key, []).append(sum(e.logprob for e in out.prompt_logprobs if e is not None))
    ways_names = ("finish letter", "finish text", "finish PMI", "finish agent-PMI", "question", "question PMI")
    right = dict.fromkeys(ways_names, 0)
    for qi, record in enumerate(records):
        gold = ord(record["Answer"]) - 65
        prior = scores[(qi, "prior")]
        ways = {name: scores[(qi, name)] for name in ("finish letter", "finish text", "question")}
        ways["question PMI"] = [a - b for a, b in zip(scores[(qi, "question")], prior)]
        ways["finish PMI"] = [a - b for a, b in zip(scores[(qi, "finish text")], scores[(qi, "finish prior")])]
        ways["finish agent-PMI"] = [a - b for a, b in zip(scores[(qi, "finish text")], scores[(qi, "agent prior")])]
        for name in ways_names:
            values = ways[name]
            right[name] += values.index(max(values)) == gold
    return {name: 100.0 * n / len(records) for name, n in right.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--adapters", nargs="*", default=list(DEFAULT_ADAPTERS), help="NAME=DIR (each scored, and the base)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="results/scienceqa_option_scoring.json")
    args = ap.parse_args()
    records = [json.loads(line) for f in FILES for line in open(Path(args.data) / f)]
    chance = 100.0 * sum(1 / len(r["choices"]) for r in records) / len(records)
    adapters = dict(a.split("=", 1) for a in args.adapters)
    llm = LLM(
        model="smollm2-135m-instruct", adapters=adapters, sharing="non_shared", dtype="float32", device=args.device
    )
    rows = {}
    start = time.perf_counter()
    for name in [None, *adapters]:
        rows[name or "base model"] = score(llm, records, name)
    print(
        f"ScienceQA option scoring, {len(records)} questions, chance {chance:.1f}% "
        f"({time.perf_counter() - start:.0f} s)"
    )
    ways = list(next(iter(rows.values())))
    print(f"{'model':20} " + " ".join(f"{w:>13}" for w in ways))
    for name, row in rows.items():
        print(f"{name:20} " + " ".join(f"{row[w]:13.1f}" for w in ways))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"chance": chance, "questions": len(records), "accuracy": rows}, indent=1))


if __name__ == "__main__":
    main()

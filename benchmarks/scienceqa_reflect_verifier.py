"""Can the reflect agent pick ScienceQA's answer? Its verdict as a verifier over every option (CPU, offline).

AutoAct's reflect agent judges an answer after Finish ("Reflect[right]" / "Reflect[wrong]"). Here, on the saved
H200 trajectories that `answer_restated.py` reads (non_shared, seed 1, 240 questions), each option's letter is
written after the trajectory's first `Finish[`, the reflect adapter writes its thought as in the loop (greedy, one
line) and its verdict's log-odds log P(Reflect[right]) - log P(Reflect[wrong]) scores the option. Answers:
  action   : the option text most likely after `Finish[` (what `--score-options` does),
  verifier : the option the reflect agent most believes right,
  both     : the sum of the two (the action's summed log-prob plus the verdict's log-odds).
Reports accuracy against the 39.3% chance rate of the option letters.
Run: python benchmarks/scienceqa_reflect_verifier.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lragent import LLM, SamplingParams
from lragent.agents.episode import option_continuation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answer_restated import episodes  # noqa: E402

ADAPTERS = "lragent/adapters/scienceqa-shared-a"
REFLECT = "]\nObversation: Please reflect your answer.\nThought: \n### Response:\n"


def _logprob(llm: LLM, prompts: list[tuple[list[int], list[int]]], adapter: str) -> list[float]:
    """Summed log-prob of each continuation after its context."""
    params = [
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=len(pre))
        for pre, _ in prompts
    ]
    outs = llm.generate([pre + cont for pre, cont in prompts], params, adapter=adapter)
    return [sum(e.logprob for e in out.prompt_logprobs if e is not None) for out in outs]


def score(llm: LLM, row: dict) -> dict:
    """One episode: per option the action's log-prob and the reflect verdict's log-odds."""

    def enc(text: str, special: bool = False) -> list[int]:
        return list(llm.tokenizer.encode(text, add_special_tokens=special))

    ctx = enc(row["finish"], True)
    letters = [chr(65 + i) for i in range(len(row["cands"]))]
    action = _logprob(llm, [(ctx, enc(option_continuation(c))) for c in row["cands"]], "action")
    judged = [ctx + enc(L + REFLECT) for L in letters]
    thought = SamplingParams(max_tokens=24, temperature=0.0, stop=["\n"])
    thoughts = [o.text.strip() for o in llm.generate(judged, thought, adapter="reflect")]
    verdict_ctx = [j + enc(t + "\n") for j, t in zip(judged, thoughts)]
    right = _logprob(llm, [(v, enc("Reflect[right]")) for v in verdict_ctx], "reflect")
    wrong = _logprob(llm, [(v, enc("Reflect[wrong]")) for v in verdict_ctx], "reflect")
    odds = [r - w for r, w in zip(right, wrong)]
    pick = {
        "action": max(range(len(letters)), key=lambda i: action[i]),
        "verifier": max(range(len(letters)), key=lambda i: odds[i]),
        "both": max(range(len(letters)), key=lambda i: action[i] + odds[i]),
    }
    return {"id": row["id"], "gold": row["gold"], "thoughts": thoughts, "odds": odds, "action_lp": action,
            **{k: letters[i] for k, i in pick.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=".w/scienceqa_reflect_verifier.json")
    args = ap.parse_args()
    rows = episodes("scienceqa", args.limit)
    llm = LLM(
        model="smollm2-135m-instruct",
        adapters={"action": f"{ADAPTERS}/action", "reflect": f"{ADAPTERS}/reflect"},
        sharing="non_shared",
        dtype="float32",
        device="cpu",
    )
    start, per_ep = time.perf_counter(), []
    for n, row in enumerate(rows, 1):
        per_ep.append(score(llm, row))
        if n % 20 == 0:
            print(f"  {n}/{len(rows)} episodes, {time.perf_counter() - start:.0f} s", flush=True)
    wall = time.perf_counter() - start
    table = {m: 100.0 * sum(e[m] == e["gold"] for e in per_ep) / len(per_ep) for m in ("action", "verifier", "both")}
    agree = 100.0 * sum(e["verifier"] == e["action"] for e in per_ep) / len(per_ep)
    print(f"scienceqa, reflect verdict as a verifier: {len(per_ep)} episodes, {wall:.0f} s (CPU)")
    for m, acc in table.items():
        print(f"  {m:9} {acc:5.1f}%")
    print(f"  verifier picks the action's option in {agree:.1f}% of episodes")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"episodes": len(per_ep), "wall_s": wall, "accuracy": table, "agree": agree,
                               "per_episode": per_ep}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

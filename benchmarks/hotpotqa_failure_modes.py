"""Why the agents miss HotpotQA answers on SmolLM2-135M: retrieval or extraction? (CPU, no model run, one table.)

Reads an `lragent eval` trajectory file (default: the H200 run of the retrieved adapters,
`benchmarks/accuracy_h200/eval_hotpotqa.json.gz`) and, per run (adapters, scheme, seed), over the episodes that
ended on their own (time-cut ones left out), counts:

  answered      : the episode gave a Finish answer
  gold seen     : the gold answer (normalised as exact match normalises) occurs in one of the tool observations
                  (for yes/no golds: never counted as seen; they are not spans)
  EM            : exact match
  EM | seen     : exact match among the episodes whose observations held the gold
  copied query  : the answer is (a normalised substring of) one of the agent's own tool queries
  in obs        : the answer occurs in an observation (an extracted span, right or wrong)

Run: python benchmarks/hotpotqa_failure_modes.py [--file F.json.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

from lragent.agents.scoring import exact_match, normalize_answer

DEFAULT = "benchmarks/accuracy_h200/eval_hotpotqa.json.gz"
_OBS = re.compile(r"Obversation: ([^\n]*)")
_QUERY = re.compile(r"(?:BingSearch|Retrieve|Lookup)\[\n### Response:\n([^\]\n]*)\]")


def _row(episode: dict) -> dict[str, bool]:
    traj = episode["trajectory"]
    obs = " ".join(normalize_answer(o) for o in _OBS.findall(traj))
    queries = [normalize_answer(q) for q in _QUERY.findall(traj)]
    gold, pred = normalize_answer(episode["gold"]), normalize_answer(episode["prediction"] or "")
    seen = gold not in ("yes", "no") and bool(gold) and f" {gold} " in f" {obs} "
    return {
        "answered": bool(pred),
        "gold seen": seen,
        "EM": exact_match(episode["prediction"], episode["gold"]),
        "copied query": bool(pred) and any(pred in q for q in queries),
        "in obs": bool(pred) and f" {pred} " in f" {obs} ",
        "seen and EM": seen and exact_match(episode["prediction"], episode["gold"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default=DEFAULT)
    args = ap.parse_args()
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for ep in json.load(gzip.open(args.file))["questions"]:
        if ep["halt_reason"] != "time_limit":
            runs[(ep["adapters"], ep["scheme"], ep["seed"])].append(_row(ep))
    cols = ("answered", "gold seen", "EM", "EM | seen", "copied query", "in obs")
    print(f"{'adapters':22} {'scheme':18} {'seed':>4} {'n':>4} " + " ".join(f"{c:>12}" for c in cols))
    for (adapters, scheme, seed), rows in sorted(runs.items()):
        n = len(rows)
        pct = {
            c: 100.0 * sum(r[c] for r in rows) / n for c in ("answered", "gold seen", "EM", "copied query", "in obs")
        }
        seen = sum(r["gold seen"] for r in rows)
        pct["EM | seen"] = 100.0 * sum(r["seen and EM"] for r in rows) / seen if seen else 0.0
        print(f"{adapters:22} {scheme:18} {seed:>4} {n:>4} " + " ".join(f"{pct[c]:12.1f}" for c in cols))


if __name__ == "__main__":
    main()

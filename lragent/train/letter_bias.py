r"""Letter-bias diagnostic: where an action adapter puts its next-token mass right after ``Finish[\n### Response:\n``.

Why: ScienceQA accuracy of adapter sets can sit at chance because the action model answers one letter whatever the
question (issue 15). Teacher-forced over the Finish examples of the training data (held-out or training side of
the set's own split), this measures, per example, the probability of each option letter as the next token; the
report compares how often each letter is the argmax with how often it is the gold answer, so a letter prior shows
up without running the agent loop. Runs the base model with the saved adapter through HF transformers + PEFT.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lragent.train.augment import FINISH_CALL, LETTERS, parse_options
from lragent.train.batching import encode_example
from lragent.train.examples import Example, load_role_examples, split_heldout

SPLITS = ("heldout", "train", "all")


@dataclass(frozen=True)
class LetterRow:
    """One Finish example: its gold letter and the next-token probability of each option letter."""

    gold: str
    probs: dict[str, float]

    @property
    def argmax(self) -> str:
        return max(self.probs, key=lambda k: self.probs[k])


def finish_examples(examples: Sequence[Example]) -> list[Example]:
    """Examples whose output is the Finish answer letter of a question with an option list."""
    out = []
    for ex in examples:
        parsed = parse_options(ex.input)
        if parsed and ex.input.endswith(FINISH_CALL) and ex.output.strip() in LETTERS[: len(parsed[1])]:
            out.append(ex)
    return out


def split_settings(set_dir: Path) -> tuple[float, int, int]:
    """``(held-out fraction, seed, max_seq_len)`` the set was trained with (its train_log.json), so "held-out" means
    the questions that run really held out; defaults (0.1, 42, 2048) when the log does not say."""
    log_path = Path(set_dir) / "train_log.json"
    settings = json.loads(log_path.read_text()).get("settings", {}) if log_path.is_file() else {}
    return (
        float(settings.get("heldout_fraction") or 0.1),
        int(settings.get("seed", 42)),
        int(settings.get("max_seq_len", 2048)),
    )


def select_examples(
    task: str, split: str, fraction: float, seed: int, limit: int | None, data_dir: Path | None = None
) -> list[Example]:
    """The action Finish examples of one side of the split (first ``limit``)."""
    train, heldout = split_heldout(load_role_examples(task, "action", data_dir), fraction, seed)
    chosen = {"heldout": heldout, "train": train, "all": train + heldout}[split]
    return finish_examples(chosen)[:limit]


def letter_ids(tokenizer: Any, n: int) -> dict[str, int]:
    """The token id of each of the first ``n`` letters, tokenised as a training output is (alone, no specials)."""
    ids = {}
    for letter in LETTERS[:n]:
        tokens = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"letter {letter!r} is {len(tokens)} tokens")
        ids[letter] = tokens[0]
    return ids


@torch.no_grad()
def letter_rows(model: Any, tokenizer: Any, examples: Sequence[Example], max_len: int) -> list[LetterRow]:
    """Per example, the softmax probability (over the whole vocabulary) of each option letter as the next token,
    the prompt tokenised and truncated exactly as in training."""
    rows = []
    for ex in examples:
        parsed = parse_options(ex.input)
        if parsed is None:
            raise ValueError("not a Finish example with options (use finish_examples)")
        ids = letter_ids(tokenizer, len(parsed[1]))
        enc = encode_example(tokenizer, ex, max_len)
        prompt = torch.tensor([enc.ids[: enc.n_prompt]], device=model.device)
        probs = torch.softmax(model(input_ids=prompt).logits[0, -1].float(), dim=-1)
        rows.append(LetterRow(ex.output.strip(), {k: float(probs[i]) for k, i in ids.items()}))
    return rows


def summarize(rows: Sequence[LetterRow]) -> dict[str, Any]:
    """Share of argmax per letter vs the gold letter distribution, accuracy, mean letter probabilities and the
    mean total mass on the letters (low mass: the model does not even answer with a letter)."""
    n = len(rows)
    letters = sorted({k for r in rows for k in r.probs})
    argmax, gold = Counter(r.argmax for r in rows), Counter(r.gold for r in rows)
    return {
        "examples": n,
        "accuracy": sum(r.argmax == r.gold for r in rows) / n if n else 0.0,
        "argmax_share": {k: argmax[k] / n for k in letters} if n else {},
        "gold_share": {k: gold[k] / n for k in letters} if n else {},
        "mean_prob": {k: sum(r.probs.get(k, 0.0) for r in rows) / n for k in letters} if n else {},
        "mean_letter_mass": sum(sum(r.probs.values()) for r in rows) / n if n else 0.0,
        "max_argmax_share": max(argmax.values()) / n if n else 0.0,
    }


def load_adapter_model(model_dir: Path, adapter_dir: Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model with the adapter, tokenizer)`` through HF transformers + PEFT, float32, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base = base.to(device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), tokenizer


def format_report(name: str, summary: dict[str, Any]) -> str:
    """One readable block: per letter, argmax share vs gold share and mean probability."""
    lines = [
        f"{name}: {summary['examples']} Finish examples, accuracy {summary['accuracy']:.1%}, "
        f"mean mass on the letters {summary['mean_letter_mass']:.3f}",
        "  letter  argmax  gold    mean p",
    ]
    for k in summary["argmax_share"]:
        a, g, p = summary["argmax_share"][k], summary["gold_share"][k], summary["mean_prob"][k]
        lines.append(f"  {k:6}  {a:6.1%}  {g:6.1%}  {p:.3f}")
    return "\n".join(lines)

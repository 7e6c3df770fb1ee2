"""The letter-bias diagnostic (lragent.train.letter_bias, `lragent train letter-bias`) on a fake model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lragent.train import data as fmt
from lragent.train import letter_bias as lb
from lragent.train.batching import encode_example
from lragent.train.cli import main
from lragent.train.examples import Example

R = fmt.RESPONSE


def tiny_tokenizer():
    """Byte-level, no merges: every letter is one token (as in SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


class BiasedModel:
    """Next-token logits that favour one letter whatever the prompt (the failure the diagnostic must expose)."""

    device = torch.device("cpu")

    def __init__(self, vocab: int, favoured: int, logit: float = 5.0) -> None:
        self.vocab, self.favoured, self.logit, self.seen = vocab, favoured, logit, []

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.seen.append(input_ids[0].tolist())
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.favoured] = self.logit
        return SimpleNamespace(logits=logits)


def finish_example(i: int, answer: str, options: str = "(A) red (B) green (C) blue (D) yellow") -> Example:
    head = fmt.head("scienceqa", f"Question {i}?\nOptions:{options}")
    return Example("action", head + f"Thought: {R}I know.\nAciton: Finish[{R}", answer)


def test_finish_examples_keep_only_letter_answers_at_finish():
    search = Example("action", finish_example(0, "A").input[: -len("Finish[" + R)] + "BingSearch[" + R, "sky")
    exs = [finish_example(1, "B"), finish_example(2, "blue"), search, finish_example(3, "C", "(A) x (B) y")]
    assert lb.finish_examples(exs) == [exs[0]]  # C is not an option of a two-option question


def test_letter_rows_expose_a_letter_prior():
    tok = tiny_tokenizer()
    ids = lb.letter_ids(tok, 4)
    model = BiasedModel(len(tok), ids["A"])
    exs = [finish_example(i, "ABCD"[i % 4]) for i in range(8)]
    rows = lb.letter_rows(model, tok, exs, max_len=256)
    assert model.seen[0] == list(encode_example(tok, exs[0], 256).ids[: encode_example(tok, exs[0], 256).n_prompt])
    expected_a = torch.softmax(torch.tensor([5.0] + [0.0] * (len(tok) - 1)), 0)[0].item()
    assert rows[0].probs["A"] == pytest.approx(expected_a) and rows[0].argmax == "A"
    summary = lb.summarize(rows)
    assert summary["argmax_share"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    assert summary["gold_share"] == {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}
    assert summary["accuracy"] == 0.25 and summary["max_argmax_share"] == 1.0
    assert 0 < summary["mean_letter_mass"] < 1
    assert "  A       100.0%   25.0%  0.367" in lb.format_report("x", summary)


def test_summary_of_an_unbiased_model():
    rows = [lb.LetterRow(g, {k: 0.9 if k == g else 0.03 for k in "ABC"}) for g in "ABCABC"]
    summary = lb.summarize(rows)
    assert summary["accuracy"] == 1.0 and summary["argmax_share"] == summary["gold_share"]
    assert summary["mean_prob"]["A"] == pytest.approx((0.9 * 2 + 0.03 * 4) / 6)
    assert lb.summarize([])["examples"] == 0


def test_split_settings_come_from_the_sets_train_log(tmp_path):
    assert lb.split_settings(tmp_path) == (0.1, 42, 2048)
    log = {"settings": {"heldout_fraction": 0.2, "seed": 7, "max_seq_len": 576}}
    (tmp_path / "train_log.json").write_text(json.dumps(log))
    assert lb.split_settings(tmp_path) == (0.2, 7, 576)


def test_letter_bias_subcommand_is_documented(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["letter-bias", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "argmax" in text and "gold" in text and "--split" in text and "train_log.json" in text

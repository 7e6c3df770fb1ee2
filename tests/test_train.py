"""lragent.train: prompt format, example derivation, truncation and the LoRA recipes on a tiny random Llama (CPU)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch

from lragent.train import data as fmt
from lragent.train import examples as E
from lragent.train.batching import IGNORE_INDEX, Encoded, attention_mask_4d, collate, encode_example, truncate_prompt
from lragent.train.checks import check_shared_a
from lragent.train.config import TrainConfig
from lragent.train.loop import EarlyStopping, train_adapters
from lragent.train.recipes import WEIGHTS_NAME, attach, train_set

DATA = E.default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "hotpotqa_action.json").is_file(), reason="trajectory data not present")


# ---- tiny model and tokenizer (no files, no downloads) ------------------------------------------------------------


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def toy_trajectory() -> E.Trajectory:
    steps = (
        fmt.Step("I should search.", "BingSearch[capital of France]", "Paris is the capital of France."),
        fmt.Step("Found it.", "Finish[Paris]", fmt.REFLECT_PROMPT_OBS),
        fmt.Step("My answer is correct.", "Reflect[right]", "Answer is CORRECT"),
    )
    return E.Trajectory("hotpotqa", "What is the capital of France?", steps)


def toy_examples(n: int = 4) -> dict[str, list[E.Example]]:
    traj = toy_trajectory()
    pools = {"plan": E.plan_examples(traj), "action": E.action_examples(traj), "reflect": E.reflect_examples(traj)}
    return {role: [pool[i % len(pool)] for i in range(n)] for role, pool in pools.items()}


def encode_all(tok, exs: dict[str, list[E.Example]], max_len: int) -> dict:
    return {role: [encode_example(tok, e, max_len) for e in items] for role, items in exs.items()}


# ---- prompt format ---------------------------------------------------------------------------------------------------


def test_prompt_builders_chain_into_the_history():
    traj = toy_trajectory()
    history = traj.head
    assert history == fmt.HOTPOTQA_SYSTEM_PROMPT + "\nQuestion:What is the capital of France?\n"
    s = traj.steps[0]
    assert fmt.plan_thought_prompt(history) == history + "Thought: \n### Response:\n"
    tool_prompt = fmt.plan_tool_prompt(history, s.thought)
    assert tool_prompt == history + "Thought: \n### Response:\nI should search.\n"
    act = fmt.action_prompt(history, s.thought, "BingSearch")
    assert act == tool_prompt + fmt.plan_tool_output("BingSearch") + fmt.RESPONSE
    assert act.endswith("I should search.\nAciton: BingSearch[\n### Response:\n")
    # the completed step continues the action prompt with the argument, "]" and the observation
    assert fmt.render_step(s) == act[len(history) :] + "capital of France]\nObversation: " + s.observation + "\n"
    reflect_step = fmt.render_step(traj.steps[2])
    assert (
        reflect_step
        == "Thought: \n### Response:\nMy answer is correct.\nAction: Reflect[right]\nObversation: Answer is CORRECT\n"
    )
    full = fmt.render_history("hotpotqa", traj.question, traj.steps)
    assert fmt.parse_history(full) == (traj.head, list(traj.steps))


def test_output_parsers_and_observation_format():
    assert fmt.parse_plan_tool_output("Aciton: Retrieve[") == "Retrieve"
    assert fmt.parse_plan_tool_output(" Aciton: Lookup") == "Lookup"
    assert fmt.parse_plan_tool_output("nothing") is None
    assert fmt.parse_action_output(" Milhouse]\nObversation") == "Milhouse"
    assert fmt.format_observation(" a\nb \n") == "a b"
    assert fmt.normalize_question("scienceqa", "Q?\nOptions: (A) x") == "Q?\nOptions:(A) x"
    assert fmt.parse_action("Finish[yes]") == ("Finish", "yes") and fmt.parse_action("None.") is None


def test_toy_examples_follow_the_roles():
    traj = toy_trajectory()
    plan = E.plan_examples(traj)  # the step after Finish is reflect's: only the two tool steps
    assert [e.output for e in plan] == ["I should search.", "Aciton: BingSearch[", "Found it.", "Aciton: Finish["]
    assert [e.output for e in E.action_examples(traj)] == ["capital of France", "Paris"]
    assert [e.output for e in E.reflect_examples(traj)] == ["My answer is correct.", "Reflect[right]"]


@needs_data
def test_hotpotqa_plan_examples_derived_from_full_trajectories():
    plan = E.load_role_examples("hotpotqa", "plan", DATA)
    assert 1300 <= len(plan) <= 1420
    kinds = Counter(e.kind for e in plan)
    assert kinds["thought"] == kinds["tool"] == len(plan) // 2
    tool_line = re.compile(r"^Aciton: (BingSearch|Retrieve|Lookup|Finish)\[$")
    for e in plan:
        assert e.input.startswith(fmt.HOTPOTQA_SYSTEM_PROMPT + "\nQuestion:")
        if e.kind == "tool":
            assert tool_line.match(e.output), e.output
            assert e.input.endswith("\n") and not e.input.endswith(fmt.RESPONSE)
        else:
            assert e.output and "\n" not in e.output
            assert e.input.endswith(fmt.THOUGHT_PROMPT)


@needs_data
def test_replay_reproduces_the_shipped_action_and_reflect_examples():
    """The format is the data's: replaying the full trajectories gives exactly the shipped action/reflect files."""
    trajs = E.task_trajectories("hotpotqa", DATA)
    for role, derive in (("action", E.action_examples), ("reflect", E.reflect_examples)):
        derived = Counter((e.input, e.output) for t in trajs for e in derive(t))
        shipped = Counter((e.input, e.output) for e in E.read_examples(DATA / E.FILES[("hotpotqa", role)], role))
        assert derived == shipped, role


# ---- tokenisation ----------------------------------------------------------------------------------------------------


def test_truncation_keeps_head_and_recent_tail():
    ids = list(range(100))
    assert truncate_prompt(ids, head_len=10, budget=80) == list(range(10)) + list(range(30, 100))
    assert truncate_prompt(ids, head_len=50, budget=80) == list(range(20, 100))  # no room after the head
    assert truncate_prompt(ids, head_len=10, budget=200) == ids


def test_encode_and_collate_supervise_only_the_output(tok):
    ex = E.plan_examples(toy_trajectory())[1]
    full = encode_example(tok, ex, max_len=4096)
    assert not full.truncated and full.ids[-1] == tok.eos_token_id
    assert tok.decode(list(full.ids[full.n_prompt : -1])) == ex.output
    short = encode_example(tok, ex, max_len=1000)  # the head alone is ~1100 bytes: plain left cut
    assert short.truncated and len(short.ids) == 1000 and short.ids[short.n_prompt :] == full.ids[full.n_prompt :]
    batch = collate([short, full], pad_id=tok.pad_token_id)  # left-padded: outputs end in the last column
    n_out, width = full.n_output, len(full.ids)
    assert batch.input_ids.shape == (2, width) and batch.n_keep == n_out
    assert batch.labels[1, width - n_out :].tolist() == list(full.ids[full.n_prompt :])
    assert (batch.labels[:, : width - n_out] == IGNORE_INDEX).all()
    assert batch.attention_mask[0].sum() == 1000 and batch.attention_mask[0, : width - 1000].sum() == 0
    assert batch.position_ids[0, -1] == 999 and batch.position_ids[1, -1] == width - 1


def test_left_padded_loss_matches_unpadded(tok):
    from lragent.train.loop import output_loss

    model = tiny_llama(len(tok)).eval()
    encoded = [encode_example(tok, e, 200) for e in toy_examples(3)["action"]]
    with torch.no_grad():
        joint = output_loss(model, collate(encoded, tok.pad_token_id))
        alone = [output_loss(model, collate([e], tok.pad_token_id)) * e.n_output for e in encoded]
    assert torch.allclose(joint, sum(alone) / sum(e.n_output for e in encoded), atol=1e-5)


def strict_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Plain softmax attention with -inf on masked scores: NaN on a fully masked query row, as fused CUDA kernels
    (bf16 SDPA) can give; torch's CPU SDPA returns 0 there, which hides the problem on CPU."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = query @ key.transpose(-2, -1) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ value


def test_attention_mask_has_no_empty_row_and_hides_padding():
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    m = attention_mask_4d(mask)[:, 0]
    assert m.shape == (2, 5, 5) and m.any(-1).all()  # every query row attends to something
    assert torch.equal(m[1], torch.ones(5, 5, dtype=torch.bool).tril())  # unpadded: plain causal
    assert torch.equal(m[0, :3], torch.eye(5, dtype=torch.bool)[:3])  # padding attends to itself only
    assert not m[0, 3:, :3].any() and m[0, 3:, 3:].equal(torch.ones(2, 2, dtype=torch.bool).tril())


@pytest.mark.parametrize("attention", ["sdpa", "strict", "eager"])
def test_heavily_left_padded_batch_gives_the_unpadded_per_example_loss(tok, attention, monkeypatch):
    """A short example padded by ~10x its length: finite, and the loss of each example equals its unpadded loss,
    also under an attention kernel that returns NaN for fully masked rows (the H200 bf16 NaN of the ScienceQA run)."""
    from lragent.train.loop import example_losses, output_loss

    model = tiny_llama(len(tok)).eval()
    if attention == "strict":
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", strict_sdpa)
    elif attention == "eager":
        model.config._attn_implementation = "eager"
    short = Encoded(tuple(range(5, 25)), 12, False)  # 12 prompt + 8 output tokens
    long = Encoded(tuple(range(30, 230)), 180, False)  # 200 tokens: the short one gets 180 padding positions
    with torch.no_grad():
        padded = example_losses(model, collate([short, long], tok.pad_token_id))
        alone = torch.cat([example_losses(model, collate([e], tok.pad_token_id)) for e in (short, long)])
        mean = output_loss(model, collate([short, long], tok.pad_token_id))
    assert torch.isfinite(padded).all() and torch.isfinite(alone).all()
    assert torch.allclose(padded, alone, atol=1e-5), (padded, alone)
    assert torch.allclose(mean, (alone[0] * 8 + alone[1] * 20) / 28, atol=1e-5)


def test_padded_batch_backward_is_finite_under_strict_attention(tok, monkeypatch):
    from lragent.train.loop import output_loss

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", strict_sdpa)
    model = tiny_llama(len(tok))
    batch = collate([Encoded(tuple(range(5, 15)), 6, False), Encoded(tuple(range(5, 105)), 90, False)], 0)
    output_loss(model, batch).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- training recipes on a tiny random Llama -------------------------------------------------------------------------


def _cfg(mode: str, **kw) -> TrainConfig:
    base = dict(mode=mode, max_steps=4, batch_size=2, max_seq_len=160, lr=5e-2, rank=4, alpha=8, dropout=0.0)
    return TrainConfig(**(base | kw))


def test_independent_training_decreases_loss_and_saves_peft_folders(tok, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    base = tiny_llama(len(tok))
    data = encode_all(tok, {"action": toy_examples(2)["action"]}, 160)
    results = train_set(base, data, _cfg("independent", max_steps=25), tmp_path, tok.pad_token_id, base_name="tiny")
    losses = results["action"].losses
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    folder = tmp_path / "action"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    saved = load_file(str(folder / WEIGHTS_NAME))
    assert all(v.dtype == torch.float16 for v in saved.values())
    model = PeftModel.from_pretrained(tiny_llama(len(tok)), str(folder))
    state = dict(model.named_parameters())
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(state[key.replace("lora_B.", "lora_B.default.")].half(), saved[key])
    assert saved[key].abs().sum() > 0  # B moved away from its zero init


def test_shared_a_keeps_plans_v_proj_a_bitwise(tok, tmp_path):
    base = tiny_llama(len(tok))
    data = encode_all(tok, toy_examples(), 160)
    train_set(base, data, _cfg("shared-a"), tmp_path / "sa", tok.pad_token_id)
    check = check_shared_a(tmp_path / "sa", "v_proj")
    assert check.identical and check.layers == 2 and check.roles == ("plan", "action", "reflect")
    assert not check_shared_a(tmp_path / "sa", "q_proj").identical  # only v_proj is shared
    train_set(base, {"plan": data["plan"]}, _cfg("independent"), tmp_path / "ind", tok.pad_token_id)
    train_set(base, {"action": data["action"]}, _cfg("shared-a"), tmp_path / "reuse", tok.pad_token_id,
              plan_from=tmp_path / "ind" / "plan")  # fmt: skip
    assert check_shared_a(tmp_path / "reuse").identical
    assert not any("lora" in n for n, _ in base.named_modules())  # adapters removed from the base afterwards


def test_joint_training_ties_one_a_for_all_roles(tok, tmp_path):
    base = tiny_llama(len(tok))
    results = train_set(base, encode_all(tok, toy_examples(), 160), _cfg("joint"), tmp_path, tok.pad_token_id)
    assert set(results) == {"plan", "action", "reflect"}
    assert all(len(r.losses) == 4 and all(math.isfinite(x) for x in r.losses) for r in results.values())
    check = check_shared_a(tmp_path)
    assert check.identical and check.layers == 2


class Poison:
    """Forward hook on the LM head: makes the logits (``where="loss"``) or only their gradient (``where="grad"``)
    NaN on the chosen forward calls (counted from 0)."""

    def __init__(self, calls, where="loss"):
        self.calls, self.where, self.n = set(calls), where, 0

    def __call__(self, module, args, output):
        hit, self.n = self.n in self.calls, self.n + 1
        if not hit:
            return None
        if self.where == "loss":
            return output * float("nan")
        output.register_hook(lambda g: g * float("nan"))
        return output


def _lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_guard_skips_a_poisoned_step(tok, where):
    from lragent.train.loop import train_adapters
    from lragent.train.recipes import attach, nonfinite_tensors

    base = tiny_llama(len(tok))
    base.lm_head.register_forward_hook(Poison({2}, where))
    cfg = _cfg("independent", max_steps=6, max_skipped_ratio=0.2)
    model = attach(base, ["action"], cfg, "tiny")
    res = train_adapters(model, encode_all(tok, {"action": toy_examples(4)["action"]}, 160), cfg, tok.pad_token_id)
    result = res["action"]
    assert result.skipped == [2] and len(result.losses) == 6
    assert math.isfinite(result.losses[2]) == (where == "grad")  # a NaN gradient with a finite loss is caught too
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    summary = result.summary()
    assert (
        summary["skipped_steps"] == 1 and math.isfinite(summary["loss_first"]) and math.isfinite(summary["loss_last"])
    )
    assert not nonfinite_tensors(_lora_weights(model))


def test_guard_makes_no_update_on_poisoned_steps_and_fails_when_all_are(tok, tmp_path):
    from lragent.train.loop import TrainingFailed, train_adapters
    from lragent.train.recipes import attach

    base = tiny_llama(len(tok))
    base.lm_head.register_forward_hook(Poison(range(100)))
    data = encode_all(tok, {"action": toy_examples(2)["action"]}, 160)
    model = attach(base, ["action"], _cfg("independent", max_skipped_ratio=1.0), "tiny")
    before = _lora_weights(model)
    res = train_adapters(model, data, _cfg("independent", max_skipped_ratio=1.0), tok.pad_token_id)
    assert res["action"].skipped == [0, 1, 2, 3]
    after = _lora_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer update at all
    model.unload()
    with pytest.raises(TrainingFailed, match="4 of 4"):  # default max_skipped_ratio: the run fails loudly
        train_set(base, data, _cfg("independent"), tmp_path / "set", tok.pad_token_id)
    assert not (tmp_path / "set" / "action").exists()


def test_nonfinite_weights_are_never_saved_nor_shared(tok, tmp_path):
    from safetensors.torch import load_file, save_file

    from lragent.train.loop import TrainingFailed
    from lragent.train.recipes import attach, load_frozen_a, save_adapter

    cfg = _cfg("independent")
    model = attach(tiny_llama(len(tok)), ["plan"], cfg, "tiny")
    save_adapter(model, "plan", tmp_path / "good", "float16")
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["plan"].weight[0, 0] = 1e6  # float16: inf
    with pytest.raises(TrainingFailed, match="not finite"):
        save_adapter(model, "plan", tmp_path / "overflow", "float16")
    assert not (tmp_path / "overflow").exists()
    weights = load_file(str(tmp_path / "good" / WEIGHTS_NAME))
    key = next(k for k in weights if "v_proj.lora_A" in k)
    weights[key][0, 0] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(weights, str(tmp_path / "nan" / WEIGHTS_NAME))
    other = attach(tiny_llama(len(tok)), ["action"], _cfg("shared-a"), "tiny")
    with pytest.raises(TrainingFailed, match="shared A source"):
        load_frozen_a(other, "action", tmp_path / "nan", ("v_proj",))
    assert load_frozen_a(other, "action", tmp_path / "good", ("v_proj",)) == 2


def test_cli_trains_a_set_from_a_model_folder(tok, tmp_path, monkeypatch):
    from lragent.train import cli

    model_dir = tmp_path / "tiny"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setattr(cli, "load_role_examples", lambda task, role, data_dir=None: toy_examples()[role])
    out = tmp_path / "set"
    argv = ["--model", str(model_dir), "--out", str(out), "--mode", "shared-a", "--max-steps", "2", "--batch-size", "2",
            "--max-seq-len", "128", "--rank", "4", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert set(log["roles"]) == {"plan", "action", "reflect"} and log["settings"]["mode"] == "shared-a"
    assert all(len(r["losses"]) == 2 and r["time_s"] >= 0 for r in log["roles"].values())
    assert all(r["skipped_steps"] == 0 and r["skipped"] == [] for r in log["roles"].values())
    assert (out / "loss_curve.png").stat().st_size > 0
    assert cli.main(["check", str(out)]) == 0


# ---- the shipped adapter sets ----------------------------------------------------------------------------------------


def test_shipped_sets_are_peft_folders_with_a_shared_v_proj_a():
    from lragent.adapters import ADAPTERS_DIR, adapter_set, manifest

    index = manifest()
    assert {"hotpotqa-independent", "hotpotqa-shared-a"} <= set(index)
    for name, entry in index.items():
        folders = adapter_set(name)
        assert list(folders) == ["plan", "action", "reflect"] and entry["roles"] == list(folders)
        for folder in folders.values():
            config = json.loads((folder / "adapter_config.json").read_text())
            assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
                8,
                16,
                ["q_proj", "v_proj"],
            )
            assert (folder / WEIGHTS_NAME).stat().st_size < 2_000_000
        shared = check_shared_a(ADAPTERS_DIR / name, "v_proj")
        assert shared.layers == 30 and shared.identical == (entry["mode"] == "shared-a")


# ---- held-out split and early stopping -------------------------------------------------------------------------------


def test_heldout_split_is_by_question_and_the_same_for_every_role():
    other = E.Trajectory("hotpotqa", "What is the capital of Italy?", toy_trajectory().steps)
    trajs = [toy_trajectory(), other] + [
        E.Trajectory("hotpotqa", f"Question number {i}?", toy_trajectory().steps) for i in range(40)
    ]
    for role_examples in (E.plan_examples, E.action_examples, E.reflect_examples):
        examples = [ex for t in trajs for ex in role_examples(t)]
        train, heldout = E.split_heldout(examples, 0.25, seed=1)
        assert len(train) + len(heldout) == len(examples) and train and heldout
        held_q = {E.question_of(e.input) for e in heldout}
        assert held_q.isdisjoint(E.question_of(e.input) for e in train)  # no question on both sides
        assert held_q == {t.head for t in trajs if E.is_heldout(t.head, 0.25, seed=1)}  # same questions per role
    assert E.split_heldout(examples, 0.0) == (examples, [])
    with pytest.raises(ValueError):
        E.split_heldout(examples, 1.0)


def test_early_stopping_bookkeeping():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert stop.update(10, 3.0) == (True, False)
    assert stop.update(20, 2.95) == (False, False)  # better, but by less than min_delta
    assert stop.update(30, 2.5) == (True, False)
    assert stop.update(40, float("nan")) == (False, False)
    assert stop.update(50, 2.6) == (False, True)
    assert (stop.best, stop.best_step) == (2.5, 30)
    assert EarlyStopping(patience=0).update(1, 5.0) == (True, False)
    never = EarlyStopping(patience=0)
    never.update(1, 1.0)
    assert never.update(2, 9.0) == (False, False)  # patience 0: measured, never stops


def test_heldout_loss_is_measured_and_the_best_checkpoint_is_kept(tok, tmp_path):
    from lragent.train.loop import heldout_loss

    base = tiny_llama(len(tok))
    examples = toy_examples(4)["action"]
    data = encode_all(tok, {"action": examples}, 160)
    cfg = _cfg("independent", max_steps=12, eval_every=3, patience=0)
    model = attach(base, ["action"], cfg, "tiny")
    results = train_adapters(model, data, cfg, tok.pad_token_id, heldout=data)
    res = results["action"]
    assert res.eval_steps == [3, 6, 9, 12] and len(res.eval_losses) == 4 and res.heldout == 4
    best = min(range(4), key=res.eval_losses.__getitem__)
    assert res.best_step == res.eval_steps[best] and not res.stopped_early and res.steps == 12
    # the weights left in the model are the best measurement's: measuring again gives its loss
    assert heldout_loss(model, data["action"], cfg, tok.pad_token_id) == pytest.approx(res.eval_losses[best], rel=1e-5)
    summary = res.summary()
    assert summary["eval_loss_best"] == round(res.eval_losses[best], 4) and summary["best_step"] == res.best_step


def test_early_stopping_stops_and_restores_the_best_weights(tok):
    from lragent.train.loop import heldout_loss

    base = tiny_llama(len(tok))
    data = encode_all(tok, {"plan": toy_examples(4)["plan"]}, 160)
    heldout = encode_all(tok, {"plan": toy_examples(2)["reflect"]}, 160)  # other outputs: a real held-out set
    cfg = _cfg("independent", max_steps=40, eval_every=2, patience=2, min_delta=1e9)  # nothing improves after 1st
    model = attach(base, ["plan"], cfg, "tiny")
    first = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res = train_adapters(model, data, cfg, tok.pad_token_id, heldout=heldout)["plan"]
    assert res.stopped_early and res.steps == 6 and res.eval_steps == [2, 4, 6] and res.best_step == 2
    assert len(res.losses) == 6  # no step after the stop
    assert heldout_loss(model, heldout["plan"], cfg, tok.pad_token_id) == pytest.approx(res.eval_losses[0], rel=1e-5)
    moved = any(not torch.equal(first[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert moved  # the kept weights are step 2's, not the initial ones


def test_cli_holds_out_questions_and_logs_the_heldout_curve(tok, tmp_path, monkeypatch):
    from lragent.train import cli

    model_dir = tmp_path / "tiny"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    trajs = [E.Trajectory("hotpotqa", f"Question {i}?", toy_trajectory().steps) for i in range(12)]
    pools = {"plan": E.plan_examples, "action": E.action_examples, "reflect": E.reflect_examples}
    fake = lambda task, role, data_dir=None: [ex for t in trajs for ex in pools[role](t)]  # noqa: E731
    monkeypatch.setattr(cli, "load_role_examples", fake)
    out = tmp_path / "set"
    argv = ["--model", str(model_dir), "--out", str(out), "--roles", "action", "--max-steps", "4", "--batch-size",
            "2", "--max-seq-len", "128", "--rank", "4", "--device", "cpu", "--heldout-fraction", "0.3",
            "--eval-every", "2", "--seed", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    entry = json.loads((out / "train_log.json").read_text())["roles"]["action"]
    n_held = sum(E.is_heldout(t.head, 0.3, seed=3) for t in trajs)
    assert 0 < n_held < 12
    per = len(E.action_examples(toy_trajectory()))
    assert entry["heldout_examples"] == per * n_held and entry["examples"] == per * (12 - n_held)
    assert entry["eval_steps"] == [2, 4] and len(entry["eval_losses"]) == 2 and entry["best_step"] in (2, 4)


def test_role_runs_of_one_set_gather_into_one_log(tmp_path):
    """One process per role writes into the same set folder: the log keeps every role; another set replaces it."""
    from lragent.train.report import LOG_NAME, write_log

    def log(task: str, mode: str, roles: dict[str, float], total: float) -> dict:
        entries = {r: {"loss_last": v} for r, v in roles.items()}
        return {"task": task, "settings": {"mode": mode}, "roles": entries, "total_time_s": total}

    write_log(log("hotpotqa", "independent", {"reflect": 1.0}, 30.0), tmp_path)
    write_log(log("hotpotqa", "independent", {"plan": 2.0}, 20.0), tmp_path)
    merged = write_log(log("hotpotqa", "independent", {"action": 3.0, "reflect": 0.5}, 25.0), tmp_path)
    assert list(merged["roles"]) == ["plan", "action", "reflect"]  # role order, whatever order they finished in
    assert merged["roles"]["reflect"] == {"loss_last": 0.5}  # a role run again replaces its own entry
    assert merged["total_time_s"] == 30.0  # side by side: the longest run
    assert json.loads((tmp_path / LOG_NAME).read_text()) == merged
    other = write_log(log("hotpotqa", "shared-a", {"action": 4.0}, 5.0), tmp_path)
    assert list(other["roles"]) == ["action"]


def test_adopting_the_plan_copies_once_and_replaces_a_stale_one(tmp_path):
    from lragent.train.recipes import adopt_plan

    plan = tmp_path / "ind" / "plan"
    plan.mkdir(parents=True)
    (plan / WEIGHTS_NAME).write_bytes(b"new weights")
    (plan / "adapter_config.json").write_text("{}")
    dest = tmp_path / "sa" / "plan"
    dest.mkdir(parents=True)
    (dest / WEIGHTS_NAME).write_bytes(b"stale weights from an earlier run")
    adopt_plan(plan, tmp_path / "sa")
    assert (dest / WEIGHTS_NAME).read_bytes() == b"new weights"
    before = (dest / WEIGHTS_NAME).stat().st_mtime_ns
    adopt_plan(plan, tmp_path / "sa")  # a second role run of the set: equal copy, left alone
    assert (dest / WEIGHTS_NAME).stat().st_mtime_ns == before


def test_time_limit_stops_after_a_measured_step(tok):
    base = tiny_llama(len(tok))
    data = encode_all(tok, {"plan": toy_examples(4)["plan"]}, 160)
    heldout = encode_all(tok, {"plan": toy_examples(2)["reflect"]}, 160)
    cfg = _cfg("independent", max_steps=40, eval_every=10, max_time_s=0.0)  # out of time after the first step
    model = attach(base, ["plan"], cfg, "tiny")
    res = train_adapters(model, data, cfg, tok.pad_token_id, heldout=heldout)["plan"]
    assert res.stopped_early and res.steps == 1 and res.eval_steps == [1] and res.best_step == 1

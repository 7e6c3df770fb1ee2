"""``lragent train``: train role adapter sets, check them, sample from them.

lragent train --task hotpotqa --mode independent --out DIR [options]    train a set (plan, action, reflect)
lragent train check DIR [--module v_proj]                              shared-A bit equality across roles
lragent train sample DIR [--task hotpotqa]                             greedy outputs on training prompts
lragent train plot DIR                                                 redraw loss_curve.png from train_log.json
lragent train letter-bias DIR [--split heldout] [--limit 40]           action's letter prior at Finish answers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lragent.train import data as fmt
from lragent.train.augment import split_and_augment
from lragent.train.batching import encode_example
from lragent.train.config import MODES, SAVE_DTYPES, TrainConfig
from lragent.train.examples import Example, default_data_dir, load_role_examples
from lragent.train.loop import resolve_device
from lragent.train.report import LOG_NAME, PLOT_NAME, build_log, plot_losses, write_log, write_manifest

HF_NAMES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lragent train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--task", choices=fmt.TASKS, default="hotpotqa")
    p.add_argument("--roles", type=_csv, default=fmt.ROLES, help="comma list (default plan,action,reflect)")
    p.add_argument("--mode", choices=MODES, default="independent")
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF folder or .gguf")
    p.add_argument("--base-name", default=None, help="base model name written in adapter_config.json")
    p.add_argument("--out", type=Path, required=True, help="set folder: <out>/<role>/adapter_model.safetensors")
    p.add_argument("--data-dir", type=Path, default=None, help=f"trajectory folder (default {default_data_dir()})")
    p.add_argument("--plan-from", type=Path, default=None, help="shared-a: reuse this trained plan adapter folder")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", type=_csv, default=("q_proj", "v_proj"))
    p.add_argument("--shared-modules", type=_csv, default=("v_proj",), help="modules whose lora_A is shared")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument(
        "--max-skipped-ratio",
        type=float,
        default=0.1,
        help="steps with a non-finite loss/gradient make no update; fail if more than this share do",
    )
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps per role (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float16")
    p.add_argument("--max-examples", type=int, default=None, help="first N examples per role (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.0,
        help="share of the questions held out (all their examples, every role) to measure a held-out loss; the "
        "best measured checkpoint is saved (0: none)",
    )
    p.add_argument("--eval-every", type=int, default=25, help="optimizer steps between held-out measurements")
    p.add_argument(
        "--patience", type=int, default=0, help="stop after this many measurements without improvement (0: never)"
    )
    p.add_argument("--min-delta", type=float, default=0.0, help="smallest held-out improvement that counts")
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        metavar="S",
        help="stop a role's training after S seconds (held-out loss measured then, best checkpoint kept)",
    )
    p.add_argument(
        "--option-permutations",
        type=int,
        default=None,
        metavar="K",
        help="add K copies of each training example with the question's options reordered and every option letter "
        "remapped (balances the answer letters; held-out split untouched; default 3 for scienceqa, 0 otherwise)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        mode=args.mode,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        shared_modules=args.shared_modules,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_skipped_ratio=args.max_skipped_ratio,
        max_steps=args.max_steps or None,
        epochs=args.epochs,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        save_dtype=args.save_dtype,
        max_examples=args.max_examples,
        heldout_fraction=args.heldout_fraction,
        eval_every=args.eval_every,
        patience=args.patience,
        min_delta=args.min_delta,
        max_time_s=args.max_time,
        option_permutations=option_permutations_for(args.task, args.option_permutations),
    )


def option_permutations_for(task: str, requested: int | None) -> int:
    """The recipes' per-task default (imported lazily: recipes needs peft) unless the command line gave K."""
    from lragent.train.recipes import option_permutations_for as resolve

    return resolve(task, requested)


def training_split(
    task: str, role: str, data_dir: Path | None, cfg: TrainConfig
) -> tuple[list[Example], list[Example]]:
    """``(train, held-out)`` examples of one role: split by question first, then only the training part gets the
    option-permuted copies, so no copy of a held-out question is trained on and the held-out loss stays comparable."""
    train, heldout, stats = split_and_augment(
        load_role_examples(task, role, data_dir), cfg.heldout_fraction, cfg.seed, cfg.option_permutations
    )
    if cfg.option_permutations:
        print(f"{role}: option permutations x{cfg.option_permutations}: {stats.summary()}")
    return train, heldout


def load_base(model: str, device: torch.device):
    """(model folder, tokenizer, model on device in fp32) for a model argument. The tokenizer's EOS is checked
    against the model config's: every output is trained to end with it, so it must be the id inference stops at."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lragent.models.hub import resolve_model

    folder = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    eos = base.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        print(
            f"warning: tokenizer EOS {tokenizer.eos_token!r} ({tokenizer.eos_token_id}) != config EOS {eos}; "
            f"using {eos}"
        )
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return folder, tokenizer, base.to(device)


def run_train(args: argparse.Namespace) -> int:
    from lragent.train.recipes import train_set

    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    _, tokenizer, base = load_base(args.model, device)
    roles = [r for r in args.roles if not (cfg.mode == "shared-a" and args.plan_from and r == "plan")]
    split = {r: training_split(args.task, r, args.data_dir, cfg) for r in roles}
    encoded = {
        r: [encode_example(tokenizer, e, cfg.max_seq_len) for e in tr[: cfg.max_examples]]
        for r, (tr, _) in split.items()
    }
    heldout = {r: [encode_example(tokenizer, e, cfg.max_seq_len) for e in ho] for r, (_, ho) in split.items() if ho}
    print(f"EOS appended to every output: {tokenizer.eos_token!r} (id {tokenizer.eos_token_id})")
    for role, enc in encoded.items():
        print(f"{role}: {len(enc)} examples ({len(heldout.get(role, []))} held out), "
              f"{sum(e.truncated for e in enc)} truncated to {cfg.max_seq_len} tokens")  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base_name = args.base_name or HF_NAMES.get(args.model.lower(), args.model)
    results = train_set(
        base, encoded, cfg, args.out, pad_id, base_name=base_name, plan_from=args.plan_from, heldout=heldout
    )
    notes = {"eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}
    if args.plan_from:  # recorded relative to the set's parent folder when it lies there
        notes["plan_from"] = os.path.relpath(args.plan_from, args.out.parent)
    log = build_log(cfg, results, task=args.task, model=base_name, device=device,
                    total_s=time.perf_counter() - start, notes=notes)  # fmt: skip
    merged = write_log(log, args.out)
    plot_losses(merged, args.out / PLOT_NAME)
    for role, entry in log["roles"].items():
        skipped = f", {entry['skipped_steps']} steps skipped (non-finite)" if entry["skipped_steps"] else ""
        best = (
            f", best held-out {entry['eval_loss_best']:.3f} at step {entry['best_step']}" if entry["best_step"] else ""
        )
        print(
            f"{role}: loss {entry['loss_first']:.3f} -> {entry['loss_last']:.3f}, "
            f"{entry['time_s']:.1f} s{skipped}{best}"
        )
    return 0


def run_check(argv: list[str]) -> int:
    from lragent.train.checks import check_shared_a

    p = argparse.ArgumentParser(prog="lragent train check")
    p.add_argument("set_dir", type=Path)
    p.add_argument("--module", default="v_proj")
    args = p.parse_args(argv)
    result = check_shared_a(args.set_dir, args.module)
    print(json.dumps(result.__dict__))
    return 0 if result.identical else 1


def sample_examples(task: str, data_dir: Path | None, index: int) -> dict[str, tuple[str, Example]]:
    """One training example per role call kind: label -> (role, example)."""
    plan = load_role_examples(task, "plan", data_dir)
    reflect = load_role_examples(task, "reflect", data_dir)
    verdicts = [e for e in reflect if e.output.startswith("Reflect[")]
    thoughts = [e for e in reflect if not e.output.startswith("Reflect[")]
    return {
        "plan_thought": ("plan", [e for e in plan if e.kind == "thought"][index]),
        "plan_tool": ("plan", [e for e in plan if e.kind == "tool"][index]),
        "action": ("action", load_role_examples(task, "action", data_dir)[index]),
        "reflect_thought": ("reflect", thoughts[index]),
        "reflect_verdict": ("reflect", verdicts[index]),
    }


def run_sample(argv: list[str]) -> int:
    from lragent.models.hub import resolve_model
    from lragent.train.checks import greedy_samples

    p = argparse.ArgumentParser(prog="lragent train sample")
    p.add_argument("set_dir", type=Path)
    p.add_argument("--task", choices=fmt.TASKS, default="hotpotqa")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    chosen = sample_examples(args.task, args.data_dir, args.index)
    prompts = {label: (args.set_dir / role, ex.input) for label, (role, ex) in chosen.items()}
    outputs = greedy_samples(resolve_model(args.model), prompts, args.max_new_tokens)
    rows = [
        {"call": k, "role": chosen[k][0], "expected": chosen[k][1].output, "generated": v} for k, v in outputs.items()
    ]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    return 0


def run_plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lragent train plot")
    p.add_argument("set_dir", type=Path)
    args = p.parse_args(argv)
    log = json.loads((args.set_dir / LOG_NAME).read_text())
    return 0 if plot_losses(log, args.set_dir / PLOT_NAME) else 1


def run_letter_bias(argv: list[str]) -> int:
    from lragent.models.hub import resolve_model
    from lragent.train import letter_bias as lb

    p = argparse.ArgumentParser(
        prog="lragent train letter-bias",
        description="For a ScienceQA adapter set: the action adapter's next-token probability of each option letter "
        "right after 'Finish[\\n### Response:\\n', teacher-forced over the action Finish examples of the training "
        "data, split by question as the set was trained (held-out fraction, seed and max_seq_len read from its "
        "train_log.json). Prints, per letter, the share of examples where it is the argmax vs its share as the "
        "gold answer (a letter bias shows as argmax share >> gold share), the accuracy and the mean probabilities.",
    )
    p.add_argument("set_dir", type=Path, help="adapter set folder (its <role>/ adapter is used)")
    p.add_argument("--task", choices=fmt.TASKS, default="scienceqa")
    p.add_argument("--role", default="action", help="adapter folder to load (default action)")
    p.add_argument("--split", choices=lb.SPLITS, nargs="+", default=["heldout", "train"], help="sides to measure")
    p.add_argument("--limit", type=int, default=40, help="at most this many Finish examples per side")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the summaries and per-example rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fraction, seed, max_len = lb.split_settings(args.set_dir)
    model, tokenizer = lb.load_adapter_model(resolve_model(args.model), args.set_dir / args.role)
    result: dict[str, dict[str, Any]] = {}
    for split in args.split:
        examples = lb.select_examples(args.task, split, fraction, seed, args.limit, args.data_dir)
        rows = lb.letter_rows(model, tokenizer, examples, max_len)
        result[split] = {"summary": lb.summarize(rows), "rows": [r.__dict__ for r in rows]}
        print(lb.format_report(f"{args.set_dir.name}/{args.role} {split}", result[split]["summary"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def run_manifest(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lragent train manifest")
    p.add_argument("root", type=Path, help="folder of adapter sets")
    print(write_manifest(p.parse_args(argv).root))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "check": run_check,
        "sample": run_sample,
        "plot": run_plot,
        "manifest": run_manifest,
        "letter-bias": run_letter_bias,
    }
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return run_train(train_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The optimisation loop: one or several LoRA adapters of one PEFT model, one optimizer.

With several adapters (joint training) every optimizer step takes one batch per adapter, each forwarded with that
adapter active; parameters shared between adapters (a tied lora_A) collect the gradients of all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lragent.train.batching import IGNORE_INDEX, Batch, Encoded, batches, collate
from lragent.train.config import TrainConfig


@dataclass
class RoleResult:
    """What one adapter's training did; ``losses[i]`` is the mean output-token loss of optimizer step i."""

    role: str
    examples: int
    truncated: int
    steps: int = 0
    time_s: float = 0.0
    tokens: int = 0  # prompt + output tokens forwarded (no padding)
    output_tokens: int = 0  # supervised tokens
    losses: list[float] = field(default_factory=list)

    def summary(self, window: int = 10) -> dict[str, float | int | str]:
        head, tail = self.losses[:window], self.losses[-window:]
        return {
            "role": self.role,
            "examples": self.examples,
            "truncated_examples": self.truncated,
            "steps": self.steps,
            "time_s": round(self.time_s, 2),
            "tokens": self.tokens,
            "output_tokens": self.output_tokens,
            "loss_first": round(sum(head) / max(1, len(head)), 4),
            "loss_last": round(sum(tail) / max(1, len(tail)), 4),
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def warmup_cosine(total: int, warmup_ratio: float):
    """LR multiplier: linear warmup over ``warmup_ratio`` of the steps, then cosine decay to zero."""
    warmup = max(1, int(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def output_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's output tokens; logits only for the last ``n_keep + 1`` positions."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.n_keep + 1,
    ).logits
    predicted = logits[:, :-1].float()  # position t predicts token t+1
    target = batch.labels[:, -batch.n_keep :]
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def _activate(model: torch.nn.Module, role: str, params: Sequence[torch.nn.Parameter]) -> None:
    """Make ``role`` the active adapter; PEFT's set_adapter rewrites requires_grad, so restore ours."""
    if len(model.peft_config) > 1:
        model.set_adapter(role)
        for p in params:
            p.requires_grad_(True)


def train_adapters(
    model: torch.nn.Module,
    data: dict[str, list[Encoded]],
    cfg: TrainConfig,
    pad_id: int,
    desc: str = "train",
) -> dict[str, RoleResult]:
    """Train the adapters named by ``data``'s keys (already attached to the PEFT ``model``, with requires_grad set
    on exactly the parameters to train) and return per-adapter results. The model stays on its device."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    total = cfg.total_steps(max(len(v) for v in data.values()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup_ratio))
    results = {r: RoleResult(r, len(enc), sum(e.truncated for e in enc)) for r, enc in data.items()}
    samplers = {r: batches(len(enc), cfg.batch_size, cfg.seed + i) for i, (r, enc) in enumerate(data.items())}
    pending: dict[str, list[torch.Tensor]] = {r: [] for r in data}  # per-step loss tensors, read at log time
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(total), desc=desc, dynamic_ncols=True)
    for step in bar:
        for role, encoded in data.items():
            _activate(model, role, params)
            micro = []
            for _ in range(cfg.grad_accum):
                batch = [encoded[i] for i in next(samplers[role])]
                with _autocast(device, cfg.precision):
                    loss = output_loss(model, collate(batch, pad_id).to(device))
                (loss / cfg.grad_accum).backward()
                micro.append(loss.detach().float())
                results[role].tokens += sum(len(e.ids) for e in batch)
                results[role].output_tokens += sum(e.n_output for e in batch)
            pending[role].append(torch.stack(micro).mean())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0 or step + 1 == total:
            _flush(pending, results)
            bar.set_postfix({r: f"{res.losses[-1]:.3f}" for r, res in results.items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    for res in results.values():
        res.steps, res.time_s = total, elapsed
    return results


def _flush(pending: dict[str, list[torch.Tensor]], results: dict[str, RoleResult]) -> None:
    """Copy the accumulated per-step losses to the host (one sync per log interval)."""
    for role, items in pending.items():
        if items:
            results[role].losses.extend(torch.stack(items).cpu().tolist())
            items.clear()

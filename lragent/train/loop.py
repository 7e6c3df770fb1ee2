"""The optimisation loop: one or several LoRA adapters of one PEFT model, one optimizer.

With several adapters (joint training) every optimizer step takes one batch per adapter, each forwarded with that
adapter active; parameters shared between adapters (a tied lora_A) collect the gradients of all of them.

Guard: a step whose loss or gradient norm is not finite makes no optimizer update (its gradients are dropped, the LR
schedule still advances) and is recorded in :attr:`RoleResult.skipped`; more than ``cfg.max_skipped_ratio`` of the
steps skipped for one adapter raises :class:`TrainingFailed` (something systematic, not one bad batch).

Held-out loss and early stopping: given held-out examples (questions never trained on), the mean output-token loss on
them is measured every ``cfg.eval_every`` steps (and after the last). The trainable weights of the best measurement
are kept in memory and restored at the end, so what is saved is the best checkpoint, not the last; with
``cfg.patience`` > 0 training also stops after that many measurements without an improvement of ``cfg.min_delta``.
``cfg.max_time_s`` bounds a run's time (a GPU call of fixed length): the last step measures, the best weights stay.
With several adapters (joint) the criterion is the mean of their held-out losses.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lragent.train.batching import IGNORE_INDEX, Batch, Encoded, attention_mask_4d, batches, collate
from lragent.train.config import TrainConfig


class TrainingFailed(RuntimeError):
    """Training produced no usable adapter (too many non-finite steps, or non-finite weights)."""


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
    losses: list[float] = field(default_factory=list)  # non-finite on skipped steps
    skipped: list[int] = field(default_factory=list)  # optimizer steps skipped (non-finite loss or gradient)
    heldout: int = 0  # held-out examples (0: no held-out loss measured)
    eval_steps: list[int] = field(default_factory=list)  # steps (1-based: after that many updates) measured
    eval_losses: list[float] = field(default_factory=list)  # held-out mean output-token loss at eval_steps
    best_step: int | None = None  # the measured step whose weights were kept (None: the last step's)
    stopped_early: bool = False

    def summary(self, window: int = 10) -> dict[str, float | int | str]:
        """First/last loss: means over the first/last ``window`` steps that made an update."""
        skipped = set(self.skipped)
        kept = [x for i, x in enumerate(self.losses) if i not in skipped and math.isfinite(x)]
        head, tail = kept[:window], kept[-window:]
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
            "skipped_steps": len(self.skipped),
            "heldout_examples": self.heldout,
            "eval_loss_best": round(min(self.eval_losses), 4) if self.eval_losses else None,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
        }


@dataclass
class EarlyStopping:
    """Plain bookkeeping of the best held-out loss: ``update`` says whether a measurement improved on the best by
    more than ``min_delta`` and whether ``patience`` measurements in a row have not (0: never stop)."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    bad: int = 0

    def update(self, step: int, value: float) -> tuple[bool, bool]:
        """``(improved, stop)`` after the measurement ``value`` at ``step``; a non-finite value never improves."""
        improved = math.isfinite(value) and value < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return improved, self.patience > 0 and self.bad >= self.patience


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


def attention_inputs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The attention mask to pass for ``batch``: the 4D mask of :func:`attention_mask_4d` (no fully masked row) for
    the sdpa and eager implementations (bool, or additive for eager), the 2D padding mask for the others (flash
    attention unpads, so it has no padding rows)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return attention_mask_4d(batch.attention_mask)
    if impl == "eager":
        allowed = attention_mask_4d(batch.attention_mask)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return batch.attention_mask


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every supervised position [B, n_keep] (0 elsewhere) and the mask of supervised positions;
    the LM head runs on the last ``n_keep + 1`` positions only."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=attention_inputs(model, batch),
        position_ids=batch.position_ids,
        logits_to_keep=batch.n_keep + 1,
        use_cache=False,
    ).logits
    predicted = logits[:, :-1].float()  # position t predicts token t+1
    target = batch.labels[:, -batch.n_keep :]
    losses = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    return losses, target != IGNORE_INDEX


def output_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's output tokens (0, not NaN, for a batch without any)."""
    losses, valid = token_losses(model, batch)
    return losses.sum() / valid.sum().clamp(min=1)


def example_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean output-token cross-entropy of each example of the batch [B]."""
    losses, valid = token_losses(model, batch)
    return losses.sum(-1) / valid.sum(-1).clamp(min=1)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, encoded: Sequence[Encoded], cfg: TrainConfig, pad_id: int) -> float:
    """Mean output-token cross-entropy over all ``encoded`` examples (token-weighted, in eval mode: no dropout)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    for start in range(0, len(encoded), cfg.batch_size):
        chunk = list(encoded[start : start + cfg.batch_size])
        with _autocast(device, cfg.precision):
            losses, valid = token_losses(model, collate(chunk, pad_id).to(device))
        total += losses.float().sum()
        count += sum(e.n_output for e in chunk)
    model.train(was_training)
    return float(total) / max(count, 1)  # one host sync per measurement


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
    heldout: dict[str, list[Encoded]] | None = None,
) -> dict[str, RoleResult]:
    """Train the adapters named by ``data``'s keys (already attached to the PEFT ``model``, with requires_grad set
    on exactly the parameters to train) and return per-adapter results. The model stays on its device.
    ``heldout`` (per adapter, optional) turns on the held-out loss, best-checkpoint restore and early stopping."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    total = cfg.total_steps(max(len(v) for v in data.values()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup_ratio))
    results = {r: RoleResult(r, len(enc), sum(e.truncated for e in enc)) for r, enc in data.items()}
    samplers = {r: batches(len(enc), cfg.batch_size, cfg.seed + i) for i, (r, enc) in enumerate(data.items())}
    model.train()
    start = time.perf_counter()
    heldout = {r: v for r, v in (heldout or {}).items() if r in data and v}
    for role, enc in heldout.items():
        results[role].heldout = len(enc)
    stopper, best_state = EarlyStopping(cfg.patience, cfg.min_delta), None
    bar = tqdm(range(total), desc=desc, dynamic_ncols=True)
    done = total
    for step in bar:
        step_losses = []
        for role, encoded in data.items():
            _activate(model, role, params)
            step_losses.append(_role_loss(model, encoded, samplers[role], cfg, pad_id, device, results[role]))
        _optimizer_step(opt, sched, params, cfg, step_losses, results, step)
        if (step + 1) % 10 == 0 or step + 1 == total:
            bar.set_postfix({r: f"{_last_finite(res.losses):.3f}" for r, res in results.items()})
        out_of_time = cfg.max_time_s is not None and time.perf_counter() - start >= cfg.max_time_s
        stop = False
        if heldout and ((step + 1) % cfg.eval_every == 0 or step + 1 == total or out_of_time):
            improved, stop = stopper.update(step + 1, _measure(model, heldout, params, cfg, pad_id, results, step + 1))
            if improved:
                best_state = [p.detach().clone() for p in params]
        if stop or out_of_time:
            done = step + 1
            break
    if best_state is not None and stopper.best_step != done:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    for res in results.values():
        res.steps, res.time_s, res.stopped_early = done, elapsed, done < total
        res.best_step = stopper.best_step if heldout else None
        _check_skipped(res, done, cfg)
    return results


def _measure(
    model: torch.nn.Module,
    heldout: dict[str, list[Encoded]],
    params: Sequence[torch.nn.Parameter],
    cfg: TrainConfig,
    pad_id: int,
    results: dict[str, RoleResult],
    step: int,
) -> float:
    """Held-out loss of every adapter (recorded in its result); the early-stopping criterion is their mean."""
    values = []
    for role, encoded in heldout.items():
        _activate(model, role, params)
        value = heldout_loss(model, encoded, cfg, pad_id)
        results[role].eval_steps.append(step)
        results[role].eval_losses.append(value)
        values.append(value)
    print(f"step {step}: held-out loss " + ", ".join(f"{r} {v:.4f}" for r, v in zip(heldout, values)))
    return sum(values) / len(values)


def _role_loss(
    model: torch.nn.Module,
    encoded: list[Encoded],
    sampler: Iterator[list[int]],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    result: RoleResult,
) -> torch.Tensor:
    """Forward and backward over ``grad_accum`` micro-batches of the active adapter; its mean loss stays on the
    device (read once per step with the others, one host sync)."""
    micro = []
    for _ in range(cfg.grad_accum):
        batch = [encoded[i] for i in next(sampler)]
        with _autocast(device, cfg.precision):
            loss = output_loss(model, collate(batch, pad_id).to(device))
        (loss / cfg.grad_accum).backward()
        micro.append(loss.detach().float())
        result.tokens += sum(len(e.ids) for e in batch)
        result.output_tokens += sum(e.n_output for e in batch)
    return torch.stack(micro).mean()


def _optimizer_step(
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    params: Sequence[torch.nn.Parameter],
    cfg: TrainConfig,
    step_losses: list[torch.Tensor],
    results: dict[str, RoleResult],
    step: int,
) -> None:
    """Clip, then update every adapter at once, or none when a loss or the gradient norm is not finite (the step is
    recorded as skipped for every adapter and its gradients are dropped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # non-finite if any gradient is
    values = torch.stack([*step_losses, grad_norm.float().to(step_losses[0].device)]).cpu().tolist()  # one sync
    losses, norm = values[:-1], values[-1]
    update = all(math.isfinite(x) for x in losses) and math.isfinite(norm)
    for res, value in zip(results.values(), losses):
        res.losses.append(value)
        if not update:  # one optimizer step for all adapters: none of them is updated
            res.skipped.append(step)
    if update:
        opt.step()
    with warnings.catch_warnings():  # a skipped first step: the schedule advances without an optimizer step
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before")
        sched.step()
    opt.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped with it


def _check_skipped(res: RoleResult, total: int, cfg: TrainConfig) -> None:
    """Report an adapter's skipped steps; fail when more than ``max_skipped_ratio`` of them were skipped."""
    if res.skipped:
        print(f"{res.role}: {len(res.skipped)} of {total} steps skipped (non-finite loss or gradient): "
              f"{res.skipped[:10]}{' ...' if len(res.skipped) > 10 else ''}")  # fmt: skip
    if len(res.skipped) > cfg.max_skipped_ratio * total:
        raise TrainingFailed(
            f"{res.role}: {len(res.skipped)} of {total} optimizer steps had a non-finite loss or gradient "
            f"(more than max_skipped_ratio={cfg.max_skipped_ratio}); first at step {res.skipped[0]}"
        )


def _last_finite(values: list[float]) -> float:
    return next((x for x in reversed(values) if math.isfinite(x)), float("nan"))

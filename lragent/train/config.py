"""Settings of one adapter-training run, validated once and frozen."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

MODES: tuple[str, ...] = ("independent", "shared-a", "joint")
SAVE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """LoRA and optimisation settings. Defaults: the paper's adapters (q_proj+v_proj, r 8, alpha 16, dropout 0.05)
    trained briefly (200 steps of 8 examples per role, AdamW, linear warmup then cosine decay)."""

    mode: str = "independent"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    shared_modules: tuple[str, ...] = ("v_proj",)  # modules whose lora_A is shared (shared-a, joint)
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_skipped_ratio: float = 0.1  # steps with a non-finite loss/gradient are skipped; more than this fails the run
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = 200
    epochs: float | None = None
    max_seq_len: int = 1024
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    save_dtype: str = "float16"
    max_examples: int | None = None  # use only the first N examples of each role (smoke runs)
    # held-out split and early stopping: a share of the questions (all their examples, every role) is not trained
    # on; every ``eval_every`` steps the mean output-token loss on it is measured; training stops after ``patience``
    # evaluations without improvement and the weights of the best evaluation are the ones saved (0: never stop early)
    heldout_fraction: float = 0.0
    eval_every: int = 25
    patience: int = 0
    min_delta: float = 0.0  # an improvement smaller than this does not reset the patience
    max_time_s: float | None = None  # stop (held-out measured, best weights kept) once training took this long
    # ScienceQA: K extra copies of each training example with the options reordered and every option letter remapped
    # (lragent.train.augment), so the answer letter is balanced; the held-out split is never augmented
    option_permutations: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype {self.save_dtype!r} not in {SAVE_DTYPES}")
        if self.rank <= 0 or self.batch_size <= 0 or self.grad_accum <= 0 or self.max_seq_len < 16:
            raise ValueError("rank, batch_size and grad_accum must be positive and max_seq_len >= 16")
        if not 0.0 <= self.max_skipped_ratio <= 1.0:
            raise ValueError("max_skipped_ratio must be in [0, 1]")
        if not 0.0 <= self.heldout_fraction < 1.0 or self.eval_every <= 0 or self.patience < 0:
            raise ValueError("heldout_fraction must be in [0, 1), eval_every positive and patience >= 0")
        if self.option_permutations < 0:
            raise ValueError("option_permutations must be >= 0")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps or epochs")
        if self.mode != "independent" and not set(self.shared_modules) <= set(self.targets):
            raise ValueError(f"shared modules {self.shared_modules} must be among the targets {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps: ``max_steps``, capped by ``epochs`` worth of examples when both are given."""
        per_step = self.batch_size * self.grad_accum
        by_epochs = math.ceil(self.epochs * n_examples / per_step) if self.epochs is not None else None
        candidates = [s for s in (self.max_steps, by_epochs) if s is not None]
        return max(1, min(candidates))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

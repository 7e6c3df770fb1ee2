"""The three adapter-set recipes: independent, shared-A (the paper's) and joint, over one base model.

- independent: each role its own (A, B) on every target module, trained alone.
- shared-a: plan trained first (or taken from an existing folder); action and reflect then train with plan's
  ``lora_A`` of the shared modules (v_proj) loaded and frozen, so those A matrices are bitwise equal across roles.
- joint: all roles attached at once with one ``lora_A`` per shared module tied across roles, trained in one run.

Each role's adapter is initialised under its own seed (``seed + 1000 * role index``) so independent adapters do not
start from the same A. Every role is saved as a standard PEFT folder (adapter_config.json +
adapter_model.safetensors) in ``out_dir/<role>``.
"""

from __future__ import annotations

import fcntl
import filecmp
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from lragent.train.batching import Encoded
from lragent.train.config import TrainConfig
from lragent.train.data import ROLES
from lragent.train.loop import RoleResult, TrainingFailed, train_adapters

WEIGHTS_NAME = "adapter_model.safetensors"
# Option-permutation copies per training example when the command line does not say (lragent.train.augment): on for
# ScienceQA, whose 4-option trajectories otherwise teach a letter prior; HotpotQA has no options.
TASK_OPTION_PERMUTATIONS: dict[str, int] = {"scienceqa": 3}


def option_permutations_for(task: str, requested: int | None) -> int:
    """The number of option-permuted copies for ``task``: ``requested`` when given, else the task's default."""
    return TASK_OPTION_PERMUTATIONS.get(task, 0) if requested is None else requested


def role_seed(seed: int, role: str) -> int:
    return seed + 1000 * (ROLES.index(role) if role in ROLES else len(ROLES))


def lora_config(cfg: TrainConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(base: torch.nn.Module, roles: Sequence[str], cfg: TrainConfig, base_name: str) -> PeftModel:
    """Wrap ``base`` with one freshly initialised adapter per role (base weights frozen, all LoRA weights trainable)."""
    model = None
    for role in roles:
        torch.manual_seed(role_seed(cfg.seed, role))
        if model is None:
            model = get_peft_model(base, lora_config(cfg), adapter_name=role)
        else:
            model.add_adapter(role, lora_config(cfg))
        if base_name:  # what adapter_config.json names as the base model
            model.peft_config[role].base_model_name_or_path = base_name
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _shared_layers(model: PeftModel, modules: Sequence[str]) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and n.split(".")[-1] in modules]


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _refuse_nonfinite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = nonfinite_tensors(state)
    if bad:
        raise TrainingFailed(f"{what}: {len(bad)} of {len(state)} tensors are not finite (NaN/inf), e.g. {bad[:3]}")


def load_frozen_a(model: PeftModel, role: str, source: Path, modules: Sequence[str]) -> int:
    """Copy ``lora_A`` of ``modules`` from a saved adapter folder into adapter ``role`` and freeze it."""
    weights = load_file(str(Path(source) / WEIGHTS_NAME))
    _refuse_nonfinite(weights, f"shared A source {source}")
    layers = _shared_layers(model, modules)
    for name, layer in layers:
        key = f"{name}.lora_A.weight"
        if key not in weights:
            raise KeyError(f"{source} has no {key}: was it trained with the same targets?")
        param = layer.lora_A[role].weight
        if weights[key].shape != param.shape:
            raise ValueError(f"{key}: shape {tuple(weights[key].shape)} != {tuple(param.shape)} (rank mismatch?)")
        with torch.no_grad():
            param.copy_(weights[key].to(param.dtype))
        param.requires_grad_(False)
    if not layers:
        raise ValueError(f"no LoRA layer named {modules} to share")
    return len(layers)


def tie_a(model: PeftModel, roles: Sequence[str], modules: Sequence[str]) -> int:
    """Make every role use roles[0]'s ``lora_A`` module on ``modules`` (one parameter, gradients from all roles)."""
    layers = _shared_layers(model, modules)
    for _, layer in layers:
        for role in roles[1:]:
            layer.lora_A[role] = layer.lora_A[roles[0]]
    return len(layers)


def save_adapter(model: PeftModel, role: str, out_dir: Path, dtype: str) -> Path:
    """Write ``role`` as a standard PEFT folder; weights cast to ``dtype`` (float16 keeps the shipped files small).
    Raises :class:`TrainingFailed`, writing nothing, if a weight is not finite (after the cast: float16 overflow)."""
    out_dir = Path(out_dir)
    state = get_peft_model_state_dict(model, adapter_name=role, save_embedding_layers=False)
    state = {k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in state.items()}
    _refuse_nonfinite(state, f"adapter {role!r} ({dtype})")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.peft_config[role]
    config.inference_mode = True
    config.save_pretrained(str(out_dir))
    config.inference_mode = False
    return out_dir


def adopt_plan(plan_from: Path, out_dir: Path) -> None:
    """Copy the trained plan adapter into a shared-A set, under a lock and only where the copy differs.

    Role runs of one set may start side by side (one process per role on one GPU): each reads the plan's A right
    after adopting it, so none may rewrite files another is reading; a stale plan from an earlier run is replaced."""
    dest = out_dir / "plan"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".plan.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = [f for f in plan_from.rglob("*") if f.is_file()]
        same = all((dest / f.relative_to(plan_from)).is_file() for f in files) and all(
            filecmp.cmp(f, dest / f.relative_to(plan_from), shallow=False) for f in files
        )
        if not same:
            shutil.copytree(plan_from, dest, dirs_exist_ok=True)


def train_set(
    base: torch.nn.Module,
    data: dict[str, list[Encoded]],
    cfg: TrainConfig,
    out_dir: Path,
    pad_id: int,
    base_name: str = "",
    plan_from: Path | None = None,
    heldout: dict[str, list[Encoded]] | None = None,
) -> dict[str, RoleResult]:
    """Train and save one adapter set (recipe ``cfg.mode``) for the roles in ``data``; returns per-role results.
    Adapters are removed from ``base`` afterwards. ``plan_from`` (shared-a only) reuses a trained plan folder: it is
    copied into the set and its A matrices are the ones shared (plan is then not retrained). ``heldout`` (per role)
    turns on the held-out loss, best-checkpoint restore and early stopping of :func:`train_adapters`."""
    heldout = heldout or {}
    out_dir = Path(out_dir)
    if cfg.mode == "joint":
        roles = list(data)
        model = attach(base, roles, cfg, base_name)
        tie_a(model, roles, cfg.shared_modules)
        results = train_adapters(model, data, cfg, pad_id, desc="joint:" + "+".join(roles), heldout=heldout)
        for role in roles:
            save_adapter(model, role, out_dir / role, cfg.save_dtype)
        model.unload()
        return results
    roles = sorted(data, key=lambda r: r != "plan")  # plan first: shared-a copies its A
    if cfg.mode == "shared-a" and plan_from is not None:
        adopt_plan(Path(plan_from), out_dir)
        roles = [r for r in roles if r != "plan"]
    elif cfg.mode == "shared-a" and "plan" not in roles:
        raise ValueError("shared-a needs the plan role in the run or plan_from")
    results: dict[str, RoleResult] = {}
    for role in roles:
        model = attach(base, [role], cfg, base_name)
        if cfg.mode == "shared-a" and role != "plan":
            load_frozen_a(model, role, out_dir / "plan", cfg.shared_modules)
        part = {role: heldout[role]} if heldout.get(role) else None
        results.update(train_adapters(model, {role: data[role]}, cfg, pad_id, desc=role, heldout=part))
        save_adapter(model, role, out_dir / role, cfg.save_dtype)
        model.unload()
    return results

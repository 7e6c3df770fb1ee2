"""Checks on saved adapter sets: shared-A bit equality and a greedy sample through HF transformers + PEFT."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lragent.train.data import ROLES
from lragent.train.recipes import WEIGHTS_NAME

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class SharedACheck:
    """Result of comparing one module's lora_A across the roles of a set."""

    module: str
    roles: tuple[str, ...]
    layers: int  # layers compared
    identical: bool  # bitwise equal in every layer for every role
    mismatched: tuple[str, ...]  # "role:layer" entries that differ


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def check_shared_a(set_dir: Path, module: str = "v_proj", roles: tuple[str, ...] | None = None) -> SharedACheck:
    """Compare ``module``'s lora_A of every role folder in ``set_dir`` with the first role's (plan's), bit by bit."""
    set_dir = Path(set_dir)
    found = [p.parent.name for p in set_dir.glob(f"*/{WEIGHTS_NAME}")]
    roles = roles or tuple(sorted(found, key=lambda r: (ROLES.index(r) if r in ROLES else len(ROLES), r)))
    if len(roles) < 2:
        raise ValueError(f"{set_dir}: need at least two role folders, found {roles}")
    weights = {r: load_file(str(set_dir / r / WEIGHTS_NAME)) for r in roles}
    keys = sorted(k for k in weights[roles[0]] if f".{module}.lora_A" in k)
    mismatched = []
    for key in keys:
        for role in roles[1:]:
            other = weights[role].get(key)
            if (
                other is None
                or other.dtype != weights[roles[0]][key].dtype
                or not torch.equal(_bits(other), _bits(weights[roles[0]][key]))
            ):
                mismatched.append(f"{role}:{_LAYER.search(key).group(1) if _LAYER.search(key) else key}")
    return SharedACheck(module, roles, len(keys), bool(keys) and not mismatched, tuple(mismatched))


def greedy_samples(
    model_dir: Path, prompts: dict[str, tuple[Path, str]], max_new_tokens: int = 48, device: str = "cpu"
) -> dict[str, str]:
    """Greedy continuations by the base model with saved adapters (HF transformers + PEFT), loaded once.
    ``prompts`` maps a label to ``(adapter folder, prompt)``; returns label -> generated text (special tokens kept)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    loaded: dict[Path, str] = {}
    outputs = {}
    for label, (adapter_dir, prompt) in prompts.items():
        if adapter_dir not in loaded:
            name = f"a{len(loaded)}"
            if loaded:
                model.load_adapter(str(adapter_dir), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
            loaded[adapter_dir] = name
        model.set_adapter(loaded[adapter_dir])
        model.eval()
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        outputs[label] = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=False)
    return outputs

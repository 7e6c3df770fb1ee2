"""Shared fixtures: the embedded model folder and random PEFT adapters written in PEFT's own file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lragent.models.config import ModelConfig
from lragent.models.hub import resolve_model

MODEL = "smollm2-135m-instruct"


def write_peft_adapter(
    folder: Path,
    config: ModelConfig,
    targets: tuple[str, ...],
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    shared_value_a: dict[int, torch.Tensor] | None = None,
    scale: float = 1.0,
    use_rslora: bool = False,
) -> Path:
    """A LoRA adapter with non-zero A and B, in the layout `PeftModel.save_pretrained` writes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = config.module_shapes()
    tensors = {}
    for layer in range(config.num_layers):
        for module in targets:
            d_in, d_out = shapes[module]
            kind = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            if module == "v_proj" and shared_value_a is not None:
                a = shared_value_a.setdefault(layer, a)
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.05 * scale).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": use_rslora,
        "base_model_name_or_path": MODEL,
        "fan_in_fan_out": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def model_config(model_dir) -> ModelConfig:
    return ModelConfig.from_file(model_dir / "config.json")


@pytest.fixture(scope="session")
def qv_adapters(tmp_path_factory, model_config) -> dict[str, str]:
    """Three independent q/v role adapters (different A and B)."""
    root = tmp_path_factory.mktemp("qv")
    return {
        role: str(write_peft_adapter(root / role, model_config, ("q_proj", "v_proj"), seed=i))
        for i, role in enumerate(("plan", "action", "reflect"))
    }


@pytest.fixture(scope="session")
def shared_a_adapters(tmp_path_factory, model_config) -> dict[str, str]:
    """Three q/v role adapters whose v_proj A is one shared matrix per layer."""
    root = tmp_path_factory.mktemp("shared_a")
    shared: dict[int, torch.Tensor] = {}
    return {
        role: str(write_peft_adapter(root / role, model_config, ("q_proj", "v_proj"), seed=10 + i, shared_value_a=shared))
        for i, role in enumerate(("plan", "action", "reflect"))
    }


@pytest.fixture(scope="session")
def all_module_adapters(tmp_path_factory, model_config) -> dict[str, str]:
    root = tmp_path_factory.mktemp("all")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {
        role: str(write_peft_adapter(root / role, model_config, targets, rank=4 + 4 * i, seed=20 + i, scale=0.5))
        for i, role in enumerate(("plan", "action"))
    }

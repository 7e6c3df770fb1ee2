"""Random but non-trivial PEFT adapters, in the exact layout `PeftModel.save_pretrained` writes.

Used by tests (HF + PEFT parity) and benchmarks (speed only: these adapters' outputs mean nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lragent.model_config import ModelConfig
from lragent.models.hub import resolve_model
from lragent.models.presets import preset

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def model_config_for(model: str) -> ModelConfig:
    if model.startswith("dummy:"):
        return ModelConfig.from_dict(preset(model.split(":", 1)[1]))
    return ModelConfig.from_file(resolve_model(model) / "config.json")


def write_random_llama(folder: Path, seed: int = 0, **shape) -> ModelConfig:
    """A seeded random HF Llama checkpoint of the given `LlamaConfig` shape, saved to `folder` (tests, benchmarks)."""
    import transformers

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).save_pretrained(folder)
    return ModelConfig.from_file(Path(folder) / "config.json")


def write_peft_adapter(
    folder: Path,
    config: ModelConfig,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    shared_value_a: dict[int, torch.Tensor] | None = None,
    b_scale: float = 0.05,
    use_rslora: bool = False,
    base_model: str = "",
    layers: tuple[int, ...] | None = None,
    shared_key_a: dict[int, torch.Tensor] | None = None,
) -> Path:
    """One adapter with non-zero A and B. Pass the same `shared_value_a` dict to several calls for shared-A (and
    `shared_key_a` for a shared k_proj A: base_lr_shared with key adapters); `layers` limits it to some layers
    (default: all)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = config.module_shapes()
    tensors = {}
    for layer in range(config.num_layers) if layers is None else layers:
        for module in targets:
            d_in, d_out = shapes[module]
            kind = "mlp" if module in MLP_MODULES else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            if module == "v_proj" and shared_value_a is not None:
                a = shared_value_a.setdefault(layer, a)
            if module == "k_proj" and shared_key_a is not None:
                a = shared_key_a.setdefault(layer, a)
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * b_scale).contiguous()
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
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def write_random_adapters(
    model: str,
    root: Path,
    names: list[str],
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    shared_a: bool = True,
    seed: int = 0,
) -> dict[str, str]:
    """PEFT folders, one per name; with `shared_a` every adapter gets the same v_proj A and k_proj A (when `targets`
    has them: BASE_LR_SHARED-ready)."""
    config = model_config_for(model)
    shared: dict[int, torch.Tensor] | None = {} if shared_a else None
    shared_k: dict[int, torch.Tensor] | None = {} if shared_a else None
    return {
        name: str(
            write_peft_adapter(
                Path(root) / name,
                config,
                targets,
                rank,
                alpha,
                seed + i,
                shared,
                0.02,
                base_model=model,
                shared_key_a=shared_k,
            )
        )
        for i, name in enumerate(names)
    }

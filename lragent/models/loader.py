"""Weight loaders: Hugging Face safetensors folders (GGUF goes through one via `hub`), and dummy random weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lragent.model_config import ModelConfig
from lragent.models.hub import resolve_model
from lragent.models.llama import CausalLM, RMSNorm
from lragent.models.presets import preset


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer_dir: Path | None  # None for dummy weights: prompts must be token ids
    dummy: bool


def empty_model(config: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(config, max_positions)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.build(device)
    return model


def load_model(name: str, dtype: torch.dtype, device: torch.device, max_positions: int | None = None) -> LoadedModel:
    if name.startswith("dummy:"):
        config = ModelConfig.from_dict(preset(name.split(":", 1)[1]), name=name)
        model = empty_model(config, max_positions or config.max_position_embeddings, dtype, device)
        gen = torch.Generator(device=device).manual_seed(0)
        for param in model.parameters():
            param.data.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():  # RMSNorm weights at 1 keep activations sane
            if isinstance(module, RMSNorm):
                module.weight.data.fill_(1.0)
        return LoadedModel(model.eval(), config, None, dummy=True)
    folder = resolve_model(name)
    config = ModelConfig.from_file(folder / "config.json", name=name)
    model = empty_model(config, max_positions or config.max_position_embeddings, dtype, device)
    load_safetensors(model, folder)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return LoadedModel(model.eval(), config, folder if has_tokenizer else None, dummy=False)


def load_safetensors(
    model: CausalLM, folder: Path, read: Callable[[Any, str], torch.Tensor] | None = None, why: str = ""
) -> None:
    """Copy every checkpoint tensor of `folder` into `model`'s parameter of the same name, checking names and shapes.

    `read(handle, key)` returns the tensor to copy from an open safetensors file (default: all of it; tensor
    parallelism reads its rank's slice); `why` is added to a shape mismatch's message."""
    params = dict(model.named_parameters())
    missing = set(params)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in params:
                    if (key == "lm_head.weight" and model.lm_head is None) or "rotary_emb" in key:
                        continue
                    raise ValueError(f"{file.name}: unexpected tensor {key!r} for this architecture")
                tensor = f.get_tensor(key) if read is None else read(f, key)
                if tensor.shape != params[key].shape:
                    raise ValueError(
                        f"{key}: checkpoint shape {tuple(f.get_slice(key).get_shape())} != model "
                        f"{tuple(params[key].shape)}{why}"
                    )
                params[key].data.copy_(tensor)
                missing.discard(key)
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")

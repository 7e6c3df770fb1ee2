"""Loading one PEFT LoRA folder and checking it against the base model."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lragent.models.config import ModelConfig

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used with this base model or sharing scheme."""


@dataclass
class LoRAAdapter:
    """One agent's adapter. `weights[(layer, module)] = (A, B)` with A: [d_in, r] and B: [r, d_out] (math layout)."""

    name: str
    rank: int
    scaling: float
    targets: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    path: str = ""

    def value_down(self, layer: int) -> torch.Tensor | None:
        """v_proj `A` of a layer: the matrix that must be shared for BASE_LR_SHARED."""
        pair = self.weights.get((layer, "v_proj"))
        return None if pair is None else pair[0]


def load_peft_adapter(name: str, path: str | Path, config: ModelConfig) -> LoRAAdapter:
    """Read `adapter_config.json` + `adapter_model.safetensors` (or .bin) and validate every shape."""
    folder = Path(path).expanduser()
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no adapter_config.json (not a PEFT LoRA folder)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA").upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    tensors = _read_tensors(folder, name)
    weights = _pair_tensors(name, tensors, config, rank)
    targets = frozenset(module for _, module in weights)
    return LoRAAdapter(name=name, rank=rank, scaling=scaling, targets=targets, weights=weights, path=str(folder))


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        return load_file(str(st))
    binary = folder / "adapter_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise AdapterError(f"adapter {name!r}: {folder} has no adapter_model.safetensors")


def _pair_tensors(
    name: str, tensors: dict[str, torch.Tensor], config: ModelConfig, rank: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    shapes = config.module_shapes()
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            if "lora" in key:
                raise AdapterError(f"adapter {name!r}: unsupported LoRA tensor {key!r}")
            continue
        layer, module, half = int(match[1]), match[2], match[3]
        if module not in shapes:
            raise AdapterError(f"adapter {name!r}: target {module!r} is not one of {', '.join(LORA_MODULES)}")
        if layer >= config.num_layers:
            raise AdapterError(
                f"adapter {name!r} has layer {layer} but the base model has {config.num_layers} layers: "
                "it was trained for another base model"
            )
        halves.setdefault((layer, module), {})[half] = tensor.float()
    if not halves:
        raise AdapterError(f"adapter {name!r}: no LoRA weights found")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} lacks lora_{'AB'[int('A' in pair)]}")
        d_in, d_out = shapes[module]
        a, b = pair["A"], pair["B"]  # PEFT layout: A [r, d_in], B [d_out, r]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                f"({rank}, {d_in}) and ({d_out}, {rank}) for this base model: it was trained for another base model"
            )
        weights[(layer, module)] = (a.t().contiguous(), b.t().contiguous())
    return weights


def unshared_value_layers(adapters: list[LoRAAdapter], num_layers: int) -> list[int]:
    """Layers whose v_proj `A` is not bitwise identical across all adapters (empty = shared-A)."""
    if len(adapters) < 2:
        return []
    differing = []
    for layer in range(num_layers):
        first = adapters[0].value_down(layer)
        for other in adapters[1:]:
            mat = other.value_down(layer)
            if (first is None) != (mat is None) or (
                first is not None and (first.shape != mat.shape or not torch.equal(first, mat))
            ):
                differing.append(layer)
                break
    return differing

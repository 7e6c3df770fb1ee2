"""Tensor parallelism as a transformation of the model, its config and its adapters (the layers know nothing of it).

Rank r of N holds a contiguous 1/N of the attention heads, the kv heads and the MLP columns:

- column-parallel q/k/v/gate/up: output features (whole heads) split, input replicated; LoRA `A` replicated, `B`
  split like the weight's rows;
- row-parallel o/down: input features split; each rank's partial output `x_r W_r^T + s (x_r A_r) B` is summed by one
  all-reduce after the attention block and after the MLP (a forward hook). The adapter's rank-r partial `x_r A_r`
  rides in that sum (`sum_r (x_r A_r) B = (x A) B`), so LoRA costs no collective of its own;
- embeddings, norms and the LM head replicated: after each all-reduce every rank holds the same hidden states, hence
  the same logits and (the sampler being a seeded race) the same tokens.

The rank's `ModelConfig` (`Shard.config`) has heads, kv heads and the MLP width divided by N, so the KV / critical
pools and the attention kernels see local heads only. The LR cache rows `X A_v` come from the replicated hidden
state: every rank keeps them whole, and multiplies them by its own kv heads' columns of `B_v`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lragent.lora.adapter import LoRAAdapter
from lragent.model_config import ModelConfig
from lragent.models.hub import resolve_model
from lragent.models.llama import CausalLM, DecoderLayer, RMSNorm
from lragent.models.loader import LoadedModel, empty_model, load_model, load_safetensors
from lragent.models.presets import preset

COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group: rank `rank` of `size` (size 1: the whole model)."""

    rank: int = 0
    size: int = 1

    def config(self, full: ModelConfig) -> ModelConfig:
        """The architecture this rank's layers, KV pools and LoRA bank see: 1/size of the heads and MLP width."""
        if self.size == 1:
            return full
        check_divisible(full, self.size)
        n = self.size
        return dataclasses.replace(
            full,
            num_heads=full.num_heads // n,
            num_kv_heads=full.num_kv_heads // n,
            intermediate_size=full.intermediate_size // n,
        )

    def device(self, name: str) -> torch.device:
        """'cuda' -> cuda:rank, 'cuda:k' -> cuda:(k + rank); the CPU is shared by every rank."""
        device = torch.device(name)
        if device.type != "cuda" or self.size == 1:
            return device
        return torch.device("cuda", (device.index or 0) + self.rank)

    def split(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous 1/size of `tensor` along `dim` (a view)."""
        part = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * part, part)

    def adapter(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """This rank's part of an adapter: `B` split on column-parallel targets, `A` split on row-parallel ones."""
        if self.size == 1:
            return adapter
        weights = {}
        for (layer, module), (a, b) in adapter.weights.items():
            if module in COLUMN_PARALLEL:
                b = self.split(b, 1)  # B [r, d_out]: the rank's output features
            elif module in ROW_PARALLEL:
                a = self.split(a, 0)  # A [d_in, r]: the rank's input features
            weights[(layer, module)] = (a, b)
        return dataclasses.replace(adapter, weights=weights)

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest `value` over the ranks (a KV budget measured per device: every rank must get the same
        number of blocks, or their schedulers would part ways)."""
        if self.size == 1:
            return value
        box = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        return int(box.item())


def check_divisible(config: ModelConfig, size: int) -> None:
    """ValueError unless `size` ranks can split the heads, kv heads and MLP width of `config` evenly."""
    parts = {
        "key/value heads": config.num_kv_heads,
        "attention heads": config.num_heads,
        "intermediate size": config.intermediate_size,
    }
    for what, count in parts.items():
        if count % size:
            raise ValueError(
                f"tensor_parallel_size={size} must divide the model's {what} ({count}); "
                f"valid sizes: {', '.join(map(str, valid_sizes(config)))}"
            )


def valid_sizes(config: ModelConfig) -> list[int]:
    counts = (config.num_kv_heads, config.num_heads, config.intermediate_size)
    return [n for n in range(1, config.num_kv_heads + 1) if all(c % n == 0 for c in counts)]


def read_model_config(name: str) -> ModelConfig:
    """The architecture of a model name as `load_model` reads it, without loading any weight."""
    if name.startswith("dummy:"):
        return ModelConfig.from_dict(preset(name.split(":", 1)[1]), name=name)
    return ModelConfig.from_file(resolve_model(name) / "config.json", name=name)


def param_split_dim(name: str) -> int | None:
    """The dimension of a parameter the ranks split (nn.Linear weights are [out, in]); None: replicated."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if module in COLUMN_PARALLEL:
        return 0  # weight rows and bias entries are output features
    if module in ROW_PARALLEL and parts[-1] == "weight":
        return 1
    return None


def load_model_shard(
    name: str, dtype: torch.dtype, device: torch.device, max_positions: int | None, shard: Shard
) -> LoadedModel:
    """`load_model` for one rank: a model of `shard.config` shape holding the rank's slices of every weight (read
    sliced from the checkpoint: no rank ever holds the whole model), whose attention and MLP outputs are all-reduced.
    `LoadedModel.config` stays the full architecture (adapters are validated against it)."""
    if shard.size == 1:
        return load_model(name, dtype, device, max_positions)
    full = read_model_config(name)
    model = empty_model(shard.config(full), max_positions or full.max_position_embeddings, dtype, device)
    if name.startswith("dummy:"):
        _fill_dummy(model, shard)
        tokenizer_dir, dummy = None, True
    else:
        folder = resolve_model(name)
        _load_sliced(model, folder, shard)
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
        tokenizer_dir, dummy = (folder if has_tokenizer else None), False
    all_reduce_partial_outputs(model)
    return LoadedModel(model.eval(), full, tokenizer_dir, dummy)


def _full_shape(name: str, local: torch.Tensor, size: int) -> list[int]:
    shape = list(local.shape)
    dim = param_split_dim(name)
    if dim is not None:
        shape[dim] *= size
    return shape


def _fill_dummy(model: CausalLM, shard: Shard) -> None:
    """The rank's slices of the very weights `load_model` draws for a dummy model (same generator, same order), so a
    dummy model gives the same tokens whatever the tensor-parallel size. One full tensor at a time is drawn."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        full = torch.empty(_full_shape(name, param, shard.size), dtype=param.dtype, device=param.device)
        full.normal_(0.0, 0.02, generator=gen)
        dim = param_split_dim(name)
        param.data.copy_(full if dim is None else shard.split(full, dim))
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


def _load_sliced(model: CausalLM, folder: Path, shard: Shard) -> None:
    """Copy each checkpoint tensor's slice for this rank (safetensors reads only the slice)."""

    def read(f, key: str) -> torch.Tensor:
        view = f.get_slice(key)
        dim = param_split_dim(key)
        if dim is None:
            return view[:]
        shape = list(view.get_shape())
        part = shape[dim] // shard.size
        index = [slice(None)] * len(shape)
        index[dim] = slice(shard.rank * part, (shard.rank + 1) * part)
        return view[tuple(index)]

    load_safetensors(model, folder, read, why=f" (split over {shard.size} ranks)")


def all_reduce_partial_outputs(model: CausalLM) -> None:
    """Sum the row-parallel partial outputs of every attention block and MLP over the ranks (in place, in the
    default process group: NCCL on GPUs, gloo on the CPU)."""
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        layer.self_attn.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)


def _all_reduce_output(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output

"""The roofline floor of a trace: every forward pass at the measured matmul rate or memory bandwidth, whichever binds.

A forward pass over `n` new tokens with `c` tokens already cached costs
    FLOPs = 2 n P_linear + 4 d H_q L (n c + n (n + 1) / 2) + 2 h V (per sampled token, the LM head)
    bytes = weight bytes of every linear layer (+ LM head) + the cache read (K, V, and R where the system keeps it)
and takes at least max(FLOPs / matmul rate, bytes / copy bandwidth). The rates are measured in the same run
(`calibrate`): a large square matmul in the model's dtype and a device-to-device copy (bytes read + written).

The *ideal* floor of a trace is the scheme-independent lower bound: one cache shared by every agent, each token
run through the model once (the prefill of a step covers the tokens appended since the previous forward pass).
The *system* floor replays the token counts a system actually computed (re-prefill under Non-Shared, LR prefill
under BaseShared) and so separates what the scheme costs from what the implementation costs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from lragent.model_config import ModelConfig


@dataclass(frozen=True)
class Rates:
    matmul_flops: float  # FLOP/s, square matmul in the model's dtype
    copy_bytes: float  # bytes/s, read + written
    device: str
    dtype: str

    def as_dict(self) -> dict:
        return {
            "matmul_TFLOPs": self.matmul_flops / 1e12,
            "copy_GBps": self.copy_bytes / 1e9,
            "device": self.device,
            "dtype": self.dtype,
        }


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn` (CUDA events on a GPU, wall clock on the CPU), after warm-up."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(device: str | torch.device, dtype: torch.dtype) -> Rates:
    device = torch.device(device)
    gpu = device.type == "cuda"
    n_copy = (1 << 29) if gpu else (1 << 23)  # elements: 1 GiB of bf16 on the GPU, 32 MiB of fp32 on the CPU
    src = torch.empty(n_copy, dtype=dtype, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = _time(lambda: dst.copy_(src), device, 10 if gpu else 5)
    copy_bw = 2 * src.numel() * src.element_size() / t_copy
    src = dst = None
    m = 8192 if gpu else 768
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    t_mm = _time(lambda: a @ b, device, 10 if gpu else 3)
    rates = Rates(
        2 * m**3 / t_mm, copy_bw, torch.cuda.get_device_name(device) if gpu else "cpu", str(dtype).split(".")[-1]
    )
    a = b = None
    if gpu:
        torch.cuda.empty_cache()
    return rates


@dataclass(frozen=True)
class ModelCost:
    linear_params: int  # all projections of all layers
    head_params: int  # the LM head (tied or not: it is a matmul either way)
    attn_flops_per_pair: int  # 4 d H_q L: QK^T and PV for one (query, key) pair over all layers
    kv_bytes_per_token: int  # K + V over all layers
    lr_bytes_per_token: int  # one rank-r LR row per layer
    itemsize: int

    @classmethod
    def of(cls, config: ModelConfig, dtype: torch.dtype, rank: int = 8) -> ModelCost:
        per_layer = sum(i * o for i, o in config.module_shapes().values())
        return cls(
            linear_params=per_layer * config.num_layers,
            head_params=config.hidden_size * config.vocab_size,
            attn_flops_per_pair=4 * config.head_dim * config.num_heads * config.num_layers,
            kv_bytes_per_token=2 * config.num_layers * config.kv_size * dtype.itemsize,
            lr_bytes_per_token=config.num_layers * rank * dtype.itemsize,
            itemsize=dtype.itemsize,
        )

    @property
    def weight_bytes(self) -> int:
        return (self.linear_params + self.head_params) * self.itemsize

    def forward_s(
        self, rates: Rates, new: int, cached: int, sampled: int = 1, lr: bool = False, batch: int = 1
    ) -> float:
        """Floor of one forward pass over `new` tokens after `cached` ones, sampling `sampled` tokens, for `batch`
        such sequences at once (they share the weight reads, nothing else)."""
        flops = 2 * new * self.linear_params + 2 * sampled * self.head_params
        flops += self.attn_flops_per_pair * (new * cached + new * (new + 1) // 2)
        per_token = self.kv_bytes_per_token + (self.lr_bytes_per_token if lr else 0)
        bytes_ = self.weight_bytes + batch * per_token * (cached + new)
        return max(batch * flops / rates.matmul_flops, bytes_ / rates.copy_bytes)


def step_floor_s(
    cost: ModelCost,
    rates: Rates,
    new: int,
    cached: int,
    generate: int,
    lr: bool = False,
    batch: int = 1,
    decode: bool = True,
) -> float:
    """A step: one prefill of `new` tokens after `cached` (it samples the first token), then generate - 1 decodes
    (left out with `decode=False`)."""
    total = cost.forward_s(rates, new, cached, lr=lr, batch=batch)
    ctx = cached + new
    for _ in range(generate - 1 if decode else 0):  # each decode feeds the previous sample
        total += cost.forward_s(rates, 1, ctx, lr=lr, batch=batch)
        ctx += 1
    return total


def ideal_floor_s(cost: ModelCost, rates: Rates, steps: list[tuple[int, int]], batch: int = 1) -> float:
    """Scheme-independent floor of a trace given as (tokens appended, tokens generated) per step; `batch`
    trajectories in lockstep (`--concurrent`)."""
    total, length, pending = 0.0, 0, 0
    for appended, generate in steps:
        new = pending + appended  # the previous step's last sample has not been through the model yet
        total += step_floor_s(cost, rates, new, length - pending, generate, batch=batch)
        length += appended + generate
        pending = 1
    return total


def system_floor_s(
    cost: ModelCost, rates: Rates, steps: list[tuple[int, int, int]], lr: bool = False, decode: bool = True
) -> float:
    """Floor for the work a system did: per step (prompt tokens, tokens it computed in the prefill, generated);
    `decode=False`: its prefills only (the floor of its TTFT)."""
    return sum(
        step_floor_s(cost, rates, max(1, computed), prompt - max(1, computed), gen, lr, decode=decode)
        for prompt, computed, gen in steps
    )

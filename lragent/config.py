"""Engine settings, validated once and frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lragent.cache.sharing import SharingMode, get_scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder
    sharing: SharingMode = SharingMode.BASE_LR_SHARED
    device: str = "cpu"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    max_loras: int | None = None  # adapter slots; default: loaded adapters + 4 for runtime loading
    max_lora_rank: int | None = None  # default: the largest loaded rank, at least 16
    allow_unshared_a: bool = False  # BASE_LR_SHARED with different v_proj A (measurably worse; for experiments)
    attention_backend: str = "auto"  # "torch" (reference) or "triton" when available
    enforce_eager: bool = False  # CUDA: no decode graphs (every step launches its kernels from Python)
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay a captured graph
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sharing", get_scheme(self.sharing).mode)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' asked for, but no CUDA GPU is visible")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in [0.05, 1]")
        for name in ("max_num_seqs", "max_num_batched_tokens", "cuda_graph_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

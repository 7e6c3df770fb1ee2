"""Engine settings, validated once and frozen."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from lragent.cache.sharing import SharingMode, check_critical_layers, get_scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# vLLM / PyTorch spellings accepted for `dtype`, normalised to the names above ("auto" stays "auto")
DTYPE_ALIASES = {
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "fp32": "float32",
    "double": "float64",
    "fp64": "float64",
}
QUANTIZATIONS = ("fp8",)  # weight formats `quantization` accepts (lragent.quant); None: the model dtype
SHARING_AUTO = "auto"  # resolved when the engine has loaded its adapters (lragent.lora.adapter.default_sharing)


def canonical_dtype(name: str) -> str:
    """'half' -> 'float16', 'BF16' -> 'bfloat16', 'auto' -> 'auto'; ValueError for anything else."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key != "auto" and key not in DTYPES:
        choices = ", ".join(["auto", *DTYPES, *DTYPE_ALIASES])
        raise ValueError(f"dtype must be one of {choices}; got {name!r}")
    return key


def parse_layers(layers: str | tuple[int, ...] | list[int]) -> list[int]:
    """'0,2,16' -> [0, 2, 16] ('' or 'none': no layer); a sequence of ints as it is; ValueError otherwise."""
    if not isinstance(layers, str):
        return list(layers)
    text = layers.strip().lower()
    if text in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"critical layers must be comma-separated layer numbers like 0,2,16; got {layers!r:.80}"
        ) from None


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA GPU is visible, else 'cpu'; other names are returned unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def hopper_or_newer(device: torch.device | str) -> bool:
    """A CUDA device of compute capability >= 9 (TMA, programmatic dependent launch); read once per device, since
    kernels ask on every launch."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def default_block_size(device: str) -> int:
    """Pages of 64 tokens on Hopper or newer: a prefill key tile is then one page run that the copy engine loads
    (H200: prefill attention 42% -> 54% of the matmul rate, the 33.7k trace 3.83 -> 3.48 s, BENCHMARKS.md), worth
    the coarser prefix reuse (a trajectory's partly filled last page is recomputed); 16 elsewhere."""
    return 64 if hopper_or_newer(device) else 16


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder
    tokenizer: str | None = None  # an HF tokenizer folder instead of the model's own (e.g. for dummy weights)
    # "auto": chosen from the adapters when the engine starts (shared v_proj A -> base_lr_shared, else base_shared)
    sharing: SharingMode | str = SHARING_AUTO
    device: str = "cpu"  # or "cuda", "cuda:N", "auto" (CUDA when visible), resolved here
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA; vLLM names ("half", "bf16", "float") accepted
    block_size: int = 0  # tokens per KV block; 0: 64 on Hopper-or-newer GPUs (TMA prefill tiles), else 16
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    max_loras: int | None = None  # adapter slots; default: loaded adapters + 4 for runtime loading
    max_lora_rank: int | None = None  # default: the largest loaded rank, at least 16
    allow_unshared_a: bool = False  # BASE_LR_SHARED with different v_proj A (measurably worse; for experiments)
    # base_shared / base_lr_shared: room in the LR rows for k_proj adapters loaded later (on when one is loaded at
    # start); off, the rows hold X A_v only (r wide) and k_proj adapters are refused
    key_lora: bool = False
    # droidspeak: the layers each agent recomputes; None: the paper's set for the LLaMA-3.1-8B shape, else every
    # third layer (`lragent.cache.sharing.default_critical_layers`); "0,2,16" is accepted too
    critical_layers: tuple[int, ...] | None = None
    attention_backend: str = "auto"  # "torch" (reference) or "triton" when available
    enforce_eager: bool = False  # CUDA: no decode graphs (every step launches its kernels from Python)
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay a captured graph
    # prefill steps of up to this many tokens (and <= 32 sequences) replay a captured graph per token bucket
    # (16, 32, ... this): an agent's short appended chunk is otherwise bound by launching its kernels; 0: eager
    cuda_graph_prefill_tokens: int = 512
    # cascade decode (Triton backend): decode rows whose block tables share >= 1024 leading tokens of whole blocks
    # read those keys once per step for the group, inside a cascade variant of each decode graph (on an H200: 2.06x
    # per step for 16 rows over a 32k prefix, 7% more tok/s on the 1.9k paper trace with 16 trajectories, the
    # single trajectory unchanged; start-up +1.3 s for the variant graphs). None: on for CUDA (off on the CPU,
    # where nothing is graphed and the interpreter would only plan it)
    cascade_decode: bool | None = None
    # compile every kernel variant and capture every decode graph at start-up (None: on CUDA, where they compile)
    warmup: bool | None = None
    # decode one step ahead (vLLM's async scheduling, SGLang's overlap scheduler): while step t runs, step t+1 is
    # launched with t's tokens read on the device, so the host's bookkeeping between steps no longer idles the GPU.
    # Steady decode only (no request waiting, no output constraint or penalty that needs the previous token on the
    # host); None: on for CUDA without tensor parallelism
    async_scheduling: bool | None = None
    seed: int = 0
    # ranks the model's heads and MLP columns are split over, one process each (lragent.distributed.tensor_parallel)
    tensor_parallel_size: int = 1
    # "fp8": the decoder's projection weights in FP8 e4m3 with per-output-channel scales, quantised at load
    # (lragent.quant.fp8); embeddings, LM head, norms and LoRA adapters keep the model dtype. None: no quantisation
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.sharing != SHARING_AUTO:
            object.__setattr__(self, "sharing", get_scheme(self.sharing).mode)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.critical_layers is not None:
            object.__setattr__(self, "critical_layers", check_critical_layers(parse_layers(self.critical_layers)))
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' asked for, but no CUDA GPU is visible")
        if self.block_size == 0:
            object.__setattr__(self, "block_size", default_block_size(self.device))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in [0.05, 1]")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            choices = ", ".join(QUANTIZATIONS)
            raise ValueError(f"quantization must be None or one of {choices}; got {self.quantization!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "cuda_graph_max_batch", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.cuda_graph_prefill_tokens < 0:
            raise ValueError("cuda_graph_prefill_tokens must be >= 0 (0: prefill runs eagerly)")

    def with_sharing(self, mode: SharingMode | str) -> EngineConfig:
        """This config with `sharing` set (how the engine records what "auto" resolved to)."""
        return replace(self, sharing=get_scheme(mode).mode)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

"""FP8 (e4m3) weights with one float32 scale per output channel, quantised once from the loaded checkpoint.

Why per output channel: a row of W is one output feature, so its scale factors out of the dot product
(`y_j = s_j * (x . q_j)`) and the matmul itself can run on FP8 values. scale_j = absmax(W_j) / 448 (e4m3's largest
finite value), q_j = round-to-nearest-even(W_j / scale_j). e4m3 has 3 mantissa bits, so each element's error is at most
max(|w| / 16, scale / 1024) <= absmax(W_j) / 16: half a step, the second term half the subnormal step (2^-9, below
2^-6).

Three matmuls; which ones a weight may use is chosen once, when it is quantised, and each call picks by its
number of rows:

- the Triton weight-only kernel (`lragent.kernels.triton_fp8.w8a16_linear`, W8A16) for inputs of at most
  `TRITON_MAX_ROWS` rows (decode): the activations stay in the model dtype (not quantised), each weight byte is read
  once and converted in registers, the per-channel scale is applied once per output. At a few rows the step is bound
  by reading the weights, and this is one launch per projection (fused q/k/v and gate/up included), without the
  per-token activation quantisation and the GEMM padding of `_scaled_mm`. For one row, `Fp8Weight.linear_silu_mul`
  also folds the MLP's SiLU-and-multiply into the down projection's kernel (one launch less per layer and step);
- `torch._scaled_mm` (CUDA with compute capability >= 8.9, a bfloat16 model, both dims multiples of 16) for more
  rows (prefill): the activations are quantised per token (row-wise absmax scale), a real FP8 GEMM;
- otherwise the reference: dequantise to the model dtype and `F.linear` (CPU, older GPUs, other dtypes). It keeps
  the activations exact, so it is also what the GPU paths are checked against.

`LRAGENT_FP8_GEMM` (read once, here: `FP8_GEMM`; `quantize_model_fp8(gemm=...)` overrides it) picks the routing:
"auto" (default) the Triton kernel up to `TRITON_MAX_ROWS` rows on CUDA, the rest as above; "torch" never the Triton
kernel (the previous behaviour, for comparisons); "triton" the Triton kernel for every input, any size and device
(benchmarks and tests; CPU tensors need TRITON_INTERPRET=1).

LoRA is untouched: adapters act on the activations and add their delta to the base output, whichever matmul made it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lragent.models.llama import CausalLM, DecoderLayer

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_MIN = 1e-12  # floor of a scale: an all-zero row gets a finite, positive one (zeros are exact at any scale)
# inputs of at most this many rows (tokens) take the Triton W8A16 kernel under "auto": decode batches, where reading
# the weights bounds the step; above it the kernel's M tiles re-read the weights and the FP8 GEMM wins
TRITON_MAX_ROWS = 32
FP8_GEMMS = ("auto", "torch", "triton")
FP8_GEMM = os.environ.get("LRAGENT_FP8_GEMM", "auto")
if FP8_GEMM not in FP8_GEMMS:
    raise ValueError(f"LRAGENT_FP8_GEMM must be one of {', '.join(FP8_GEMMS)}, got {FP8_GEMM!r}")
# a decode row's gate/up GEMV computes the residual add + RMSNorm before it (LRAGENT_FP8_NORM_PROLOGUE=0: the norm
# kernel runs first, as for bf16 weights)
NORM_PROLOGUE = os.environ.get("LRAGENT_FP8_NORM_PROLOGUE", "1") == "1"
# (module holding them, projections in row order, attribute of their fused weight or None)
GROUPS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_weight"),
    ("self_attn", ("o_proj",), None),
    ("mlp", ("gate_proj", "up_proj"), "gate_up_weight"),
    ("mlp", ("down_proj",), None),
)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (FP8 weight [out, in], float32 scale [out]); round to nearest, saturating at +-448."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(SCALE_MIN)
    w8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8, scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight the FP8 values stand for, in `dtype` (computed in float32, rounded once)."""
    return (w8.float() * scale[:, None]).to(dtype)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantisation for `_scaled_mm`: [M, K] -> (FP8 [M, K], float32 scale [M, 1]).

    No clamp: |x / scale| <= 448 up to float rounding, and e4m3 rounds anything below 464 to 448."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp_min(SCALE_MIN) / FP8_MAX
    return (x / scale).to(FP8).contiguous(), scale


def triton_rows_for(gemm: str, device: torch.device) -> int:
    """Up to how many input rows a weight on `device` runs the Triton kernel under routing `gemm` (see FP8_GEMM)."""
    if gemm not in FP8_GEMMS:
        raise ValueError(f"fp8 gemm must be one of {', '.join(FP8_GEMMS)}, got {gemm!r}")
    if gemm == "triton":
        return sys.maxsize
    return TRITON_MAX_ROWS if gemm == "auto" and device.type == "cuda" else 0


def scaled_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` has a row-wise FP8 GEMM here: CUDA, compute capability >= 8.9, bf16 output."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight and its per-row scales, with its own matmul (`linear`), in place of a plain weight tensor."""

    data: torch.Tensor  # float8_e4m3fn [out, in], row-major
    scale: torch.Tensor  # float32 [out]
    dtype: torch.dtype  # the model dtype: the activations and the output
    scaled_mm: bool  # torch._scaled_mm (see `scaled_mm_supported`), else dequantise + F.linear
    triton_rows: int = 0  # inputs of at most this many rows run the Triton W8A16 kernel (0: never; `triton_rows_for`)

    @classmethod
    def of(cls, weight: torch.Tensor, scaled_mm: bool, triton_rows: int = 0) -> Fp8Weight:
        """Quantise `weight`; `scaled_mm` only where the GEMM takes its shape (both dims multiples of 16)."""
        w8, scale = quantize_fp8(weight)
        fits = weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
        return cls(w8, scale, weight.dtype, scaled_mm and fits, triton_rows)

    def rows(self, start: int, stop: int) -> Fp8Weight:
        """Output rows [start, stop) as views (a fused weight's projection shares its storage)."""
        fits = (stop - start) % 16 == 0
        return replace(
            self, data=self.data[start:stop], scale=self.scale[start:stop], scaled_mm=self.scaled_mm and fits
        )

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def linear_silu_mul(self, gate_up: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """linear(silu(gate) * up, bias) for gate_up [..., 2 * in] laid out [gate | up], in one launch: the Triton
        GEMV computes the activation as it loads x (`w8a16_linear(act="silu_mul")`, with `silu_mul`'s rounding),
        so the down projection of a decode step skips the SiLU kernel. None where that does not apply (more than
        one row, this weight not on the Triton path, the GEMV off, another width): the caller then runs `silu_mul`
        and `linear` as before."""
        if not self.triton_rows or gate_up.shape[-1] != 2 * self.data.shape[1] or gate_up.dtype != self.dtype:
            return None
        from lragent.kernels.triton_fp8 import can_fuse_act, w8a16_linear  # imports Triton: only where it runs

        if not can_fuse_act(gate_up, "silu_mul"):
            return None
        return w8a16_linear(gate_up, self.data, self.scale, bias, self.dtype, act="silu_mul")

    def linear_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(linear(RMSNorm(x + residual) * norm_weight), x + residual) in one launch: the Triton GEMV adds and
        normalises the row as it loads it (`w8a16_add_rms_norm_linear`, with `add_rms_norm`'s roundings), so the
        gate/up projection of a decode step skips the norm kernel. None where that does not apply (more than one
        row, this weight not on the Triton path, the GEMV off, another width or dtype)."""
        if not (NORM_PROLOGUE and self.triton_rows) or x.shape[-1] != self.data.shape[1] or x.dtype != self.dtype:
            return None
        from lragent.kernels.triton_fp8 import can_fuse_add_norm, w8a16_add_rms_norm_linear

        if not can_fuse_add_norm(x, residual):
            return None
        return w8a16_add_rms_norm_linear(x, residual, norm_weight, eps, self.data, self.scale)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in the model dtype, as F.linear(x, W, bias) with W the dequantised weight."""
        if self.triton_rows and x.numel() <= self.triton_rows * x.shape[-1]:  # at most `triton_rows` rows
            from lragent.kernels.triton_fp8 import w8a16_linear  # imports Triton: only where it runs

            return w8a16_linear(x, self.data, self.scale, bias, self.dtype)
        if not self.scaled_mm:
            return F.linear(x, dequantize_fp8(self.data, self.scale, self.dtype), bias)
        x2 = x.reshape(-1, x.shape[-1])
        x8, x_scale = quantize_rows_fp8(x2)
        # mat2 must be column-major: the transpose of the row-major [out, in] weight is, without a copy
        out = torch._scaled_mm(x8, self.data.t(), x_scale, self.scale.view(1, -1), out_dtype=self.dtype)
        if bias is not None:  # added here rather than in the GEMM: its bias support varies across torch versions
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])


class Fp8Linear(nn.Module):
    """nn.Linear's forward over an `Fp8Weight`; the bias (if any) stays in the model dtype."""

    bias: torch.Tensor | None  # a buffer (moves with the module), not saved

    def __init__(self, weight: Fp8Weight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight  # not a tensor: no parameter, not in the state dict (nothing saves after loading)
        self.register_buffer("bias", bias, persistent=False)
        self.out_features, self.in_features = weight.data.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        path = "scaled_mm" if self.weight.scaled_mm else "dequant"
        if self.weight.triton_rows >= sys.maxsize:
            path = "triton w8a16"
        elif self.weight.triton_rows:
            path = f"triton w8a16 up to {self.weight.triton_rows} rows, else {path}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 ({path})"


def quantize_model_fp8(model: CausalLM, scaled_mm: bool | None = None, gemm: str | None = None) -> int:
    """Swap every decoder layer's q/k/v/o and gate/up/down projections for `Fp8Linear` (embeddings, LM head and
    norms keep the model dtype), fused weights included; returns the bytes saved and logs them.

    Run after `CausalLM.fuse_projections` when the layers are fused: the fused weight is quantised once (per-row
    scales make that the same as quantising each projection) and the projections become row views of it.
    `scaled_mm` None: chosen from the device and dtype (`scaled_mm_supported`); False forces the reference path.
    `gemm` (default `FP8_GEMM`): when the Triton W8A16 kernel runs instead ("auto", "torch", "triton")."""
    params = next(model.parameters())
    if scaled_mm is None:
        scaled_mm = scaled_mm_supported(params.device, params.dtype)
    triton_rows = triton_rows_for(gemm or FP8_GEMM, params.device)
    before = after = count = 0
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        for owner_name, names, fused in GROUPS:
            owner = getattr(layer, owner_name)
            linears = [getattr(owner, n) for n in names]
            if not all(isinstance(m, nn.Linear) for m in linears):
                continue  # quantised already
            before += sum(m.weight.numel() * m.weight.element_size() for m in linears)
            modules, nbytes = _quantize_group(owner, linears, fused, scaled_mm, triton_rows)
            for name, module in zip(names, modules):
                setattr(owner, name, module)
            after, count = after + nbytes, count + len(modules)
    _log_saved(count, before, after, scaled_mm, triton_rows)
    return before - after


def _quantize_group(
    owner: nn.Module, linears: list[nn.Linear], fused: str | None, scaled_mm: bool, triton_rows: int
) -> tuple[list[Fp8Linear], int]:
    """The FP8 modules of projections that read the same input, and their bytes; where the layer holds their fused
    weight, that is replaced by its FP8 form and the modules are row views of it."""
    if fused is None or getattr(owner, fused) is None:
        modules = [Fp8Linear(Fp8Weight.of(m.weight, scaled_mm, triton_rows), m.bias) for m in linears]
        return modules, sum(m.weight.nbytes for m in modules)
    fp8 = Fp8Weight.of(getattr(owner, fused), scaled_mm, triton_rows)
    setattr(owner, fused, fp8)  # the layer's fused path calls fp8.linear (lragent.models.llama.linear)
    modules, row = [], 0
    for m in linears:  # biases stay views into the fused bias, which the fused path reads
        n = m.weight.shape[0]
        modules.append(Fp8Linear(fp8.rows(row, row + n), m.bias))
        row += n
    return modules, fp8.nbytes


def _log_saved(count: int, before: int, after: int, scaled_mm: bool, triton_rows: int) -> None:
    path = "torch._scaled_mm (row-wise)" if scaled_mm else "dequantise + F.linear"
    if triton_rows >= sys.maxsize:
        path = "triton w8a16"
    elif triton_rows:
        path = f"triton w8a16 up to {triton_rows} rows, else {path}"
    mib = 2**20
    logger.info(
        "fp8 weights: %d projections, %.1f MiB -> %.1f MiB (%.1f MiB saved); matmul: %s",
        count,
        before / mib,
        after / mib,
        (before - after) / mib,
        path,
    )

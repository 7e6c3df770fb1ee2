"""Weight transforms run once the model is loaded (`EngineConfig.quantization`); the layers call whatever matmul
the transformed modules carry, so the model code stays as it is."""

from __future__ import annotations

from lragent.config import QUANTIZATIONS
from lragent.models.llama import CausalLM
from lragent.quant.fp8 import Fp8Linear, Fp8Weight, dequantize_fp8, quantize_fp8, quantize_model_fp8

__all__ = ["Fp8Linear", "Fp8Weight", "dequantize_fp8", "quantize_fp8", "quantize_model", "quantize_model_fp8"]


def quantize_model(model: CausalLM, quantization: str) -> int:
    """Apply `quantization` ("fp8") to the model in place; returns the bytes of weight memory saved."""
    if quantization == "fp8":
        return quantize_model_fp8(model)
    raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")

"""Attention backends: the PyTorch reference (CPU, exact) and Triton kernels on NVIDIA GPUs."""

from __future__ import annotations

import torch

from lragent.kernels.backend import AttentionBackend
from lragent.kernels.reference import TorchReferenceBackend


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("torch", "reference") or (name == "auto" and device.type != "cuda"):
        return TorchReferenceBackend()
    if name in ("triton", "auto"):
        try:
            from lragent.kernels.triton_backend import TritonBackend
        except ImportError:
            if name == "triton":
                raise
            return TorchReferenceBackend()
        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose torch, triton or auto")

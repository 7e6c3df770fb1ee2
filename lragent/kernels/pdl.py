"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel
before it in the stream is still running, and waits (`gdc_wait`) only where it reads that kernel's output.

At batch-1 decode a step is hundreds of short kernels, each paying its launch and memory ramp before streaming a
few megabytes. A weight-streaming kernel (the FP8 GEMV) reads its weights, which no earlier kernel writes, so with
PDL it issues its first weight loads while the kernel producing its activation row finishes, and waits only before
loading that row. The producer lets it launch early by calling `gdc_launch_dependents` at its start (a no-op when
the next kernel is launched normally). Every store of a PDL-launched kernel comes after its wait, so it never
writes memory the still-running producer may read.

`pdl_enabled(device)` is the one switch: CUDA, compute capability >= 9, a Triton with the grid-dependency
intrinsics, and LRAGENT_PDL not "0". Kernels take a `PDL` constexpr and call the wrappers below only when it is set
(the interpreter never sees them); launches add `launch_pdl=True` only when it is set.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lragent.config import hopper_or_newer

_CUDA_EXTRA = getattr(getattr(tl, "extra", None), "cuda", None)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs programs one by one: nothing to wait for
HAS_GDC = hasattr(_CUDA_EXTRA, "gdc_wait") and hasattr(_CUDA_EXTRA, "gdc_launch_dependents") and not _INTERPRET
ENABLED = os.environ.get("LRAGENT_PDL", "1") != "0"


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (see the module doc)."""
    return ENABLED and HAS_GDC and hopper_or_newer(device)


def launch_options(pdl: bool) -> dict[str, bool]:
    """The launch keyword that makes a kernel PDL-launched (empty without: older Tritons do not know it)."""
    return {"launch_pdl": True} if pdl else {}


if HAS_GDC:

    @triton.jit
    def gdc_wait():
        """Block until the previous kernel in the stream has completed and its writes are visible."""
        tl.extra.cuda.gdc_wait()

    @triton.jit
    def gdc_launch_dependents():
        """Let the next kernel (if PDL-launched) start now; it still waits for this one before reading its output."""
        tl.extra.cuda.gdc_launch_dependents()

else:  # the interpreter (a kernel's PDL form still runs there, tests) or a Triton without the intrinsics

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

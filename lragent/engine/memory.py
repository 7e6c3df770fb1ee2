"""Releasing an engine's memory, and accounting for what this process's caching allocator already holds.

PyTorch's caching allocator keeps the memory of freed tensors reserved for reuse: after an engine is dropped, an
H200 stayed at 40-50 GiB reserved with 0.1 GiB allocated, and a second engine sized by `gpu_memory_utilization`
saw too little free memory. The engine's `close()` drops its components (`release_attributes`) and then hands the
cached memory back to the driver (`release_cached_memory`); the start-up budget measures what is in use only after
the same release (`device_memory_in_use`), so it comes out the same whether or not an earlier engine ran here.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Iterable
from typing import NoReturn

import torch

logger = logging.getLogger(__name__)

ENGINE_CLOSED = "the engine is closed"
_UNRELEASED_LOG_BYTES = 256 << 20  # cached memory the release could not hand back, worth a line in the log


class Released:
    """Stands in for a component that `close()` dropped.

    Any use of it raises one clear RuntimeError, so a step or request after `close()` fails with "the engine is
    closed" instead of an AttributeError on None somewhere inside the scheduler or the model runner.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(ENGINE_CLOSED)

    def __repr__(self) -> str:
        return "<released: the engine is closed>"


RELEASED = Released()


def release_attributes(owner: object, names: Iterable[str]) -> None:
    """Replace each named attribute of `owner` by `RELEASED`, dropping its reference to the component.

    Replacing rather than deleting keeps the error clear (see `Released`); names `owner` never set (an engine whose
    `__init__` failed half-way) are set too, so a later use of them still says the engine is closed.
    """
    for name in names:
        setattr(owner, name, RELEASED)


def held_only_by(holder: dict[str, object], key: str) -> bool:
    """Whether `holder[key]` is referenced from nowhere but `holder` (an object's `__dict__`).

    `LLM.__del__` closes its engine only then: code that kept the engine (`engine = LLM(...).engine`, a server loop
    built on it) must not find it closed. The count is compared with that of a fresh object held the same way, so
    the references the lookup itself adds cancel out whatever the interpreter version.
    """
    probe = {key: object()}
    return sys.getrefcount(holder[key]) <= sys.getrefcount(probe[key])


def capturing() -> bool:
    """Whether this thread is capturing a CUDA graph: a device synchronize then would invalidate the capture."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def release_cached_memory(device: torch.device) -> None:
    """Hand the memory the caching allocator holds but no tensor uses back to the driver.

    Synchronize so no queued kernel still uses a freed block; collect, since a component caught in a reference
    cycle (modules, graphs, tracebacks) is only freed by the cycle collector, and until then its blocks cannot be
    handed back. On the CPU freed memory goes straight back to the process's heap, so nothing is done. Nor while a
    CUDA graph is being captured on this thread (an engine dropped by a collection that ran inside a capture):
    synchronizing would break the capture, and the memory is handed back at the next release or budget.
    """
    if device.type != "cuda" or capturing():
        return
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()


def device_memory_in_use(device: torch.device) -> tuple[int, int]:
    """(bytes in use on the CUDA device, its total bytes), measured after `release_cached_memory`.

    The budget used to count the allocator's slack (reserved - allocated) as free. It is not free to the KV pools:
    what `empty_cache` cannot hand back lies in segments that also hold live tensors (fragments, where only small
    allocations fit) or in the private memory pools of CUDA graphs still alive (no ordinary allocation may use
    them), and the pools are a few large allocations that need fresh segments. What *can* be handed back (an earlier
    engine's memory, still cached) is, first, so the driver reports it free. Counting everything the driver then
    reports as used (weights, adapters, the CUDA context, other processes, those fragments and pools) gives the
    same budget to every engine started in this process after the earlier ones were closed.
    """
    release_cached_memory(device)
    free, total = torch.cuda.mem_get_info(device)
    kept = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if kept > _UNRELEASED_LOG_BYTES:
        logger.info(
            "%.2f GiB cached by this process could not be handed back (fragments of live segments, graph pools); "
            "counted as in use",
            kept / 2**30,
        )
    return total - free, total

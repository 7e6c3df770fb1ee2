"""Which engine option keeps an engine's KV cache alive after `close()` on CUDA (GPU; tiny random Llama).

For each variant, build an engine, generate, close it, and report what the caching allocator still holds and, for a
cache tensor still alive, the chain of objects that refer to it.

    python3 benchmarks/release_probe.py
"""

from __future__ import annotations

import gc
import sys
import tempfile
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_tiny_llama  # noqa: E402

from lragent import LLM, SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = {
    "default": {},
    "no async": {"async_scheduling": False},
    "no cascade": {"cascade_decode": False},
    "neither": {"async_scheduling": False, "cascade_decode": False},
    "eager": {"enforce_eager": True, "async_scheduling": False, "cascade_decode": False},
    "default, outputs and stats kept": {"keep": True},
    "default, 0.5 of the card, outputs and stats kept": {"keep": True, "gpu_memory_utilization": 0.5},
}


def chain(obj: object, depth: int = 4, seen: set[int] | None = None, indent: str = "  ") -> None:
    """Print the referrers of `obj`, `depth` levels up (frames and this module's lists skipped)."""
    seen = seen if seen is not None else {id(obj)}
    if depth == 0:
        return
    for ref in gc.get_referrers(obj):
        if id(ref) in seen or type(ref).__name__ in ("frame", "list_iterator") or ref is VARIANTS:
            continue
        seen.add(id(ref))
        desc = list(ref.keys())[:12] if isinstance(ref, dict) else repr(ref)[:160]
        print(f"{indent}{type(ref).__module__}.{type(ref).__name__}: {desc}", flush=True)
        chain(ref, depth - 1, seen, indent + "  ")


def _engine(folder: str, adapters: dict[str, str], **options: object) -> LLM:
    """The engine of tests/test_engine_release.py's budget test (tiny model, pages of 8, graphs up to 8 rows)."""
    return LLM(
        model=folder,
        adapters=adapters,
        sharing="base_shared",
        block_size=8,
        warmup=False,
        device=DEVICE,
        max_model_len=512,
        max_num_seqs=8,
        cuda_graph_max_batch=8,
        **options,
    )


def main() -> None:
    folder, adapters = write_tiny_llama(Path(tempfile.mkdtemp()))
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    for name, variant in VARIANTS.items():
        options = {"gpu_memory_utilization": 0.3, **variant}
        keep = options.pop("keep", False)
        llm = _engine(folder, adapters, **options)
        outs = llm.generate([[1, 2, 3], [4, 5, 6]], adapter=["plan", "action"], sampling_params=greedy)
        kept = [outs, llm.cache_stats()] if keep else []  # as the budget test holds them across close()
        del outs
        tensors = [weakref.ref(t) for t in vars(llm.engine.cache).values() if isinstance(t, torch.Tensor)]
        cache = weakref.ref(llm.engine.cache)
        llm.close()
        gc.collect()
        reserved = torch.cuda.memory_reserved() / 2**30
        allocated = torch.cuda.memory_allocated() / 2**30
        print(
            f"{name}: after close reserved {reserved:.2f} GiB, allocated {allocated:.2f} GiB, "
            f"cache object alive {cache() is not None}, tensors alive {sum(r() is not None for r in tensors)}"
            f"/{len(tensors)}",
            flush=True,
        )
        live = cache() if cache() is not None else next((r() for r in tensors if r() is not None), None)
        if live is not None:
            chain(live)
        kept.clear()
        del live, llm
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  after dropping the LLM: reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB", flush=True)


def three_in_a_row(folder: str, adapters: dict[str, str]) -> None:
    """tests/test_engine_release.py::test_three_engines_in_a_row_get_the_same_budget, printing what it measures."""
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    for i in range(3):
        with _engine(folder, adapters, gpu_memory_utilization=0.5) as llm:
            llm.generate([[1, 2, 3], [4, 5, 6]], adapter=["plan", "action"], sampling_params=greedy)
            budget = llm.cache_stats()["bytes_allocated"] / 2**30
            cache = weakref.ref(llm.engine.cache)
        reserved = torch.cuda.memory_reserved() / 2**30
        print(
            f"engine {i}: budget {budget:.2f} GiB, after close reserved {reserved:.2f} GiB, "
            f"cache alive {cache() is not None}",
            flush=True,
        )
        if cache() is not None:
            chain(cache())


if __name__ == "__main__":
    main()
    three_in_a_row(*write_tiny_llama(Path(tempfile.mkdtemp())))

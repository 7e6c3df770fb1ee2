"""Agents taking turns on one growing trajectory, compared exactly: what the scheme tests (stacked_lr, key
adapters, droidspeak) share. Engines run in float32 with a fixed small cache and no warm-up, so the same tests run
exactly on the CPU and on a GPU shared by several test processes."""

from __future__ import annotations

import math

import torch

from lragent import LLM, SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs interpreted on the CPU (conftest.py)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PREFIX = [(7 * i + 3) % 997 + 1 for i in range(70)]
ROLES = ("plan", "action", "reflect")


def exact_llm(model: str, adapters: dict[str, str], sharing: str, block_size: int = 8, **kw) -> LLM:
    kw.setdefault("device", DEV)
    kw.setdefault("dtype", "float32")  # exact comparisons, also on a GPU
    kw.setdefault("warmup", False)
    kw.setdefault("kv_cache_bytes", 64 << 20)  # not a share of the GPU: test processes run side by side there
    return LLM(model=model, adapters=adapters, sharing=sharing, block_size=block_size, **kw)


def run_turns(llm: LLM, roles=ROLES, params: SamplingParams = GREEDY) -> list:
    """plan -> action -> reflect over one growing trajectory (each reads everything the others wrote)."""
    traj, outs = list(PREFIX), []
    for i, role in enumerate(roles):
        out = llm.generate([traj], adapter=role, sampling_params=params)[0]
        outs.append(out)
        traj = traj + out.token_ids + [100 + i] * 5
    return outs


def same_outputs(got, want) -> bool:
    """Greedy tokens equal and log-probs equal up to float32 summation order."""
    return got.token_ids == want.token_ids and all(
        math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got.logprobs, want.logprobs)
    )

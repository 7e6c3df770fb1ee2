"""Role adapters shipped with lragent: standard PEFT folders ``<set>/<role>/`` indexed by ``manifest.json``.

Sets (SmolLM2-135M-Instruct, LoRA r 8, alpha 16 on q_proj and v_proj, fp16 weights):

- ``hotpotqa-independent``: plan, action and reflect each with their own A and B.
- ``hotpotqa-shared-a``: the paper's recipe; plan is the independent plan, action and reflect were trained with
  plan's v_proj ``lora_A`` frozen, so v_proj A is bitwise identical across the three roles (BaseLRShared needs it).
- ``scienceqa-independent`` / ``scienceqa-shared-a``: the same two recipes on the ScienceQA trajectories, trained on
  a 2-core CPU (45 steps of 4 x 576 tokens per role, float32, 35 minutes for both sets; see
  ``scripts/train_adapters.sh``), so shorter-trained than the HotpotQA sets (200 steps of 8 x 1024 on an H200).

Each set folder also holds ``train_log.json`` (settings, loss per step, time, machine), ``loss_curve.png`` and
``samples.json`` (greedy outputs on training prompts). Reproduce with ``scripts/train_adapters.sh``; the prompt format
the adapters expect is :mod:`lragent.train.data`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lragent.train.data import ROLES

ADAPTERS_DIR = Path(__file__).resolve().parent


def manifest() -> dict[str, dict[str, Any]]:
    """Set name -> {task, mode, model, roles, rank, alpha, targets, shared_a_modules, trained: per-role losses}."""
    return json.loads((ADAPTERS_DIR / "manifest.json").read_text())


def set_name(task: str, shared_a: bool) -> str:
    """The shipped set of ``task``: ``<task>-shared-a`` or ``<task>-independent``."""
    return f"{task}-{'shared-a' if shared_a else 'independent'}"


def adapter_dir(set_name: str, role: str) -> Path:
    """Folder of one shipped adapter (adapter_config.json + adapter_model.safetensors)."""
    path = ADAPTERS_DIR / set_name / role
    if not (path / "adapter_config.json").is_file():
        known = sorted(p.name for p in ADAPTERS_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise FileNotFoundError(f"no shipped adapter {set_name}/{role}; sets: {known}, roles: {ROLES}")
    return path


def adapter_set(set_name: str) -> dict[str, Path]:
    """Role -> folder for every role of a shipped set."""
    return {role: adapter_dir(set_name, role) for role in ROLES if (ADAPTERS_DIR / set_name / role).is_dir()}

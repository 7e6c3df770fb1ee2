"""Shared fixtures: the embedded model folder and random PEFT adapters written in PEFT's own file format."""

from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread: the models here are small, and on a 2-core CI runner shared with a server subprocess, OpenMP
# threads that spin against each other made decode steps ~10x slower (measured on this machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels run interpreted on the CPU; the variable must be set before any module defines a @triton.jit
    # kernel, and test modules are imported in file order (test_cuda_graphs imports the LoRA kernels first)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lragent.bench.adapters import write_peft_adapter, write_random_llama  # noqa: E402
from lragent.model_config import ModelConfig  # noqa: E402
from lragent.models.hub import resolve_model  # noqa: E402

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def model_config(model_dir) -> ModelConfig:
    return ModelConfig.from_file(model_dir / "config.json")


@pytest.fixture(scope="session")
def qv_adapters(tmp_path_factory, model_config) -> dict[str, str]:
    """Three independent q/v role adapters (different A and B)."""
    root = tmp_path_factory.mktemp("qv")
    return {
        role: str(write_peft_adapter(root / role, model_config, ("q_proj", "v_proj"), seed=i))
        for i, role in enumerate(("plan", "action", "reflect"))
    }


@pytest.fixture(scope="session")
def shared_a_adapters(tmp_path_factory, model_config) -> dict[str, str]:
    """Three q/v role adapters whose v_proj A is one shared matrix per layer."""
    root = tmp_path_factory.mktemp("shared_a")
    shared: dict[int, torch.Tensor] = {}
    return {
        role: str(
            write_peft_adapter(root / role, model_config, ("q_proj", "v_proj"), seed=10 + i, shared_value_a=shared)
        )
        for i, role in enumerate(("plan", "action", "reflect"))
    }


@pytest.fixture(scope="session")
def all_module_adapters(tmp_path_factory, model_config) -> dict[str, str]:
    root = tmp_path_factory.mktemp("all")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {
        role: str(write_peft_adapter(root / role, model_config, targets, rank=4 + 4 * i, seed=20 + i, b_scale=0.025))
        for i, role in enumerate(("plan", "action"))
    }


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A 2-layer random Llama with SmolLM2's kv geometry (3 kv heads x 64), plus three q/v adapters: for tests
    whose point is cache bookkeeping over long contexts, not the embedded model's outputs."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def write_tiny_llama(root, layers: int = 2, seed: int = 30, b_scale: float = 0.05) -> tuple[str, dict[str, str]]:
    """`tiny_llama`'s model with `layers` layers under `root`, and its plan / action / reflect q/v adapters."""
    config = write_random_llama(
        root / "model",
        vocab_size=1000,
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    adapters = {
        role: str(write_peft_adapter(root / role, config, ("q_proj", "v_proj"), seed=seed + i, b_scale=b_scale))
        for i, role in enumerate(("plan", "action", "reflect"))
    }
    return str(root / "model"), adapters

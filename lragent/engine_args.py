"""Engine options on the command line: one definition for every subcommand that builds an engine."""

from __future__ import annotations

import argparse
import re

from lragent.cache.sharing import SharingMode
from lragent.config import EngineConfig

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M', '1.5G', '1048576' -> bytes (binary units)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1048576)")
    scale = 1 << (10 * "KMGT".find(match[2].upper()) + 10) if match[2] else 1
    return int(float(match[1]) * scale)


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects NAME=PATH, got {text!r}")
    return name, path


def add_engine_args(p: argparse.ArgumentParser, default_sharing: str = SharingMode.BASE_LR_SHARED.value) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF folder, .gguf or dummy:<preset>")
    p.add_argument(
        "--adapter",
        action="append",
        type=parse_adapter,
        default=[],
        metavar="NAME=PATH",
        help="a PEFT LoRA folder served under NAME (repeatable)",
    )
    p.add_argument("--sharing", default=default_sharing, choices=[m.value for m in SharingMode])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--kv-cache-bytes", type=parse_size, default=None, help="KV cache budget, e.g. 512M (default: 1G on CPU)"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-loras", type=int, default=None, help="adapter slots (default: loaded + 4)")
    p.add_argument("--max-lora-rank", type=int, default=None)
    p.add_argument("--allow-unshared-a", action="store_true", help="base_lr_shared without shared-A (less accurate)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode steps without CUDA graphs")
    p.add_argument("--cuda-graph-max-batch", type=int, default=256, help="largest decode batch captured as a graph")
    p.add_argument("--seed", type=int, default=0)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        adapters=dict(args.adapter),
        sharing=args.sharing,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        allow_unshared_a=args.allow_unshared_a,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        seed=args.seed,
    )

"""Engine options on the command line: one definition for every subcommand that builds an engine."""

from __future__ import annotations

import argparse
import json
import re

from lragent.cache.sharing import SharingMode
from lragent.config import QUANTIZATIONS, SHARING_AUTO, EngineConfig, canonical_dtype

DEFAULT_MODEL = "smollm2-135m-instruct"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M', '1.5G', '1048576' -> bytes (binary units)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1048576)")
    scale = 1 << (10 * "KMGT".find(match[2].upper()) + 10) if match[2] else 1
    return int(float(match[1]) * scale)


def parse_adapter(text: str) -> tuple[str, str]:
    """'NAME=PATH', or vLLM's JSON form '{"name": NAME, "path": PATH, ...}' -> (NAME, PATH)."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
            name, path = spec["name"], spec["path"]
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f'expected {{"name": NAME, "path": PATH}}, got {text!r}') from None
        if isinstance(name, str) and isinstance(path, str) and name and path:
            return name, path
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter / --lora-modules expect NAME=PATH, got {text!r}")
    return name, path


def parse_dtype(text: str) -> str:
    """A dtype flag: vLLM / PyTorch names ('half', 'bf16', 'float', 'auto', ...) -> the canonical name."""
    try:
        return canonical_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is none to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def add_engine_args(p: argparse.ArgumentParser, default_sharing: str = SHARING_AUTO) -> None:
    """The engine flags (vLLM's names where vLLM has the option). `p` should use `HelpFormatter` to show defaults."""
    _add_model_args(p)
    _add_placement_args(p, default_sharing)
    _add_memory_args(p)
    _add_limit_args(p)
    _add_execution_args(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and the LoRA adapters to serve."""
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="embedded name, Hugging Face folder, .gguf file or dummy:<preset>"
    )
    p.add_argument(
        "--tokenizer", default=None, help="an HF tokenizer folder instead of the model's own (default: the model's)"
    )
    p.add_argument(
        "--adapter",
        action="append",
        type=parse_adapter,
        default=[],
        metavar="NAME=PATH",
        help="a PEFT LoRA folder served under NAME (repeatable)",
    )
    p.add_argument(
        "--lora-modules",
        dest="adapter",
        action="extend",
        nargs="+",
        type=parse_adapter,
        metavar="NAME=PATH",
        help='vLLM\'s spelling of --adapter: one or more NAME=PATH (or {"name": ..., "path": ...}), repeatable',
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="accepted for vLLM compatibility and ignored: LoRA adapters are always enabled",
    )


def _add_placement_args(p: argparse.ArgumentParser, default_sharing: str) -> None:
    """The KV sharing scheme, the device and the dtype."""
    p.add_argument(
        "--sharing",
        default=default_sharing,
        choices=[SHARING_AUTO, *(m.value for m in SharingMode)],
        help="KV sharing scheme; auto: base_lr_shared when the adapters share their v_proj A, else base_shared "
        "(non_shared for k_proj adapters), logged at start",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when a GPU is visible)")
    p.add_argument(
        "--dtype",
        type=parse_dtype,
        default="auto",
        help="auto (float32 on CPU, bfloat16 on CUDA), float32/float/fp32, bfloat16/bf16, float16/half/fp16",
    )
    p.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=QUANTIZATIONS,
        help="fp8: decoder projection weights in FP8 with per-channel scales, quantised at load (default: none)",
    )


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    """The KV cache budget (in bytes, or as a fraction of the GPU) and its block size."""
    p.add_argument(
        "--kv-cache-bytes",
        "--kv-cache-memory-bytes",
        dest="kv_cache_bytes",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="KV cache budget, e.g. 512M or 2G (default: 1G on CPU; on CUDA what --gpu-memory-utilization leaves)",
    )
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="CUDA: fraction of the card the engine may use"
    )
    p.add_argument(
        "--block-size", type=int, default=0, help="tokens per KV cache block (a power of two; 0: 64 on Hopper, else 16)"
    )


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """Sequence, batch and adapter limits."""
    p.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per engine step")
    p.add_argument("--max-loras", type=int, default=None, help="adapter slots (default: loaded + 4)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: the loaded max)")
    p.add_argument("--allow-unshared-a", action="store_true", help="base_lr_shared without shared-A (less accurate)")
    p.add_argument(
        "--key-lora",
        action="store_true",
        help="base_shared / base_lr_shared: room for k_proj adapters loaded later (on when one is given at start)",
    )
    p.add_argument(
        "--critical-layers",
        default=None,
        metavar="LAYERS",
        help="droidspeak: the layers each agent recomputes, e.g. 0,2,16 ('none': no layer); default: the paper's set "
        "for the Llama-3.1-8B shape, else every third layer (`lragent bench droidspeak-layers` measures a set)",
    )


def _add_execution_args(p: argparse.ArgumentParser) -> None:
    """Kernels, CUDA graphs and the sampling seed."""
    p.add_argument("--attention-backend", default="auto", help="auto, torch (reference) or triton")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode steps without CUDA graphs")
    p.add_argument("--cuda-graph-max-batch", type=int, default=256, help="largest decode batch captured as a graph")
    p.add_argument(
        "--cuda-graph-prefill-tokens",
        type=int,
        default=512,
        help="prefill steps of up to this many tokens replay a captured graph (0: prefill runs eagerly)",
    )
    p.add_argument(
        "--cascade-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="triton: decode rows sharing >= 1024 cached prefix tokens read them once per step (in the CUDA graphs; "
        "default: on for CUDA)",
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        default=None,
        help="CUDA: skip the start-up warm-up (kernels then compile, and graphs capture, inside the first requests)",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode one step ahead, the next step launched before this one's tokens reach the host (default: on "
        "for CUDA without tensor parallelism)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of unseeded requests' sampling")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split the model's heads and MLP over this many devices, one process each (NCCL on GPUs, gloo on CPU)",
    )


def add_model_positional(p: argparse.ArgumentParser) -> None:
    """`lragent serve MODEL` (vLLM's shape); `--model` keeps working."""
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the base model, as --model")


def model_from_args(args: argparse.Namespace) -> str:
    """The base model of MODEL (positional) and --model; ValueError when they name two different models."""
    tag = getattr(args, "model_tag", None)
    if tag is None:
        return args.model
    if args.model not in (DEFAULT_MODEL, tag):
        raise ValueError(f"two models given: MODEL {tag!r} and --model {args.model!r}")
    return tag


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=model_from_args(args),
        adapters=dict(args.adapter),
        tokenizer=args.tokenizer,
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
        key_lora=args.key_lora,
        critical_layers=getattr(args, "critical_layers", None),
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        cuda_graph_prefill_tokens=getattr(args, "cuda_graph_prefill_tokens", 512),
        cascade_decode=getattr(args, "cascade_decode", None),
        warmup=args.warmup,
        async_scheduling=getattr(args, "async_scheduling", None),
        seed=args.seed,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        quantization=getattr(args, "quantization", None),
    )

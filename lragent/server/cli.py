"""`lragent serve`: an OpenAI-compatible server over one engine.

    lragent serve --model smollm2-135m-instruct --adapter plan=PATH --adapter action=PATH \\
        --sharing base_lr_shared --host 127.0.0.1 --port 8000 [--api-key KEY]
    lragent serve --adapter-set hotpotqa-shared-a          # the shipped plan/action/reflect adapters
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from lragent.cache.sharing import SharingMode

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


def build_parser(prog: str = "lragent serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve LoRA agents over the OpenAI API with a shared KV cache.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF folder, .gguf or dummy:<preset>")
    p.add_argument(
        "--adapter",
        action="append",
        type=parse_adapter,
        default=[],
        metavar="NAME=PATH",
        help="a PEFT LoRA folder served under NAME (repeatable)",
    )
    p.add_argument(
        "--adapter-set", default=None, metavar="SET", help="serve every role of a shipped set, e.g. hotpotqa-shared-a"
    )
    p.add_argument("--sharing", default=SharingMode.BASE_LR_SHARED.value, choices=[m.value for m in SharingMode])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-body-bytes", type=parse_size, default=16 << 20)
    p.add_argument("--disable-runtime-lora", action="store_true", help="refuse /v1/load_lora_adapter and unload")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def engine_config(args: argparse.Namespace):
    from lragent.config import EngineConfig

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
        seed=args.seed,
    )


def server_settings(args: argparse.Namespace):
    from lragent.server.app import ServerSettings

    return ServerSettings(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        allow_runtime_lora=not args.disable_runtime_lora,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.adapter_set:
        try:
            from lragent.adapters import adapter_set

            shipped = adapter_set(args.adapter_set)
            if not shipped:
                raise FileNotFoundError("no such shipped set (see lragent/adapters/manifest.json)")
            args.adapter = [(role, str(path)) for role, path in shipped.items()] + args.adapter
        except (ImportError, OSError) as exc:
            print(f"error: adapter set {args.adapter_set!r}: {exc}", file=sys.stderr)
            return 2
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        print("error: an adapter name is given twice", file=sys.stderr)
        return 2
    try:
        config = engine_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from lragent.engine.llm_engine import LLMEngine
    from lragent.server.app import create_app

    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(engine, server_settings(args))
    logging.getLogger("lragent.server").info(
        "serving %s (+ %d adapters: %s) with %s sharing on http://%s:%d/v1",
        args.served_model_name or args.model,
        len(names),
        ", ".join(names) or "none",
        args.sharing,
        args.host,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

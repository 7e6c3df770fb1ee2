"""`lragent serve`: an OpenAI-compatible server over one engine.

    lragent serve --model smollm2-135m-instruct --adapter plan=PATH --adapter action=PATH \\
        --sharing base_lr_shared --host 127.0.0.1 --port 8000 [--api-key KEY]
    lragent serve --adapter-set hotpotqa-shared-a          # the shipped plan/action/reflect adapters
"""

from __future__ import annotations

import argparse
import logging
import sys

from lragent.engine_args import add_engine_args, engine_config, parse_size


def build_parser(prog: str = "lragent serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve LoRA agents over the OpenAI API with a shared KV cache.")
    add_engine_args(p)
    p.add_argument(
        "--adapter-set", default=None, metavar="SET", help="serve every role of a shipped set, e.g. hotpotqa-shared-a"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
    p.add_argument("--max-body-bytes", type=parse_size, default=16 << 20)
    p.add_argument("--disable-runtime-lora", action="store_true", help="refuse /v1/load_lora_adapter and unload")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


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

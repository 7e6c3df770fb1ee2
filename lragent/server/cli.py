"""`lragent serve`: an OpenAI-compatible server over one engine.

    lragent serve smollm2-135m-instruct --adapter plan=PATH --adapter action=PATH \\
        --host 127.0.0.1 --port 8000 [--api-key KEY]          # sharing: auto (shared-A -> base_lr_shared)
    lragent serve MODEL --enable-lora --lora-modules plan=PATH action=PATH --dtype half   # vLLM's flag names
    lragent serve --adapter-set hotpotqa-shared-a          # the shipped plan/action/reflect adapters
    lragent serve --api-key KEY_A --api-key KEY_B --tenant-isolation \
        --enable-runtime-lora --lora-root /srv/adapters        # two tenants, adapters loadable from one folder
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from typing import TYPE_CHECKING

from lragent.engine_args import HelpFormatter, add_engine_args, add_model_positional, engine_config, parse_size

if TYPE_CHECKING:
    from lragent.config import EngineConfig
    from lragent.server.app import ServerSettings

SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client")  # the [server] extra


def build_parser(prog: str = "lragent serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve LoRA agents over the OpenAI API with a shared KV cache.",
        formatter_class=HelpFormatter,
    )
    add_model_positional(p)
    add_engine_args(p)
    _add_listen_args(p)
    _add_security_args(p)
    _add_api_args(p)
    _add_runtime_lora_args(p)
    _add_process_args(p)
    return p


def _add_listen_args(p: argparse.ArgumentParser) -> None:
    """--adapter-set, and where to listen."""
    p.add_argument(
        "--adapter-set", default=None, metavar="SET", help="serve every role of a shipped set, e.g. hotpotqa-shared-a"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")


def _add_security_args(p: argparse.ArgumentParser) -> None:
    """API keys and tenant isolation."""
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/*, /metrics and /openapi.json (repeatable: one per tenant)",
    )
    p.add_argument(
        "--tenant-isolation",
        action="store_true",
        help="derive the cache salt from the caller's API key: tenants share no cached prefix (needs --api-key)",
    )


def _add_api_args(p: argparse.ArgumentParser) -> None:
    """How the API names the model, parses tool calls, tracks sessions and bounds request bodies."""
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
    p.add_argument(
        "--tool-call-parser",
        default="hermes",
        choices=["hermes", "llama3_json", "mistral"],
        help="tool-call format of the model: hermes (Qwen2.5, Hermes, SmolLM2), llama3_json (Llama 3.1+), mistral",
    )
    p.add_argument(
        "--max-tracked-sessions",
        type=int,
        default=1000,
        metavar="N",
        help="session ids (X-Session-ID / session_id) with /metrics series of their own; older ones go to _other",
    )
    p.add_argument("--max-body-bytes", type=parse_size, default=16 << 20, help="largest request body, e.g. 16M")


def _add_runtime_lora_args(p: argparse.ArgumentParser) -> None:
    """Loading and unloading adapters at run time, and where from."""
    lora = p.add_mutually_exclusive_group()
    lora.add_argument(
        "--enable-runtime-lora",
        dest="runtime_lora",
        action="store_true",
        help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --lora-root)",
    )
    lora.add_argument(
        "--disable-runtime-lora", dest="runtime_lora", action="store_false", help="the default; kept for old scripts"
    )
    p.add_argument(
        "--lora-root",
        action="append",
        default=[],
        metavar="DIR",
        help="runtime adapter loads must resolve inside DIR (repeatable)",
    )


def _add_process_args(p: argparse.ArgumentParser) -> None:
    """Replicas, shutdown and logging."""
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="N > 1: N engine replicas on a Ray cluster (RAY_ADDRESS, else a local one) behind this API, "
        "with trajectory affinity (needs the [replicas] extra)",
    )
    p.add_argument(
        "--routing",
        default="affinity",
        choices=["affinity", "round_robin"],
        help="with --replicas: by session id / cached prefix, then load (affinity), or round_robin for contrast",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may run on before they are ended with an error",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="log verbosity"
    )


def server_settings(args: argparse.Namespace):
    """ServerSettings from the flags; ValueError for a combination that cannot be served safely."""
    from lragent.server.app import ServerSettings

    missing = [d for d in args.lora_root if not os.path.isdir(d)]
    if missing:
        raise ValueError(f"--lora-root {missing[0]!r} is not a directory")
    if args.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    return ServerSettings(
        served_model_name=args.served_model_name,
        api_keys=tuple(args.api_key),
        max_body_bytes=args.max_body_bytes,
        allow_runtime_lora=args.runtime_lora,
        lora_roots=tuple(args.lora_root),
        tenant_isolation=args.tenant_isolation,
        tool_call_parser=args.tool_call_parser,
        max_sessions=args.max_tracked_sessions,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]  # a library-only install
    if missing:
        print(f"error: `lragent serve` needs {', '.join(missing)}: pip install 'lragent[server]'", file=sys.stderr)
        return 1
    if args.adapter_set and not _add_adapter_set(args):
        return 2
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        print("error: an adapter name is given twice", file=sys.stderr)
        return 2
    try:
        config = engine_config(args)
        settings = server_settings(args)  # before the model loads: a bad flag fails fast
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.replicas > 1:
        return _serve_replicas(args, config, settings)
    return _serve(args, config, settings, names)


def _serve_replicas(args: argparse.Namespace, config: EngineConfig, settings: ServerSettings) -> int:
    """`--replicas N`: the engine replicas on Ray Serve (lragent/server/replicas.py)."""
    if importlib.util.find_spec("ray") is None:
        print("error: --replicas needs Ray Serve: pip install 'lragent[replicas]'", file=sys.stderr)
        return 1
    from lragent.server.replicas import serve_replicas

    gpus = 1.0 if str(config.device).startswith("cuda") else 0.0
    serve_replicas(config, settings, args.replicas, args.routing, args.host, args.port, gpus)
    return 0


def _add_adapter_set(args: argparse.Namespace) -> bool:
    """Put the adapters of the shipped set --adapter-set before the --adapter ones; False (after printing the
    error) when the set cannot be found or read."""
    try:
        from lragent.adapters import adapter_set

        shipped = adapter_set(args.adapter_set)
        if not shipped:
            raise FileNotFoundError("no such shipped set (see lragent/adapters/manifest.json)")
        args.adapter = [(role, str(path)) for role, path in shipped.items()] + args.adapter
    except (ImportError, OSError) as exc:
        print(f"error: adapter set {args.adapter_set!r}: {exc}", file=sys.stderr)
        return False
    return True


def _serve(args: argparse.Namespace, config: EngineConfig, settings: ServerSettings, names: list[str]) -> int:
    """Load the engine and serve it until shut down; the exit status."""
    import uvicorn

    from lragent.engine.llm_engine import LLMEngine
    from lragent.server.app import create_app
    from lragent.server.shutdown import SHUTTING_DOWN, GracefulServer

    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(engine, settings)
    logging.getLogger("lragent.server").info(
        "serving %s (+ %d adapters: %s) with %s sharing on http://%s:%d/v1",
        args.served_model_name or config.model,
        len(names),
        ", ".join(names) or "none",
        engine.scheme.mode.value,
        args.host,
        args.port,
    )
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    server = GracefulServer(
        uv_config,
        app.state.admission,
        lambda: app.state.engine_loop.fail_all_nowait(SHUTTING_DOWN, 503),
        args.shutdown_timeout,
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

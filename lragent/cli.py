"""`lragent` command line: generate, chat, serve, train, eval, analyze, demo, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from lragent.cache.sharing import SharingMode

# subcommands implemented in their own modules, each exposing `main(argv) -> int`
DELEGATED = {
    "serve": "lragent.server.cli",
    "train": "lragent.train.cli",
    "eval": "lragent.eval.cli",
    "analyze": "lragent.eval.analyze",
    "demo": "lragent.demo",
}
BENCHES = {"trace": "lragent.bench.trace", "kernels": "lragent.bench.kernels", "decode": "lragent.bench.decode"}


def parse_adapters(pairs: list[str]) -> dict[str, str]:
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter expects NAME=PATH, got {pair!r}")
        adapters[name] = path
    return adapters


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options shared by every subcommand that builds an `LLM`."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF folder, .gguf or dummy:<preset>")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a PEFT LoRA folder (repeat)")
    parser.add_argument("--sharing", default="base_shared", choices=[m.value for m in SharingMode])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--allow-unshared-a", action="store_true", help="base_lr_shared with different v_proj A")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        adapters=parse_adapters(args.adapter),
        sharing=args.sharing,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        allow_unshared_a=args.allow_unshared_a,
    )


def generate_main(argv: list[str], chat: bool) -> int:
    from lragent import LLM, SamplingParams

    parser = argparse.ArgumentParser(prog=f"lragent {'chat' if chat else 'generate'}")
    add_engine_args(parser)
    parser.add_argument("prompt", nargs="+")
    parser.add_argument("--use", default=None, help="adapter name to run (default: the first --adapter, else the base)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--json", action="store_true", help="print outputs with metrics as JSON")
    args = parser.parse_args(argv)
    kwargs = engine_kwargs(args)
    adapter = args.use or next(iter(kwargs["adapters"]), None)
    llm = LLM(**kwargs)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop,
    )
    if chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], adapter=adapter, sampling_params=params)
    else:
        outs = llm.generate(args.prompt, adapter=adapter, sampling_params=params)
    for prompt, out in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "adapter": adapter, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "metrics": out.metrics.as_dict()}))
        else:
            print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["generate", "chat", *DELEGATED, "bench"]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lragent {{{','.join(commands)}}} ...\n\nRun `lragent <command> --help` for options.")
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("generate", "chat"):
        return generate_main(rest, chat=command == "chat")
    if command == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: lragent bench {{{','.join(BENCHES)}}} ...")
            return 2
        return importlib.import_module(BENCHES[rest[0]]).main(rest[1:])
    if command in DELEGATED:
        return importlib.import_module(DELEGATED[command]).main(rest)
    print(f"unknown command {command!r}; choose one of {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

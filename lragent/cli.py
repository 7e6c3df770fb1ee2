"""`lragent` command line: generate, chat, serve, train, eval, analyze, demo, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from lragent.engine_args import HelpFormatter, add_engine_args, engine_config

# subcommands implemented in their own modules, each exposing `main(argv) -> int`
DELEGATED = {
    "serve": "lragent.server.cli",
    "train": "lragent.train.cli",
    "eval": "lragent.eval.cli",
    "analyze": "lragent.eval.analyze",
    "demo": "lragent.demo",
}
BENCHES = {
    "trace": "lragent.bench.trace",
    "kernels": "lragent.bench.kernels",
    "decode": "lragent.bench.decode",
    "sampler": "lragent.bench.sampler",
    "droidspeak-layers": "lragent.bench.droidspeak_layers",
}


def generate_main(argv: list[str], chat: bool) -> int:
    from lragent import LLM, SamplingParams

    parser = argparse.ArgumentParser(prog=f"lragent {'chat' if chat else 'generate'}", formatter_class=HelpFormatter)
    add_engine_args(parser)  # sharing "auto", as for `lragent serve`
    parser.add_argument("prompt", nargs="+", help="one or more prompts (a batch)")
    parser.add_argument("--use", default=None, help="adapter name to run (default: the first --adapter, else the base)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=-1, help="-1: no top-k")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print outputs with metrics as JSON")
    args = parser.parse_args(argv)
    config = engine_config(args)
    adapter = args.use or next(iter(config.adapters), None)
    llm = LLM.from_config(config)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    if chat:
        outs = llm.chat(
            [[{"role": "user", "content": p}] for p in args.prompt], adapter=adapter, sampling_params=params
        )
    else:
        outs = llm.generate(args.prompt, adapter=adapter, sampling_params=params)
    for prompt, out in zip(args.prompt, outs):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "adapter": adapter,
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                        "metrics": out.metrics.as_dict(),
                    }
                )
            )
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

"""The decoding options the benchmarks share: `--temperature --top-p --top-k` (default greedy, as before).

A sampled benchmark gives every request a fixed seed (`request_seed`), so two runs of one command draw the same
tokens; the options go into each benchmark's JSON and its printed table says which decoding was used (`describe`).
"""

from __future__ import annotations

import argparse

from lragent.sampling import SamplingParams

INT63 = 1 << 63


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (default: greedy)")
    group.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled, every request with a fixed seed"
    )
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus cut when sampling (1: off)")
    group.add_argument("--top-k", type=int, default=-1, help="top-k cut when sampling (-1: off)")


def sampling_options(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """{temperature, top_p, top_k} from the parsed flags, checked by `SamplingParams` (a bad value is a usage
    error through `parser` when given, else a ValueError)."""
    opts = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    try:
        SamplingParams(**opts)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))
    return opts


def is_greedy(opts: dict | None) -> bool:
    return not opts or SamplingParams(**opts).greedy


def describe(opts: dict | None) -> str:
    """'greedy' or e.g. 'sampled (T 0.9, top-p 0.75, top-k 40, seeded)'."""
    if is_greedy(opts):
        return "greedy"
    assert opts is not None
    parts = [f"T {opts['temperature']:g}"]
    if opts.get("top_p", 1.0) < 1.0:
        parts.append(f"top-p {opts['top_p']:g}")
    if opts.get("top_k", -1) > 0:
        parts.append(f"top-k {opts['top_k']}")
    return f"sampled ({', '.join(parts)}, seeded)"


def request_seed(base: int, *parts: int) -> int:
    """A fixed 64-bit seed for one request, from the run's seed and the request's coordinates."""
    seed = base
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2 * INT63)
    return seed - INT63 if seed >= INT63 else seed


def request_params(opts: dict | None, seed: int, **kwargs) -> SamplingParams:
    """The `SamplingParams` of one benchmark request: greedy, or `opts` with this request's seed."""
    if is_greedy(opts):
        return SamplingParams(temperature=0.0, **kwargs)
    assert opts is not None
    return SamplingParams(**opts, seed=seed, **kwargs)

"""The decoding options the benchmarks share: `--temperature --top-p --top-k` (default greedy, as before),
`--repetition-penalty --presence-penalty --frequency-penalty` (greedy or sampled, as an agent's request may ask) and
`--json-schema FILE` (every request's output constrained to that schema, lragent.engine.structured).

A sampled benchmark gives every request a fixed seed (`request_seed`), so two runs of one command draw the same
tokens; the options go into each benchmark's JSON and its printed table says which decoding was used (`describe`).
A constrained request finishes when its schema is complete (EOS ignored or not), so it may generate fewer tokens
than asked: the benchmarks count the tokens generated, and a schema whose instances are longer than the generation
length (e.g. an array with `minItems`) keeps the batch full.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lragent.sampling import SamplingParams

INT63 = 1 << 63
PENALTIES = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}  # name: value when off


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (default: greedy)")
    group.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled, every request with a fixed seed"
    )
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus cut when sampling (1: off)")
    group.add_argument("--top-k", type=int, default=-1, help="top-k cut when sampling (-1: off)")
    for name, off in PENALTIES.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=float, default=off, help=f"{off:g}: off")
    group.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="constrain every request's output to this JSON schema (engine only: no HF + PEFT run)",
    )


def sampling_options(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """{temperature, top_p, top_k[, penalties][, json_schema]} from the parsed flags (penalties only where on, the
    schema read from its file), checked by `SamplingParams` (a bad value is a usage error through `parser` when
    given, else a ValueError)."""
    opts: dict = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    opts |= {k: v for k in PENALTIES if (v := getattr(args, k, PENALTIES[k])) != PENALTIES[k]}
    try:
        path = getattr(args, "json_schema", None)
        if path:
            try:
                opts["json_schema"] = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"--json-schema {path}: {e}") from None
        SamplingParams(**opts)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))
    return opts


def is_greedy(opts: dict | None) -> bool:
    return not opts or SamplingParams(**opts).greedy


def is_constrained(opts: dict | None) -> bool:
    return bool(opts and opts.get("json_schema") is not None)


def engine_only(opts: dict | None) -> str | None:
    """Why the HF + PEFT baselines cannot run these options ('--json-schema', '--frequency-penalty', ...), or None:
    they sample through HF's temperature / top-k / top-p warpers only."""
    if is_constrained(opts):
        return "--json-schema"
    names = [f"--{k.replace('_', '-')}" for k in penalties(opts)]
    return ", ".join(names) or None


def penalties(opts: dict | None) -> dict:
    """The penalties `opts` turns on (none: {})."""
    return {k: opts[k] for k in PENALTIES if opts and k in opts}


def describe(opts: dict | None) -> str:
    """'greedy' or e.g. 'sampled (T 0.9, top-p 0.75, top-k 40, seeded)', with ' + repetition_penalty 1.2' per
    penalty on and ' + JSON schema' when constrained."""
    suffix = "".join(f" + {k} {v:g}" for k, v in penalties(opts).items())
    suffix += " + JSON schema" if is_constrained(opts) else ""
    if is_greedy(opts):
        return "greedy" + suffix
    assert opts is not None
    parts = [f"T {opts['temperature']:g}"]
    if opts.get("top_p", 1.0) < 1.0:
        parts.append(f"top-p {opts['top_p']:g}")
    if opts.get("top_k", -1) > 0:
        parts.append(f"top-k {opts['top_k']}")
    return f"sampled ({', '.join(parts)}, seeded)" + suffix


def request_seed(base: int, *parts: int) -> int:
    """A fixed 64-bit seed for one request, from the run's seed and the request's coordinates."""
    seed = base
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2 * INT63)
    return seed - INT63 if seed >= INT63 else seed


def request_params(opts: dict | None, seed: int, **kwargs) -> SamplingParams:
    """The `SamplingParams` of one benchmark request: greedy, or `opts` with this request's seed."""
    if is_greedy(opts):
        schema = opts.get("json_schema") if opts else None
        return SamplingParams(temperature=0.0, json_schema=schema, **penalties(opts), **kwargs)
    assert opts is not None
    return SamplingParams(**opts, seed=seed, **kwargs)

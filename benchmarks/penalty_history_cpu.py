"""Host cost of a penalised step's sampling inputs: rebuilt from the host token lists (the reference path) against
the device rows `PenaltyHistory` keeps (gather + one draw recorded), per step, over history lengths.

    python3 benchmarks/penalty_history_cpu.py [--batch 8] [--vocab 49152] [--histories 1000,8000,30000]

On the CPU both paths' tensor work runs on the host too, so this bounds the host time from above; on a GPU the
rows path's tensor work is queued, and only its few uploads stay on the host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lragent.engine.penalty_history import PenaltyHistory
from lragent.engine.sampler import SamplingBatch
from lragent.engine.sequence import Sequence
from lragent.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--histories", default="1000,8000,30000")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = SamplingParams(temperature=0.9, repetition_penalty=1.2, frequency_penalty=0.3)
    print(f"batch {args.batch}, vocab {args.vocab}, one thread; ms per step (median of 20)")
    print(f"{'history':>8} {'host lists ms':>14} {'device rows ms':>15}")
    for n in (int(x) for x in args.histories.split(",")):
        lists, rows = _paths(args.batch, args.vocab, n, params)
        print(f"{n:>8} {_ms(lists):>14.3f} {_ms(rows):>15.3f}", flush=True)


def _paths(batch: int, vocab: int, n: int, params: SamplingParams):
    """The two ways to one step's SamplingBatch for `batch` sequences of `n` tokens each."""
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(n)
    seqs = [
        Sequence(f"r{i}", torch.randint(0, vocab, (n,), generator=gen).tolist(), params, "", 0) for i in range(batch)
    ]
    common = ([params] * batch, list(range(batch)), [n] * batch)

    def lists():
        hist, plens = [s.token_ids for s in seqs], [s.prompt_len for s in seqs]
        return SamplingBatch.build(*common, hist, plens, vocab, cpu)

    history = PenaltyHistory(cpu)
    history.rows(seqs, vocab)  # filled once, on the first sampled step
    drawn = torch.zeros(batch, dtype=torch.float64)

    def rows():
        r = history.rows(seqs, vocab)
        out = SamplingBatch.build(*common, None, None, vocab, cpu, history.gather(r))
        history.record(r, drawn)
        return out

    return lists, rows


def _ms(fn) -> float:
    fn()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    main()

"""First request of a fresh process vs a warm one, greedy and sampled (embedded SmolLM2, batch 8).

OMP_NUM_THREADS=1 python benchmarks/first_vs_warm.py
"""

import time

from lragent import LLM, SamplingParams

SETTINGS = {
    "greedy": SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
    "sampled": SamplingParams(max_tokens=32, temperature=0.9, top_p=0.75, top_k=40, seed=1, ignore_eos=True),
}


def main() -> None:
    start = time.perf_counter()
    llm = LLM()
    startup = time.perf_counter() - start
    prompts = [[1 + (7 * i + j) % 4000 for j in range(128)] for i in range(8)]
    for name, params in SETTINGS.items():
        for run in ("first", "second"):
            llm.engine.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate(prompts, params)
            took = time.perf_counter() - start
            print(f"{name:8s} {run:6s} {8 * 32 / took:7.1f} tok/s  ({took:.2f} s)")
    print(f"engine start {startup:.1f} s")


if __name__ == "__main__":
    main()

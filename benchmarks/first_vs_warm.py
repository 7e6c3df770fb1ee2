import time
from lragent import LLM, SamplingParams
t0 = time.perf_counter(); llm = LLM(); t_init = time.perf_counter() - t0
prompts = [[1 + (7 * i + j) % 4000 for j in range(128)] for i in range(8)]
for name, sp in [("greedy", SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)),
                 ("sampled", SamplingParams(max_tokens=32, temperature=0.9, top_p=0.75, top_k=40, seed=1, ignore_eos=True))]:
    for run in ("first", "second"):
        llm.engine.reset_prefix_cache()
        t = time.perf_counter(); llm.generate(prompts, sp); dt = time.perf_counter() - t
        print(f"{name:8s} {run:6s} {8*32/dt:7.1f} tok/s  ({dt:.2f} s)")
print(f"engine start {t_init:.1f} s")

"""What one engine step did and how long its parts took: the public face of the engine's timers.

Benchmarks and analyses subscribe with `LLMEngine.add_step_listener` instead of wrapping engine internals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    is_prefill: bool
    num_seqs: int
    num_tokens: int  # tokens run through the model
    num_sampled: int  # sequences that got a token (or failed) this step
    prepare_s: float  # host time turning the batch into tensors and metadata (0 for a graph replay's refill)
    # the model runner: prepare + forward + sampling, until the tokens are on the host (a step run ahead: its launch
    # and the wait for its tokens, not the time it ran behind the previous step while the host worked)
    forward_s: float
    step_s: float  # the whole `step()`: scheduling, forward, block bookkeeping, post-processing
    graphed: bool = False  # the forward replayed a captured CUDA graph (decode, or a short prefill chunk)
    ahead: bool = False  # async scheduling: the step was queued before its input tokens reached the host

    @property
    def kind(self) -> str:
        return "prefill" if self.is_prefill else "decode"

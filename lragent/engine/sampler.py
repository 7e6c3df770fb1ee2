"""Next-token choice: greedy, or temperature with top-k / top-p, with per-request seeded generators."""

from __future__ import annotations

import torch

from lragent.sampling import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k tokens and outside the smallest set with probability mass >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        drop[..., 0] = False  # and always the most likely one (a top_p below float32's range rounds to 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


_PINNED: dict[torch.device, torch.Tensor] = {}


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """The step's one device-to-host copy, through a reused pinned buffer on CUDA (a copy into pageable memory
    costs ~0.4 ms per step on an H200 at batch 32)."""
    if values.device.type != "cuda":
        return values.cpu()
    buf = _PINNED.get(values.device)
    if buf is None or buf.numel() < values.numel():
        buf = _PINNED[values.device] = torch.empty(max(values.numel(), 1024), dtype=values.dtype, pin_memory=True)
    host = buf[: values.numel()].view(values.shape)
    host.copy_(values, non_blocking=True)
    torch.cuda.current_stream(values.device).synchronize()
    return host.clone()


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[float]]:
    """logits [n, vocab] float32 -> chosen token ids and their log-probabilities (under the unfiltered softmax).

    The log-probability is logit - logsumexp(row): a reduction, where a full log_softmax over a 128k vocabulary
    wrote the whole matrix back and took ~1 ms per step at batch 32 (H200 profile, BENCHMARKS.md).
    A row with NaN or +inf logits (or nothing but -inf) has a non-finite logsumexp, hence a non-finite chosen
    log-probability: that is how the engine tells that request alone that it failed, at no extra cost. Sampled
    rows draw from a neutral stand-in for such a row so the batch's draw cannot raise (`-inf` entries elsewhere are
    masks, e.g. a grammar's, and fine)."""
    lse = torch.logsumexp(logits, dim=-1)
    if all(p.greedy for p in params):
        chosen = logits.argmax(dim=-1)
    else:
        broken = ~torch.isfinite(lse)  # NaN or +inf somewhere, or nothing but -inf: multinomial would raise
        safe = torch.where(broken[:, None], torch.zeros_like(logits), logits)
        picks = []
        for row, p, gen in zip(safe, params, generators):
            if p.greedy:
                picks.append(row.argmax())
                continue
            probs = torch.softmax(filter_logits(row / p.temperature, p.top_k, p.top_p), dim=-1)
            picks.append(torch.multinomial(probs.cpu() if gen is not None else probs, 1, generator=gen)[0])
        chosen = torch.stack([t.to(logits.device) for t in picks])
    chosen_lp = logits.gather(-1, chosen[:, None])[:, 0] - lse  # non-finite exactly when the row is broken
    both = _to_host(torch.stack([chosen.double(), chosen_lp.double()]))
    return [int(t) for t in both[0].tolist()], both[1].tolist()
